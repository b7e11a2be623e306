"""Running one rank's training to its exit status, and what a lost peer means for it.

A collective that fails because another rank is gone (its node died or dropped off the
network: the backend reports it at once, or after `run.collective_timeout_s`) raises
`dist.PeerLost`, logged on every surviving rank with the peer, the step and the
checkpoint to resume from; `marscale train` exits with status `dist.EXIT_PEER_LOST` (69).
"""

from __future__ import annotations

import logging

from marscale.checkpoints import folders as ckpt
from marscale.core import dist
from marscale.engine.config import TrainConfig
from marscale.engine.trainer import Trainer

logger = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> int:
    """Train `cfg` in this process (one rank of the job). Returns the exit status (0, or
    `trainer.EXIT_PREEMPTED`); raises `dist.PeerLost` when a peer is lost."""
    trainer = None
    try:
        trainer = Trainer(cfg)
        return trainer.fit()
    except Exception as e:
        lost = dist.lost_peer(e)
        if lost is None:
            raise
        step = trainer.state.step if trainer is not None else 0
        newest = ckpt.latest_checkpoint(ckpt.checkpoints_root(cfg.run.output_dir))
        error = dist.PeerLost(
            f"{lost}. Stopped at step {step}; the newest complete checkpoint is {newest or 'none'}: start the job "
            f"again on every node with --resume auto (on fewer or more nodes too)"
        )
        logger.error("%s", error)
        raise error from e
    finally:
        if trainer is not None:
            trainer.close()
