"""Save and resume the marscale Trainer under the given ZeRO stages (0-3), recording the full
training state on each side and the losses in between, for tests/test_engine_reshape.py.

Started as one process or as N ranks under the `deepspeed` launcher. For each ZeRO stage
in STAGES, in one process: build a Trainer on the run folder RUNS/stage<S>; if it holds a
checkpoint, resume it (`--resume auto`: on another world size the engine converts it) and
record the state just loaded; train STEPS optimizer steps on batches seeded by (step, rank)
only, so every stage sees the same data and a ZeRO-0 run is the reference of the others;
save a checkpoint and record the state saved. The state is every parameter gathered whole:
its fp32 master weight and AdamW's exp_avg and exp_avg_sq (DeepSpeed's `safe_get_full_*`,
collective under ZeRO-3; under ZeRO-0 the module and the torch optimizer hold them whole).
Rank 0 writes {stage: {"loaded": ..., "saved": ..., "losses": [loss of each step, mean over
the ranks], "world_size", "step"}} to OUT (torch.save).

    resize_state.py OUT RUNS STAGES STEPS CONFIG [--set k=v ...]
"""

import sys

import torch

from marscale.core import dist
from marscale.engine.config import load_train_config
from marscale.engine.optim import apply_lr
from marscale.engine.trainer import Trainer


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = trainer.engine.optimizer
    if hasattr(optimizer, "_hp_optimizer_states_linked"):
        # ZeRO-1/2 step their parameter groups one at a time and link the parameters to
        # the optimizer state after the first group's step, before the other groups have
        # any state: link again now that every group has stepped.
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    state = {}
    for name, p in trainer.engine.module.named_parameters():
        if trainer.cfg.deepspeed.zero_stage == 0:  # fp32 ZeRO-0: the torch optimizer on the module itself
            state[f"{name}/fp32"] = p.detach().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                state[f"{name}/{key}"] = optimizer.state[p][key].detach().clone()
            continue
        state[f"{name}/fp32"] = safe_get_full_fp32_param(p).detach().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{name}/{key}"] = safe_get_full_optimizer_state(p, key).detach().clone()
    return state


def run_stage(stage: int, run_dir: str, steps: int, config: str, overrides: list[str]) -> dict:
    cfg = load_train_config(config, overrides + [
        f"deepspeed.zero_stage={stage}", f"run.output_dir={run_dir}", "checkpoint.resume=auto",
    ])
    trainer = Trainer(cfg)
    try:
        record = {"world_size": dist.get_world_size()}
        if trainer.resume():
            record["loaded"] = full_state(trainer)
            record["loaded_step"] = trainer.state.step
        c, b = cfg.clip, cfg.data.batch_size
        record["losses"] = []
        for _ in range(steps):
            g = torch.Generator().manual_seed(1000 * dist.get_rank() + trainer.state.step)
            apply_lr(trainer.engine.optimizer, cfg.optim.lr)
            video = torch.randint(0, 256, (b, 3, c.num_frames, c.img_size, c.img_size), generator=g, dtype=torch.uint8)
            labels = torch.randint(0, cfg.model.num_classes, (b,), generator=g)
            out = trainer.step(trainer.state.step, [{"video": video, "label": labels}])
            for parts in out.losses:
                trainer.meter.add(parts)
            record["losses"].append(trainer.meter.read(dist.get_world_size())["loss"])
            trainer.state.step += 1
        trainer.save()
        record["saved"] = full_state(trainer)
        record["step"] = trainer.state.step
        return record
    finally:
        trainer.close()


def main() -> None:
    out, runs, stages, steps, config = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    overrides = [a for a in sys.argv[6:] if a != "--set"]
    dist.init_distributed()
    dist.setup_logging()
    result = {int(s): run_stage(int(s), f"{runs}/stage{s}", steps, config, overrides) for s in stages.split(",")}
    if dist.is_main():
        torch.save(result, out)


if __name__ == "__main__":
    main()
