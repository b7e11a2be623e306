"""The training loop under DeepSpeed in one process: every ZeRO stage, exact resume,
pre-emption, crash fallback, export round trip.

Tiny configs: configs/demo.yaml with 32x32 clips of 4 frames (2x2x2 = 8 tokens), on the
session's synthetic shards, decoded in the training process (num_workers 0).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import pytest
import torch
from helpers import DEMO_CONFIG as CONFIG
from helpers import REPO, run_overrides, subprocess_env

from marscale.core import dist
from marscale.checkpoints import folders as ckpt
from marscale.engine.config import PRECISION_DTYPES, load_train_config
from marscale.engine.ds_config import gradient_dtypes
from marscale.engine.metrics import by_step, read_jsonl
from marscale.engine.optim import apply_lr
from marscale.engine.trainer import EXIT_PREEMPTED, LOAD_REPORT_FILE, Trainer


def tiny_config(shards: dict[str, str], out, *overrides: str):
    return load_train_config(
        CONFIG,
        [
            *run_overrides(shards, out),
            "data.batch_size=4",
            "data.clips_per_video=2",
            "data.num_workers=0",
            "data.samples_per_epoch=8",  # 4 steps per epoch: 6 steps cross an epoch
            "data.eval_batch_size=4",
            "optim.warmup_epochs=0.5",
            "logging.every_steps=1",
            "checkpoint.every_steps=0",
            "checkpoint.keep_last=0",
            "run.max_steps=6",
            *overrides,
        ],
    )


@pytest.fixture(scope="module", autouse=True)
def process_group():
    dist.init_distributed()


def step_tokens(trainer: Trainer, step: int = 0, micro: int = 0):
    """The token layout the training step gives micro-batch `micro` of `step` on this rank."""
    b = trainer.plan.batches
    return b.tokens(b.micro_batch(step, micro, trainer.rank), step, micro, trainer.rank)


def micro_step(trainer: Trainer, video, labels, tokens, **kw):
    """One micro-batch through the trainer's step, weighted as a step of alike batches."""
    return trainer.step.micro_step({"video": video, "label": labels}, tokens, (1.0, 1.0), **kw)


def fixed_batch(batch: int = 4):
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (batch, 3, 4, 32, 32), dtype=torch.uint8, generator=g)
    return video, torch.arange(batch) % 4


def losses(run_dir) -> dict[int, float]:
    return {step: r["loss"] for step, r in by_step(read_jsonl(os.path.join(run_dir, "metrics.jsonl"))).items()}


# bf16 on every stage; ZeRO-0 in fp32 is the one case where DeepSpeed steps our torch
# optimizer directly (no wrapper), so the loop computes the gradient norm itself.
@pytest.mark.parametrize("stage,precision", [(0, "bf16"), (1, "bf16"), (2, "bf16"), (3, "bf16"), (0, "fp32")])
def test_zero_stage_with_activation_checkpointing(stage, precision, synthetic_shards, tmp_path):
    cfg = tiny_config(
        synthetic_shards, tmp_path, f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}",
        "model.grad_checkpointing=6",
    )
    trainer = Trainer(cfg)
    try:
        module = trainer.engine.module
        assert next(module.parameters()).dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
        # DeepSpeed took the gradient dtypes the config states (bf16, ZeRO >= 1: fp32 both)
        communication, accumulation = gradient_dtypes(cfg.deepspeed)
        assert trainer.engine.communication_data_type == PRECISION_DTYPES[communication]
        assert trainer.engine.get_data_types()[1] == PRECISION_DTYPES[accumulation]
        assert module.encoder.grad_checkpointing == 6
        calls = []
        # A pre-hook: non-reentrant recomputation stops early, before forward hooks would run.
        hook = module.encoder.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))

        video, labels = fixed_batch()
        tokens = step_tokens(trainer)
        apply_lr(trainer.engine.optimizer, 2e-3)
        first = micro_step(trainer, video, labels, tokens, want_grad_norm=True)
        assert set(first) == {"loss", "loss_cls", "loss_recon", "grad_norm"}
        assert torch.isfinite(first["grad_norm"]) and first["grad_norm"] > 0
        # Checkpointed blocks run twice per step: forward, and again in backward.
        assert len(calls) == 2
        run = [micro_step(trainer, video, labels, tokens)["loss"].item() for _ in range(7)]
        assert len(calls) == 16
        assert run[-1] < 0.6 * first["loss"].item(), (first["loss"].item(), run)

        # The lr reaches the optimizer DeepSpeed steps: at lr 0 the weights do not move.
        apply_lr(trainer.engine.optimizer, 0.0)
        frozen = [micro_step(trainer, video, labels, tokens)["loss"].item() for _ in range(3)]
        assert frozen[1] == frozen[2], frozen
        hook.remove()
    finally:
        trainer.close()


def send_signal_after(path: str, step: int, signum: int) -> threading.Thread:
    """SIGTERM ourselves once `step` shows up in the metrics file (the loop is mid-run)."""

    def watch():
        deadline = time.time() + 300
        while time.time() < deadline:
            if os.path.exists(path) and any(r["step"] >= step for r in read_jsonl(path)):
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_preempt_resume_is_exact_and_ignores_incomplete_checkpoints(synthetic_shards, tmp_path):
    """6 steps straight == steps 1..k, SIGTERM (checkpoint), resume, steps k+1..6.

    Dropout, drop path, mixup/cutmix and crossing an epoch boundary all take part, so
    every random stream and the data position must come back exactly.
    """
    extra = (
        "model.drop_path=0.1", "model.head_dropout=0.2", "data.mixup=0.8", "data.cutmix=1.0",
        "deepspeed.zero_stage=2", "deepspeed.precision=fp32",
    )
    straight_dir = tmp_path / "straight"
    trainer = Trainer(tiny_config(synthetic_shards, straight_dir, *extra))
    try:
        assert trainer.fit() == 0
    finally:
        trainer.close()
    straight = losses(straight_dir)
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    assert os.path.isfile(straight_dir / "config.yaml") and os.path.isfile(straight_dir / "deepspeed_config.json")
    # The run plan, saved once at start: 8 videos x 2 clips / 4 clips per step.
    plan = json.load(open(straight_dir / "plan.json"))
    assert (plan["steps_per_epoch"], plan["batches_per_epoch"], plan["total_steps"], plan["warmup_steps"]) == (4, 4, 6, 2)
    assert plan["token_grid"] == [2, 2, 2] and plan["visible_tokens_train"] == 4 and plan["world_size"] == 1
    assert plan["train_set"]["shard_videos"] == [2] * 8 and plan["val_set"]["root"] == synthetic_shards["val"]
    assert [s for s, _ in ckpt.list_checkpoints(ckpt.checkpoints_root(str(straight_dir)))] == [6]

    run_dir = tmp_path / "preempted"
    cfg = tiny_config(synthetic_shards, run_dir, *extra, "checkpoint.resume=auto")
    preempt_after(cfg, 3)
    root = ckpt.checkpoints_root(str(run_dir))
    saved = [s for s, _ in ckpt.list_checkpoints(root)]
    assert len(saved) == 1 and 3 <= saved[0] < 6, saved
    stopped = saved[0]
    assert not os.path.exists(run_dir / "eval.json")  # a pre-empted run does not evaluate

    # A crash while saving the next checkpoint: files half written, no marker.
    crashed = os.path.join(root, ckpt.tag_for(stopped + 1))
    shutil.copytree(os.path.join(root, ckpt.tag_for(stopped)), crashed)
    os.unlink(os.path.join(crashed, ckpt.COMPLETE_MARKER))
    with open(os.path.join(crashed, "mp_rank_00_model_states.pt"), "r+b") as f:
        f.truncate(100)

    trainer = Trainer(cfg)
    try:
        assert trainer.fit() == 0
        resumed = losses(run_dir)
        assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
        for step in range(1, 7):
            assert resumed[step] == straight[step], (step, resumed, straight)
        # The leftover is older than the final checkpoint now: pruned.
        assert [s for s, _ in ckpt.list_checkpoints(root, complete=None)] == [stopped, 6]
        assert os.path.isfile(run_dir / "eval.json")

        # Export round trip (ZeRO-2, fp32): the exported weights give the engine's logits.
        from marscale.weights.pretrained import load_pretrained
        from marscale.weights.export import export
        from marscale.model import build_model

        out = str(tmp_path / "model.pt")
        export(str(run_dir), out)
        payload = torch.load(out, weights_only=True)
        assert payload["step"] == 6 and payload["config"]["model"]["variant"] == "vit_tiny"
        model = build_model(cfg.model, cfg.clip)
        report = load_pretrained(model, out)
        assert report.layout == "marscale" and not report.missing and not report.unexpected
        assert_same_logits(trainer, model)
    finally:
        trainer.close()


def preempt_after(cfg, step: int) -> None:
    """Train `cfg` until SIGTERM arrives once metrics.jsonl shows `step`: the run saves and
    returns EXIT_PREEMPTED."""
    trainer = Trainer(cfg)
    watcher = send_signal_after(os.path.join(cfg.run.output_dir, "metrics.jsonl"), step, signal.SIGTERM)
    try:
        assert trainer.fit() == EXIT_PREEMPTED
    finally:
        trainer.close()
        watcher.join()


def straight_and_resumed(shards, tmp_path, extra, check) -> tuple[dict[int, float], dict[int, float]]:
    """Losses of `extra` trained straight (its trainer passing `check` first), and of the
    same run pre-empted after step 2 or later and resumed."""
    trainer = Trainer(tiny_config(shards, tmp_path / "straight", *extra))
    try:
        assert check(trainer)
        assert trainer.fit() == 0
    finally:
        trainer.close()
    cfg = tiny_config(shards, tmp_path / "preempted", *extra, "checkpoint.resume=auto")
    preempt_after(cfg, 2)
    trainer = Trainer(cfg)
    try:
        assert trainer.fit() == 0
    finally:
        trainer.close()
    return losses(tmp_path / "straight"), losses(tmp_path / "preempted")


# The straight run's losses below, recorded with one torch thread (x86_64, torch 2.13.0+cpu)
# before the device augmentation was batched and moved into the trainer's prefetcher: the
# change kept them bit for bit here. Another CPU's kernels may differ in the last bits,
# which 5 steps grow to about 1e-6: the check allows 2e-5 (an augmentation that changes
# pixels moves the losses by far more).
DEVICE_AUGMENT_LOSSES = ("0x1.7ad658p+0", "0x1.971ac4p+0", "0x1.162718p+1", "0x1.9baba2p+0", "0x1.b6defcp+0")


def test_resume_is_exact_with_the_augmentation_on_the_device(synthetic_shards, tmp_path):
    """data.augment_on=device on the CPU device, full RandAugment, flips and erasing: 5
    steps (an epoch boundary crossed with a batch taken ahead) straight == pre-empted after
    step 2 or later and resumed, and == the losses recorded before the prefetcher."""
    extra = (
        "data.augment_on=device", "data.rand_augment=rand-m9-mstd0.5-inc1", "data.random_erasing=0.5",
        "data.mixup=0.8", "deepspeed.zero_stage=0", "deepspeed.precision=fp32", "run.max_steps=5",
        "run.eval_every_steps=0",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded: the thread count moves the model's last bits
    try:
        straight, resumed = straight_and_resumed(
            synthetic_shards, tmp_path, extra, check=lambda trainer: trainer.augment_on == "device"
        )
    finally:
        torch.set_num_threads(threads)
    assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4, 5]
    assert resumed == straight
    recorded = torch.tensor([float.fromhex(h) for h in DEVICE_AUGMENT_LOSSES], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor([straight[s] for s in range(1, 6)], dtype=torch.float64), recorded,
                               rtol=2e-5, atol=0)


def test_bf16_zero1_accumulates_in_fp32_and_resumes_exactly(synthetic_shards, tmp_path):
    """bf16 under ZeRO-1 with fp32 gradient accumulation is DeepSpeed's BF16_Optimizer (not
    its ZeRO-1 optimizer): two micro-batches a step, 4 steps straight == pre-empted after
    step 2 or later and resumed (its checkpoint files load back)."""
    extra = ("deepspeed.zero_stage=1", "deepspeed.precision=bf16", "deepspeed.grad_accum_steps=2",
             "data.samples_per_epoch=16", "run.max_steps=4", "run.eval_every_steps=0")
    straight, resumed = straight_and_resumed(
        synthetic_shards, tmp_path, extra,
        check=lambda trainer: type(trainer.engine.optimizer).__name__ == "BF16_Optimizer"
        and trainer.engine.get_data_types() == (torch.bfloat16, torch.float32),
    )
    with open(os.path.join(tmp_path / "straight", "deepspeed_config.json")) as f:
        recorded = json.load(f)
    assert recorded["communication_data_type"] == "fp32" and recorded["data_types"] == {"grad_accum_dtype": "fp32"}
    assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4]
    assert resumed == straight


def test_every_mfu_names_its_peak(synthetic_shards, tmp_path, caplog):
    """The peak MFU divides by is logged at the start and stored beside every MFU (JSONL;
    TensorBoard takes the number); on a CPU without logging.peak_tflops the start says why
    there is no MFU."""
    extra = ("deepspeed.zero_stage=0", "deepspeed.precision=fp32", "run.max_steps=2", "run.eval_every_steps=0")
    with caplog.at_level("INFO", logger="marscale.engine.trainer"):
        trainer = Trainer(tiny_config(synthetic_shards, tmp_path / "none", *extra))
        trainer.close()
    assert "no MFU: cpu has no peak in the table (set logging.peak_tflops)" in caplog.text
    caplog.clear()
    out = tmp_path / "set"
    with caplog.at_level("INFO", logger="marscale.engine.trainer"):
        trainer = Trainer(tiny_config(synthetic_shards, out, *extra, "logging.peak_tflops=0.001"))
        try:
            assert trainer.fit() == 0
        finally:
            trainer.close()
    assert "MFU against logging.peak_tflops (set), 0.001 TFLOP/s" in caplog.text
    records = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "mfu" in r]
    assert len(records) == 2
    for r in records:
        assert r["mfu_peak"] == "logging.peak_tflops (set)" and r["mfu_peak_tflops"] == 0.001
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 0.001)


def assert_same_logits(trainer: Trainer, model: torch.nn.Module) -> None:
    from marscale.data import normalize

    video, _ = fixed_batch()
    x = normalize(video, trainer.cfg.clip.mean, trainer.cfg.clip.std, trainer.built.dtype)
    tokens = step_tokens(trainer)
    trainer.engine.eval()
    model.to(trainer.built.dtype).eval()
    with torch.no_grad():
        expected = trainer.engine(x, tokens)["logits"]
        got = model(x, tokens)["logits"]
    trainer.engine.train()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_export_from_zero3_bf16(synthetic_shards, tmp_path):
    import deepspeed

    from marscale.weights.pretrained import load_pretrained
    from marscale.weights.export import consolidate, export, has_zero_shards
    from marscale.model import build_model

    cfg = tiny_config(
        synthetic_shards, tmp_path, "deepspeed.zero_stage=3", "deepspeed.precision=bf16", "run.max_steps=2",
        "run.eval_every_steps=1",
    )
    trainer = Trainer(cfg)
    try:
        assert trainer.fit() == 0
        path = os.path.join(trainer.checkpoints_root, "step-2")
        assert ckpt.is_complete(path) and has_zero_shards(path)
        state, client = consolidate(path)
        assert client["train_state"]["step"] == 2
        params = dict(trainer.engine.module.named_parameters())
        assert set(state) == set(params)
        with deepspeed.zero.GatheredParameters(list(params.values())):
            for name, p in params.items():
                assert state[name].dtype == torch.float32
                # fp32 master weights, of which the module computes with the bf16 rounding
                torch.testing.assert_close(state[name].to(torch.bfloat16), p.detach(), rtol=0, atol=0)
        for out in (str(tmp_path / "model.pt"), str(tmp_path / "exported")):  # one pickled file; safetensors folder
            export(path, out)
            model = build_model(cfg.model, cfg.clip)
            load_pretrained(model, out)
            assert_same_logits(trainer, model)
        history = read_jsonl(os.path.join(tmp_path, "eval.jsonl"))
        assert [r["step"] for r in history] == [1, 2]
        assert all(r["num_views"] == 8 and r["num_videos"] == 8 for r in history)
    finally:
        trainer.close()


def test_starts_from_videomae_pretraining(synthetic_shards, tmp_path):
    """model.pretrained: a VideoMAE pre-training checkpoint fills the encoder and decoder
    of the engine's module; the bridging classifier keeps its fresh initialisation."""
    from marscale.model import build_model
    from test_checkpoint import randomised, save, videomae_pretrain_layout

    cfg = tiny_config(synthetic_shards, tmp_path, "deepspeed.zero_stage=2", "deepspeed.precision=fp32")
    source = randomised(build_model(cfg.model, cfg.clip), seed=3)
    path = save(tmp_path, videomae_pretrain_layout(source), "videomae_pretrain.pth")
    fresh = Trainer(cfg)
    try:
        fresh_classifier = {k: v.clone() for k, v in fresh.engine.module.classifier.state_dict().items()}
    finally:
        fresh.close()
    report_path = os.path.join(cfg.run.output_dir, LOAD_REPORT_FILE)
    assert not os.path.exists(report_path)  # nothing loaded, no report

    cfg = tiny_config(synthetic_shards, tmp_path, "deepspeed.zero_stage=2", "deepspeed.precision=fp32",
                      f"model.pretrained={path}")
    trainer = Trainer(cfg)
    try:
        module = trainer.engine.module
        for part in ("encoder", "decoder"):
            expected = getattr(source, part).state_dict()
            for name, value in getattr(module, part).state_dict().items():
                torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=f"{part}.{name}")
        for name, value in module.classifier.state_dict().items():
            torch.testing.assert_close(value, fresh_classifier[name], rtol=0, atol=0, msg=f"classifier.{name}")

        # The run folder records what was loaded, by part of the model.
        with open(report_path) as f:
            report = json.load(f)
        assert report["path"] == path and report["layout"] == "videomae_pretrain" and report["partial"] is False
        n = {part: len(getattr(module, part).state_dict()) for part in ("encoder", "decoder", "classifier")}
        assert report["groups"] == {
            "encoder": {"loaded": n["encoder"], "missing": 0, "unexpected": 0, "dropped": 0},
            "decoder": {"loaded": n["decoder"], "missing": 0, "unexpected": 0, "dropped": 0},
            "classifier": {"loaded": 0, "missing": n["classifier"], "unexpected": 0, "dropped": 0},
            "other": {"loaded": 0, "missing": 0, "unexpected": 0, "dropped": 0},
        }
        assert report["missing"] == [f"classifier.{k}" for k in module.classifier.state_dict()]
        assert report["unexpected"] == report["dropped"] == []
    finally:
        trainer.close()


def test_diverged_loss_stops_before_saving(synthetic_shards, tmp_path, monkeypatch):
    """A NaN loss from step 4 on: the checkpoint step 4 logs first, finds it, and raises;
    step-2 stays the newest checkpoint and resuming from it is possible."""
    from marscale.engine import step as step_module
    from marscale.engine.trainer import TrainingDiverged

    calls, original_build = [], step_module.build_loss

    def build_poisoned(*args, **kw):
        loss = original_build(*args, **kw)

        def poisoned(*call_args, **call_kw):
            parts = loss(*call_args, **call_kw)
            calls.append(1)
            if len(calls) >= 4:
                parts["loss"] = parts["loss"] * float("nan")
            return parts

        return poisoned

    monkeypatch.setattr(step_module, "build_loss", build_poisoned)
    cfg = tiny_config(
        synthetic_shards, tmp_path, "deepspeed.zero_stage=2", "deepspeed.precision=fp32",
        "checkpoint.every_steps=2", "checkpoint.keep_last=3", "logging.every_steps=5",
    )
    trainer = Trainer(cfg)
    try:
        with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4 .*Newest complete checkpoint: .*step-2"):
            trainer.fit()
    finally:
        trainer.close()
    assert [s for s, _ in ckpt.list_checkpoints(trainer.checkpoints_root, complete=None)] == [2]
    # Checkpoint steps are logging steps: step 2 was logged although logging.every_steps=5.
    assert sorted(losses(tmp_path)) == [2, 4]


def test_marscale_eval_of_a_run_folder_matches_the_runs_own_evaluation(synthetic_shards, tmp_path):
    """`marscale eval --checkpoint RUN` (a plain process, the config stored in the
    checkpoint) consolidates the newest complete ZeRO-2 checkpoint, scores every view and
    agrees with the training run's final evaluation. (That consolidated weights give the
    engine's logits bit for bit is checked by the export tests above.)"""
    import json
    import subprocess
    import sys

    cfg = tiny_config(synthetic_shards, tmp_path / "run", "deepspeed.zero_stage=2", "deepspeed.precision=fp32",
                      "run.max_steps=3")
    trainer = Trainer(cfg)
    try:
        assert trainer.fit() == 0
    finally:
        trainer.close()
    out = tmp_path / "standalone.json"
    proc = subprocess.run(
        [sys.executable, "-m", "marscale.cli", "eval", "--checkpoint", str(tmp_path / "run"), "--out", str(out)],
        cwd=REPO, env=subprocess_env(one_thread=False), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    standalone = json.load(open(out))
    own = json.load(open(tmp_path / "run" / "eval.json"))
    assert standalone["checkpoint"] == str(tmp_path / "run")
    for key in ("top1", "top5", "num_videos", "num_views", "incomplete_videos"):
        assert standalone[key] == own[key], (key, standalone, own)
    assert standalone["num_videos"] == standalone["expected_videos"] == 8
