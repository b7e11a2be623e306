"""The pre-flight: plan a run and check, before its first step, everything that can be checked then.

A problem found after hours of training (an evaluation set with fewer shards than
readers, a disk too full for the first checkpoint) costs the run; found at start it
costs a restart. `preflight` collects every problem and raises one `PreflightError`
that lists them all:

    shard sets     both manifests load; every shard file they list exists
    classes        neither set has more classes than model.num_classes; the two sets name
                   the classes they share alike (label i is the same class in both)
    plan           the run plan computes (an epoch holds at least one optimizer step)
    decoder        data.decoder is installed
    evaluation     a shard for every reader (ranks x workers): the evaluation loader's rule
    training only  model.pretrained exists (hf:ORG/NAME: in the local Hub cache);
                   checkpoint.resume names an intact checkpoint
                   (chosen here, once, and kept in the plan; the trainer then checks it was
                   written for this model); run.output_dir can be written and has room for
                   one checkpoint (`checkpoint_bytes`); with per-clip ratios (packed
                   batches) model.attention trains on this device at deepspeed.precision
                   (flash_varlen and torch_varlen compute in fp16/bf16 only)

`marscale eval` runs the checks that apply to it (training=False): it still plans the
run, so the training manifest must load, but its shard files are not needed.

Collective: the ranks agree before any of them raises. A rank whose own checks passed
while another's failed (a file missing on one node's disk) raises too, instead of
waiting for the failed rank in DeepSpeed's first collective.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import torch
import torch.distributed as torch_dist

from marscale.checkpoints.folders import checkpoint_bytes, resolve_resume
from marscale.core import dist
from marscale.core.clip import num_tokens
from marscale.cost.counting import count_visible
from marscale.data import build_eval_loader, resolve_decoder
from marscale.data.shards import ShardSet
from marscale.engine.config import PRECISION_DTYPES, Precision, TrainConfig
from marscale.engine.plan import RunPlan, class_problem, make_plan
from marscale.model.attention import resolve_backend, training_problem
from marscale.weights.hf import locate
from marscale.weights.layouts import CheckpointError


class PreflightError(ValueError):
    """Problems found before the first step; the message lists every one of them."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) found before the first step:\n{lines}")


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.2f} GB"


def _existing_parent(path: str) -> str:
    """`path` itself if it exists, else its nearest existing ancestor (what makedirs starts from)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _load(root: str, problems: list[str]) -> ShardSet | None:
    try:
        return ShardSet.load(root)
    except (FileNotFoundError, ValueError) as e:
        problems.append(str(e))
        return None


def _missing_shards(shard_set: ShardSet) -> str | None:
    missing = [os.path.basename(p) for p in shard_set.shards if not os.path.isfile(p)]
    if not missing:
        return None
    return (
        f"{shard_set.root}: {len(missing)} of the {len(shard_set.shards)} shard files its manifest lists "
        f"are missing, e.g. {', '.join(missing[:3])}"
    )


def _class_names_problem(train_set: ShardSet, val_set: ShardSet) -> str | None:
    """Label i must be the same class in both sets (a folder conversion of a split that
    lacks one class, or lists converted without --classes, shifts the names)."""
    differ = [i for i, (a, b) in enumerate(zip(train_set.class_names, val_set.class_names)) if a != b]
    if not differ:
        return None
    i = differ[0]
    return (
        f"{train_set.root} and {val_set.root} name {len(differ)} classes differently, e.g. class {i} is "
        f"{train_set.class_names[i]!r} in one and {val_set.class_names[i]!r} in the other; convert both "
        f"with the same --classes (or --labels)"
    )


def _pretrained_problem(name: str) -> str | None:
    """Why model.pretrained `name` cannot be read, or None: a path that does not exist, or
    an hf: name not in the local Hub cache (the error says how to download it)."""
    try:
        path = locate(name)
    except CheckpointError as e:
        return f"model.pretrained: {e}"
    return None if os.path.exists(path) else f"model.pretrained {name!r} does not exist"


def _checkpoint_space_problem(cfg: TrainConfig) -> str | None:
    """Whether run.output_dir can take one checkpoint (of the size `checkpoint_bytes` estimates)."""
    if not cfg.checkpoint.every_steps and not cfg.checkpoint.save_at_end:
        return None
    where = _existing_parent(cfg.run.output_dir)
    if not os.path.isdir(where):
        return f"run.output_dir {cfg.run.output_dir!r}: {where} is a file, not a folder"
    if not os.access(where, os.W_OK | os.X_OK):
        return f"run.output_dir {cfg.run.output_dir!r}: {where} is not writable"
    params = count_visible(cfg.model, cfg.clip, num_tokens(cfg.clip, cfg.model.patch_size)).params_training
    need = checkpoint_bytes(params, cfg.deepspeed.precision, cfg.deepspeed.zero_stage)
    free = shutil.disk_usage(where).free
    if free >= need:
        return None
    return (
        f"run.output_dir {cfg.run.output_dir!r}: a checkpoint ({params / 1e6:.1f}M parameters, "
        f"{cfg.deepspeed.precision}, ZeRO-{cfg.deepspeed.zero_stage}) needs about {_gb(need)}, "
        f"{_gb(free)} free on {where}"
    )


def attention_problem(name: str, device: torch.device | str, precision: Precision) -> str | None:
    """Why model.attention `name` cannot train packed batches on `device` at
    deepspeed.precision `precision`, or None (a pure function: the device is data)."""
    try:
        backend = resolve_backend(name, device)
    except RuntimeError as e:
        return str(e)
    problem = training_problem(backend, device, PRECISION_DTYPES[precision])
    if problem and backend != name:  # say what `auto` chose, or the line names a backend nobody set
        problem = problem.replace(
            f"model.attention={backend}", f"model.attention={name} ({backend} on {torch.device(device).type})", 1
        )
    return problem


def _agree(problems: list[str]) -> list[str]:
    """Collective: this rank's problems, or one line naming the ranks that failed when
    only others did."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return problems
    # NCCL reduces device tensors only; gloo host tensors.
    on_gpu = torch_dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    failed = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
    failed[dist.get_rank()] = len(problems)
    torch_dist.all_reduce(failed)
    others = [rank for rank, n in enumerate(failed.tolist()) if n and rank != dist.get_rank()]
    if problems or not others:
        return problems
    return [f"the pre-flight failed on rank(s) {others}: see their errors"]


def preflight(cfg: TrainConfig, world_size: int, *, training: bool = True) -> RunPlan:
    """The run plan of `cfg` on `world_size` ranks, once every check passes (collective).

    training=False: the checks that apply to `marscale eval` (see the module docstring).
    Raises PreflightError listing every problem found.
    """
    problems: list[str] = []
    train_set = _load(cfg.data.train_shards, problems)
    val_set = _load(cfg.data.val_shards, problems)
    found: list[str | None] = []  # each check's problem, or None
    if training and train_set is not None:
        found.append(_missing_shards(train_set))
    if val_set is not None:
        found += [_missing_shards(val_set), class_problem(val_set, cfg.model.num_classes)]
        if train_set is not None:
            found.append(_class_names_problem(train_set, val_set))

    plan = None
    if train_set is not None and val_set is not None:
        try:  # this also checks the training set's classes against the model's
            plan = make_plan(cfg, world_size, train_set, val_set)
        except ValueError as e:
            found.append(str(e))

    try:
        resolve_decoder(cfg.data.decoder)
    except (RuntimeError, ValueError) as e:
        found.append(str(e))
    else:
        if val_set is not None:  # (the evaluation loader resolves the decoder too: only now)
            try:
                build_eval_loader(
                    cfg.data, cfg.clip, val_set, rank=0, world_size=world_size, num_classes=cfg.model.num_classes
                )
            except ValueError as e:
                found.append(str(e))

    resume = None
    if training:
        if cfg.model.pretrained:
            found.append(_pretrained_problem(cfg.model.pretrained))
        try:  # once per start: every file of the checkpoint is hashed (`check_checkpoint`)
            resume = resolve_resume(cfg.checkpoint.resume, cfg.run.output_dir)
        except (FileNotFoundError, ValueError) as e:
            found.append(f"checkpoint.resume: {e}")
        found.append(_checkpoint_space_problem(cfg))
        if cfg.masking.per_clip:  # packed batches: the attention backend must train here
            device = dist.resolve_device(cfg.run.device)
            found.append(attention_problem(cfg.model.attention, device, cfg.deepspeed.precision))

    problems = _agree(problems + [p for p in found if p])
    if problems:
        raise PreflightError(problems)
    assert plan is not None  # no problem: both sets loaded and the plan computed
    return dataclasses.replace(plan, resume_checkpoint=resume)
