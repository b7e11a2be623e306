"""Run a few optimizer steps of the marscale Trainer on fixed, seeded batches.

Started by tests/test_distributed.py as one process or as 2 ranks under the `deepspeed`
launcher. Every rank builds the same global batch (clips, labels and masks from one
seed) and trains on its contiguous slice, so an N-rank run and a 1-rank run see the
same global batch. Writes per-step losses (averaged over ranks) and a checksum of the
consolidated weights to OUT (rank 0).

With --uneven, every clip draws its own mask ratio (0.25, 0.5 or 0.75), the batch runs
packed, and with 2 ranks rank 0 takes the first third of the global batch, rank 1 the
rest: batches that differ in shape, weighted by the whole step (`loss_scales`).

    fixed_batch_steps.py OUT CONFIG GLOBAL_BATCH STEPS [--uneven] [--set k=v ...]
"""

import json
import sys

import torch
import torch.distributed as torch_dist

from marscale.core import dist
from marscale.engine.config import load_train_config
from marscale.engine.optim import apply_lr
from marscale.engine.trainer import Trainer
from marscale.tokens.batches import loss_scales
from marscale.tokens.masking import make_mask
from marscale.tokens.packing import pack_mask


def main() -> None:
    out, config, global_batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    uneven = "--uneven" in sys.argv[5:]
    overrides = [a for a in sys.argv[5:] if a not in ("--set", "--uneven")]
    dist.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = global_batch // world
    overrides.append(f"data.batch_size={per_rank}")
    if uneven:
        overrides += ["masking.ratio=[0.25,0.5,0.75]", "masking.eval_ratio=0.5"]
    cfg = load_train_config(config, overrides)
    trainer = Trainer(cfg)
    grid = trainer.plan.token_grid
    g = torch.Generator().manual_seed(1234)
    losses = []
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    if uneven and world == 2:
        rows = slice(0, global_batch // 3) if rank == 0 else slice(global_batch // 3, global_batch)
    for step in range(steps):
        apply_lr(trainer.engine.optimizer, cfg.optim.lr)
        video = torch.randint(0, 256, (global_batch, 3, cfg.clip.num_frames, cfg.clip.img_size, cfg.clip.img_size),
                              generator=g, dtype=torch.uint8)
        labels = torch.randint(0, cfg.model.num_classes, (global_batch,), generator=g)
        if uneven:
            ratios = [(0.25, 0.5, 0.75)[i] for i in torch.randint(3, (global_batch,), generator=g).tolist()]
            mask = make_mask(cfg.masking, global_batch, grid, g, train=True, ratios=ratios)
            local = mask[rows]
            scales = loss_scales(
                (local.shape[0], int(local.sum())), (global_batch, int(mask.sum())), world, 1
            )
        else:
            mask = make_mask(cfg.masking, global_batch, grid, g, train=True)
            local, scales = mask[rows], (1.0, 1.0)
        batch = {"video": video[rows], "label": labels[rows]}
        parts = trainer.step.micro_step(batch, pack_mask(local), scales)
        loss = parts["loss"].detach().clone()
        if world > 1:
            torch_dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    # Consolidated weights: under ZeRO-3 gather the partitions first.
    import deepspeed

    params = list(trainer.engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=cfg.deepspeed.zero_stage == 3):
        checksum = [float(p.detach().double().sum()) for p in params]
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "checksum": checksum, "world_size": world}, f)
    trainer.close()


if __name__ == "__main__":
    main()
