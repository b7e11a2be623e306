"""Bad shards end a run promptly with one line, and skipped samples are counted where
runs are read (metrics.jsonl, TensorBoard, the end-of-run log line, eval.json).

- Loader workers start with SIGTERM blocked (marscale.core.signals), so on an error path
  Python's multiprocessing exit handler, which SIGTERMs and joins its daemonic children,
  would wait for them forever. The loader's iterator shuts them down (and kills what does
  not stop) when it is closed, on an error, or at interpreter exit.
- `marscale train` on undecodable shards, and an evaluation that fails in a worker, exit
  with status 2 and one line naming the problem.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest
import torch
from helpers import DEMO_CONFIG as CONFIG
from helpers import REPO, run_overrides, subprocess_env

from marscale.core import dist
from marscale.data.stages import MAX_CONSECUTIVE_SKIPS
from marscale.data.shards import Manifest, ShardInfo, load_manifest, sample_key, save_manifest

# A plausible MP4 header followed by bytes no decoder accepts.
GARBAGE_VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4


def _members(path: str) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def bad_shards(synthetic_shards, tmp_path_factory) -> dict:
    """"train": the synthetic training set with every video undecodable;
    "val_failing": two evaluation shards of MAX_CONSECUTIVE_SKIPS + 1 undecodable videos
    each, so each of two workers stops with "bad samples in a row"."""
    root = tmp_path_factory.mktemp("bad_shards")
    train = str(root / "train")
    os.makedirs(train)
    manifest = load_manifest(synthetic_shards["train"])
    for info in manifest.shards:
        members = _members(os.path.join(synthetic_shards["train"], info.name))
        _write_tar(os.path.join(train, info.name),
                   [(n, GARBAGE_VIDEO if n.endswith(".mp4") else d) for n, d in members])
    save_manifest(train, manifest)

    val = str(root / "val_failing")
    os.makedirs(val)
    per_shard = MAX_CONSECUTIVE_SKIPS + 1
    infos = []
    for s in range(2):
        name = f"val-{s:06d}.tar"
        keys = [sample_key(s * per_shard + i) for i in range(per_shard)]
        _write_tar(os.path.join(val, name), [(f"{k}.{ext}", data) for k in keys
                                             for ext, data in (("mp4", GARBAGE_VIDEO), ("cls", b"0"))])
        infos.append(ShardInfo(name, per_shard, os.path.getsize(os.path.join(val, name)), "", {"0": per_shard}))
    val_manifest = load_manifest(synthetic_shards["val"])
    save_manifest(val, Manifest(val_manifest.prefix, val_manifest.class_names, infos, [], val_manifest.options))
    return {"train": train, "val_failing": val}


def run_cli(args: list[str], timeout: float = 180) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m marscale.cli ARGS` with a bounded wait: (the process, seconds to exit)."""
    env = subprocess_env()
    env.pop("MARSCALE_TRACEBACK", None)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "marscale.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-3000:]
        pytest.fail(f"marscale {args[0]} did not exit within {timeout} s (hung); stderr ends:\n{tail!r}")
    return proc, time.perf_counter() - start


def train_args(train: str, val: str, out, *overrides: str) -> list[str]:
    sets = [
        *run_overrides({"train": train, "val": val}, out),
        "run.device=cpu",
        "data.batch_size=4",
        "data.samples_per_epoch=8",
        "run.max_steps=2",
        "checkpoint.save_at_end=false",
        *overrides,
    ]
    return ["train", "--config", "demo", *[a for s in sets for a in ("--set", s)]]


def assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 78, output[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("marscale train: error: ") and message in last, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.slow
def test_training_on_undecodable_shards_exits_with_one_line(bad_shards, synthetic_shards, tmp_path):
    proc, seconds = run_cli(train_args(bad_shards["train"], synthetic_shards["val"], tmp_path, "data.num_workers=1"))
    assert_one_line_error(proc, f"{MAX_CONSECUTIVE_SKIPS} bad samples in a row")
    print(f"time to exit: {seconds:.1f} s")


@pytest.mark.slow
def test_evaluation_failing_in_a_worker_exits_with_one_line(bad_shards, synthetic_shards, tmp_path):
    # One good training step, then the final evaluation reads the failing set with 2 workers.
    proc, seconds = run_cli(train_args(
        synthetic_shards["train"], bad_shards["val_failing"], tmp_path, "data.num_workers=2", "run.max_steps=1",
    ))
    assert_one_line_error(proc, f"{MAX_CONSECUTIVE_SKIPS} bad samples in a row")
    assert "decode" in proc.stderr.strip().splitlines()[-1]
    print(f"time to exit: {seconds:.1f} s")


# A worker that never finishes its sample (a hung read): it neither answers the loader's
# shutdown nor, with the stop signals blocked, SIGTERM.
STUCK_LOADER = """
import multiprocessing, time
import torch
from torch.utils.data import DataLoader, IterableDataset
from marscale.data.loaders import start_iterator

class Stuck(IterableDataset):
    def __iter__(self):
        yield torch.zeros(1)
        time.sleep(120)  # past the test's timeout

torch.utils.data._utils.MP_STATUS_CHECK_INTERVAL = 0.2  # torch's shutdown joins: 2 x this
it = start_iterator(DataLoader(Stuck(), batch_size=None, num_workers=1))
next(it)
{end}
"""


def test_worker_that_ignores_shutdown_is_killed_on_close():
    proc = subprocess.run(
        [sys.executable, "-c", STUCK_LOADER.format(end=textwrap.dedent("""
            workers = multiprocessing.active_children()
            assert workers
            it.close()
            assert not any(w.is_alive() for w in workers)
            print("closed")
        """))],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0 and "closed" in proc.stdout, proc.stderr[-3000:]


def test_process_exiting_with_an_open_loader_does_not_hang():
    """No close: the exit hook stops the workers before multiprocessing's would join them."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", STUCK_LOADER.format(end="raise SystemExit(3)")],
            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a process that exits with an open loader hung")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert time.perf_counter() - start < 30


# --- skip counts reach metrics.jsonl, TensorBoard, the summary line and eval.json --------


def _mixed_set(src: str, dst: str, num_shards: int, unreadable: tuple[int, ...] = ()) -> None:
    """The first `num_shards` shards of `src`, each led by one sample of each kind of bad
    sample (undecodable video, no .cls member, a label that is no integer) before its good
    samples; the shards listed in `unreadable` hold bytes that are no tar archive (present,
    so the pre-flight passes them; a read error in the loader)."""
    os.makedirs(dst)
    manifest = load_manifest(src)
    shards = manifest.shards[:num_shards]
    for s, info in enumerate(shards):
        good = _members(os.path.join(src, info.name))
        video = next(d for n, d in good if n.endswith(".mp4"))
        k = [sample_key(10_000 + 3 * s + j) for j in range(3)]
        bad = [(f"{k[0]}.mp4", GARBAGE_VIDEO), (f"{k[0]}.cls", b"0"),  # decode
               (f"{k[1]}.cls", b"1"),  # incomplete
               (f"{k[2]}.mp4", video), (f"{k[2]}.cls", b"one")]  # label
        if s in unreadable:
            with open(os.path.join(dst, info.name), "wb") as f:
                f.write(b"this is not a tar archive\n" * 64)
        else:
            _write_tar(os.path.join(dst, info.name), bad + good)
    save_manifest(dst, Manifest(manifest.prefix, manifest.class_names, shards, [], manifest.options))


@pytest.mark.slow
def test_skip_counts_reach_metrics_summary_and_eval_json(synthetic_shards, tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from marscale.engine.config import load_train_config
    from marscale.engine.metrics import read_jsonl
    from marscale.engine.trainer import Trainer

    train, val = str(tmp_path / "train"), str(tmp_path / "val")
    _mixed_set(synthetic_shards["train"], train, 4)
    _mixed_set(synthetic_shards["val"], val, 3, unreadable=(2,))
    out = tmp_path / "run"
    cfg = load_train_config(CONFIG, [
        *run_overrides({"train": train, "val": val}, out),
        "logging.tensorboard=true",
        "data.batch_size=4", "data.clips_per_video=2",  # 2 videos per loader batch
        "data.num_workers=2",  # the counts live in shared memory: read from the main process
        "data.shuffle_buffer=0",  # each shard read in order: 3 bad samples, then its 2 videos
        "data.samples_per_epoch=8", "run.max_steps=4",  # one epoch: 8 videos, 4 shards read
        "data.eval_batch_size=4", "logging.every_steps=1", "checkpoint.save_at_end=false",
        "deepspeed.zero_stage=0", "deepspeed.precision=fp32",
    ])
    dist.init_distributed()
    caplog.set_level(logging.INFO, logger="marscale.engine.trainer")
    trainer = Trainer(cfg)
    try:
        assert trainer.fit() == 0
    finally:
        trainer.close()

    # Each shard read skips one sample of each kind: 4 reads for the epoch's 8 videos.
    expected = {"read": 0, "incomplete": 4, "label": 4, "decode": 4, "key": 0}
    records = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    counts = [r["skipped_samples"] for r in records]
    assert all(set(c) == set(expected) for c in counts)
    assert all(a[k] <= b[k] for a, b in zip(counts, counts[1:]) for k in expected)  # since the start
    assert counts[-1] == expected
    tags = EventAccumulator(str(out / "tb")).Reload().Tags()["scalars"]
    assert {f"metrics/skipped_samples/{k}" for k in expected} <= set(tags)
    summary = [r.getMessage() for r in caplog.records if "skipped by the training loaders" in r.getMessage()]
    assert summary == ["samples skipped by the training loaders (all ranks): incomplete 4, label 4, decode 4"]

    # Evaluation: 3 shards read once by 2 workers, one of them no tar archive (a read error).
    result = json.load(open(out / "eval.json"))
    assert result["skipped_samples"] == {"read": 1, "incomplete": 2, "label": 2, "decode": 2, "key": 0}
    assert (result["num_videos"], result["expected_videos"]) == (4, 6)
    assert torch.isfinite(torch.tensor(result["top1"]))
