"""The rows of `marscale compare`: counted cost and measured time of training configs, and
their ratios to one reference config (full-token ViT-H by default).

Numbers only; `marscale.commands.compare` lays them out and `marscale.cost.chart`
draws them. Counted values come from `marscale.cost.counting.count_model` (the same counts as
`marscale cost`, at each config's own clip), measured ones from
`marscale.engine.measure` (the real engine on synthetic tensors).

A config is named by an *entry*: a preset name or YAML file, optionally followed by
overrides for that entry alone, separated by colons:

    mar_vit_l_k400                       MAR ViT-L, 50% (the preset)
    mar_vit_l_k400:masking.ratio=0.75    the same at 75%
    vit_h_k400:deepspeed.zero_stage=3    full-token ViT-H under ZeRO-3

What enters each ratio (every ratio is this row's value / the reference's):
    view      counted MACs of one inference view (encoder + bridging classifier or head)
    video     view x the config's test views (clips x crops)
    train     counted FLOPs of one training clip, forward + backward (MAR: with the
              decoder); no recomputation, no optimizer
    train forward / train backward   its two parts (backward: about 2x forward)
    optimizer params   parameters AdamW updates (MAR: + decoder and bridging classifier)
    schedule  train x clips in the published schedule (videos x epochs x clips per video)
    measured train   seconds per training clip on the engine: forward, loss, backward,
                     optimizer step, activation recomputation by the policy, DeepSpeed
    measured forward / backward / optimizer / input   the training step's phases
                     (`marscale.engine.phases`), seconds per clip; input = masks + data
    measured view    seconds per inference view (forward, evaluation mask)
    measured memory  peak memory while building, training and inferring
    device-hours     measured seconds per training clip x clips in the schedule

Activation recomputation (`model.grad_checkpointing`, encoder blocks recomputed in
backward) is set by one policy for every row (`CHECKPOINTING`): the presets differ
(full ViT-H recomputes all 32 blocks, MAR ViT-L none), and a measured ratio of two rows
that recompute differently includes the recomputation.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal, Sequence

from marscale.cost.counting import count_model
from marscale.cost.table import DISPLAY_NAMES
from marscale.engine.config import TrainConfig, load_train_config
from marscale.engine.phases import PHASES
from marscale.model import VARIANTS

if TYPE_CHECKING:  # measuring imports DeepSpeed, which captures stdout at import: the command imports it late
    from marscale.engine.measure import Measurement

DEFAULT_ENTRIES = (
    "vit_b_k400",
    "mar_vit_b_k400",
    "vit_l_k400",
    "mar_vit_l_k400",
    "mar_vit_l_k400:masking.ratio=0.75",
    "vit_h_k400",
    "mar_vit_h_k400",
)
"""Full-token ViT-B/L/H and MAR ViT-B 50%, ViT-L 50% and 75%, ViT-H 50%: the presets."""
DEFAULT_REFERENCE = "vit_h_k400"

K400_TRAIN_VIDEOS = 240_000
"""Kinetics-400 training videos, about 240k (copies differ by the videos still online)."""

PUBLISHED_TOP1 = {("vit", "vit_b"): 81.5, ("vit", "vit_l"): 85.2, ("vit", "vit_h"): 86.6}
"""Kinetics-400 top-1 of full-token fine-tuning, VideoMAE (16 frames, 5 clips x 3 crops);
valid for 400 classes at 16 x 224 x 224. MAR's own top-1 figures are not in this table:
pass them to `marscale compare --top1 LABEL=VALUE` if you have them."""
TOP1_SOURCE = "VideoMAE, Kinetics-400, 16x5x3 views"

PAPER_SAVING = 0.53
"""The MAR paper: MAR cuts ViT compute by 53%."""
PAPER_VIT_L_VS_H = 0.145
"""The MAR paper: MAR ViT-L costs 14.5% of ViT-H."""


Checkpointing = Literal["none", "all", "config"]
CHECKPOINTING: dict[str, str] = {
    "none": "no encoder block recomputed, every row",
    "all": "every encoder block recomputed, every row",
    "config": "each config's own model.grad_checkpointing",
}
"""Activation-recomputation policies of `marscale compare --checkpointing`. `none` (the
default) and `all` give both sides of a ratio the same policy; `config` keeps the
presets' own, which differ (ViT-H 32 of 32 blocks, MAR ViT-L 0 of 24)."""


def apply_checkpointing(cfg: TrainConfig, policy: Checkpointing) -> TrainConfig:
    """`cfg` with the encoder blocks that `policy` recomputes (`model.grad_checkpointing`)."""
    depth = VARIANTS[cfg.model.variant].encoder.depth
    blocks = {"none": 0, "all": depth, "config": cfg.model.grad_checkpointing}[policy]
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, grad_checkpointing=blocks))


@dataclasses.dataclass(frozen=True)
class Entry:
    """A config named on the command line: a preset or file, plus its own overrides."""

    text: str
    config: str
    overrides: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "Entry":
        config, *overrides = text.split(":")
        if not config:
            raise ValueError(f"entry {text!r} names no config (expected PRESET[:key=value...])")
        return cls(text, config, tuple(overrides))

    def load(self, common: Sequence[str] = ()) -> TrainConfig:
        """The config with the common overrides, then this entry's."""
        return load_train_config(self.config, [*common, *self.overrides])


def label(cfg: TrainConfig) -> str:
    """`ViT-L full`, `MAR ViT-L 50%`."""
    name = DISPLAY_NAMES.get(cfg.model.variant, cfg.model.variant)
    ratio = cfg.masking.ratio_at(train=True)
    if cfg.model.arch == "vit" or ratio == 0:
        return f"{name} full" if cfg.model.arch == "vit" else f"MAR {name} 0%"
    return f"MAR {name} {ratio * 100:.0f}%"


@dataclasses.dataclass
class CompareRow:
    """One config: counted cost, the published schedule, measurement (if any) and ratios."""

    entry: str
    label: str
    variant: str
    arch: str
    mask_ratio: float
    """Training mask ratio (the mean with per-clip ratios); 0 for full tokens."""
    clip: str
    """frames x height x width."""
    tokens: int
    visible_tokens: int
    """Tokens the encoder sees in training."""
    params_inference: int
    params_training: int
    views: int
    """Test views per video (clips x crops)."""
    macs_view: int
    """Counted MACs (the papers' "FLOPs") of one inference view."""
    macs_video: int
    macs_train_clip: int
    """Counted MACs of one training clip, forward + backward (hardware FLOPs: 2x)."""
    macs_train_forward: int
    """Its forward: encoder, classifier and (MAR) the reconstruction decoder."""
    macs_train_backward: int
    """Its backward (`macs_train_clip` - `macs_train_forward`)."""
    epochs: int
    clips_per_video: int
    schedule_videos: int
    schedule_clips: int
    """Training clips in the schedule: videos x epochs x clips per video."""
    schedule_macs: int
    published_top1: float | None
    top1_source: str
    zero_stage: int
    precision: str
    checkpointing: str
    """The recomputation policy the row was built under (`CHECKPOINTING`)."""
    grad_checkpointing: int
    """Encoder blocks recomputed in backward (of `encoder_depth`)."""
    encoder_depth: int
    measured: Measurement | None = None
    not_measured: str = ""
    """Why there is no measurement (empty when measured)."""
    error: str = ""
    """The error measuring raised, `Type: first line` (empty when none; out of memory is
    a reason in `not_measured`, not an error)."""
    ratios: dict[str, float | None] = dataclasses.field(default_factory=dict)
    """This row / the reference row, by term (`RATIO_TERMS`); None where either side lacks it."""

    @property
    def recompute(self) -> str:
        """`0/24 blocks (none)`: what the row recomputes, and under which policy."""
        return f"{self.grad_checkpointing}/{self.encoder_depth} blocks ({self.checkpointing})"

    @property
    def device_hours(self) -> float | None:
        """Measured seconds per training clip x the schedule's clips, in hours on one device."""
        return None if self.measured is None else self.measured.seconds_per_train_clip * self.schedule_clips / 3600

    @property
    def phase_seconds_per_clip(self) -> dict[str, float] | None:
        """Measured median seconds of each training phase (`PHASES`) per clip."""
        m = self.measured
        return None if m is None else {p: s / m.batch for p, s in m.phase_median_s.items()}

    @property
    def seconds_per_video(self) -> float | None:
        """Measured inference seconds per test video (views x seconds per view)."""
        return None if self.measured is None else self.measured.seconds_per_view * self.views

    def flat(self) -> dict:
        """One flat record for CSV and JSON (measured fields None when not measured)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("measured", "ratios")}
        m = self.measured
        out.update(
            device=m.device if m else None,
            batch=m.batch if m else None,
            warmup_steps=m.warmup if m else None,
            timed_steps=m.steps if m else None,
            clock=m.clock if m else None,
            train_step_median_s=m.train_median_s if m else None,
            train_step_spread_s=m.train_spread_s if m else None,
            train_clips_per_s=m.train_clips_per_s if m else None,
            infer_clips_per_s=m.infer_clips_per_s if m else None,
            train_step_s=list(m.train_step_s) if m else None,
            train_step_wall_s=list(m.train_wall_s) if m else None,
            **{f"train_{p}_median_s": m.phase_median_s.get(p) if m else None for p in PHASES},
            train_phase_steps_s=list(m.train_phase_s) if m else None,
            trained_params=m.trained_params if m else None,
            infer_step_wall_s=list(m.infer_wall_s) if m else None,
            peak_memory_gib=m.peak_memory_bytes / 2**30 if m else None,
            achieved_tflops=m.achieved_tflops if m else None,
            mfu=m.mfu if m else None,
            mfu_peak=m.peak.name if m else None,
            mfu_peak_tflops=m.peak.tflops if m else None,
            device_hours=self.device_hours,
            seconds_per_video=self.seconds_per_video,
        )
        out.update({f"ratio_{k}": v for k, v in self.ratios.items()})
        return out


RATIO_TERMS = {
    "view": "counted MACs per inference view",
    "video": "counted MACs per test video (views x per view)",
    "train": "counted FLOPs per training clip (fwd + bwd; MAR with decoder)",
    "schedule": "counted FLOPs of the schedule (per clip x videos x epochs x clips per video)",
    "measured_train": "measured seconds per training clip (fwd, bwd, optimizer, recompute, DeepSpeed)",
    "measured_view": "measured seconds per inference view",
    "measured_memory": "measured peak memory",
    "measured_schedule": "measured device-hours of the schedule",
    "train_forward": "counted MACs of a training clip's forward (MAR with decoder)",
    "measured_forward": "measured seconds of the training step's forward and loss, per clip",
    "train_backward": "counted MACs of a training clip's backward",
    "measured_backward": "measured seconds of the training step's backward (with recomputation), per clip",
    "optimizer_params": "parameters the optimizer updates",
    "measured_optimizer": "measured seconds of the optimizer step (DeepSpeed: reduction, clipping, AdamW), per clip",
    "measured_input": "measured seconds of masks and data (copy, normalise, mixup) in the training step, per clip",
}
"""Each ratio and what enters it, in the order they are printed."""
PHASE_TERMS = ("train_forward", "measured_forward", "train_backward", "measured_backward", "optimizer_params",
               "measured_optimizer", "measured_input")
"""The training step term by term (the phase table), left out of the lines set beside
the paper's figures (parts of a cost, not a cost)."""


def counted_row(entry: Entry, cfg: TrainConfig, videos: int, top1: dict[str, float],
                checkpointing: Checkpointing = "config") -> CompareRow:
    """The counted half of a row (no measurement yet). `cfg` is the config as measured:
    `apply_checkpointing(cfg, checkpointing)` already applied."""
    ratio = cfg.masking.ratio_at(train=True)
    # Per-clip ratios: `ratio` is their mean, which need not mask whole cell slots; it is
    # counted with random masking's rounding, as a summary of the mix.
    count = count_model(cfg.model, cfg.clip, ratio, None if cfg.masking.per_clip else cfg.masking)
    eval_count = count_model(cfg.model, cfg.clip, cfg.masking.ratio_at(train=False), cfg.masking)
    name = label(cfg)
    c = cfg.clip
    standard = (c.num_frames, c.img_size, cfg.model.num_classes) == (16, 224, 400)
    published = top1.get(name, PUBLISHED_TOP1.get((cfg.model.arch, cfg.model.variant)) if standard else None)
    views = cfg.data.views_per_video
    clips = videos * cfg.optim.epochs * cfg.data.clips_per_video
    return CompareRow(
        entry=entry.text,
        label=name,
        variant=cfg.model.variant,
        arch=cfg.model.arch,
        mask_ratio=ratio,
        clip=f"{c.num_frames}x{c.img_size}x{c.img_size}",
        tokens=count.tokens,
        visible_tokens=count.visible_tokens,
        params_inference=count.params_inference,
        params_training=count.params_training,
        views=views,
        macs_view=eval_count.macs_inference,
        macs_video=views * eval_count.macs_inference,
        macs_train_clip=count.macs_training,
        macs_train_forward=count.macs_training_forward,
        macs_train_backward=count.macs_backward,
        epochs=cfg.optim.epochs,
        clips_per_video=cfg.data.clips_per_video,
        schedule_videos=videos,
        schedule_clips=clips,
        schedule_macs=clips * count.macs_training,
        published_top1=published,
        top1_source=("given" if name in top1 else TOP1_SOURCE) if published is not None else "",
        zero_stage=cfg.deepspeed.zero_stage,
        precision=cfg.deepspeed.precision,
        checkpointing=checkpointing,
        grad_checkpointing=cfg.model.grad_checkpointing,
        encoder_depth=VARIANTS[cfg.model.variant].encoder.depth,
    )


def checkpointing_caption(rows: list[CompareRow]) -> str:
    """One line on the recomputation behind the measured rows (the chart's caption)."""
    policies = sorted({r.checkpointing for r in rows})
    if policies in (["none"], ["all"]):
        return f"activation recomputation: {CHECKPOINTING[policies[0]]} (--checkpointing {policies[0]})"
    shares = {r.grad_checkpointing / r.encoder_depth for r in rows}
    return ("activation recomputation: " + ", ".join(f"{r.label} {r.recompute}" for r in rows)
            + (" (a measured ratio of rows that recompute differently includes the recomputation)"
               if len(shares) > 1 else ""))


def _values(row: CompareRow) -> dict[str, float | None]:
    m = row.measured
    phases = row.phase_seconds_per_clip or {}
    return {
        "view": row.macs_view,
        "video": row.macs_video,
        "train": row.macs_train_clip,
        "schedule": row.schedule_macs,
        "measured_train": m.seconds_per_train_clip if m else None,
        "train_forward": row.macs_train_forward,
        "measured_forward": phases.get("forward"),
        "train_backward": row.macs_train_backward,
        "measured_backward": phases.get("backward"),
        "optimizer_params": row.params_training,
        "measured_optimizer": phases.get("optimizer"),
        "measured_input": phases["masks"] + phases["data"] if phases else None,
        "measured_view": m.seconds_per_view if m else None,
        "measured_memory": m.peak_memory_bytes if m else None,
        "measured_schedule": row.device_hours,
    }


def fill_ratios(rows: list[CompareRow], reference: CompareRow) -> None:
    """Set every row's `ratios` against `reference` (which gets 1.0 wherever it has a value)."""
    ref = _values(reference)
    for row in rows:
        mine = _values(row)
        row.ratios = {k: (mine[k] / ref[k] if mine[k] is not None and ref[k] else None) for k in RATIO_TERMS}


def find_reference(rows: list[CompareRow], name: str) -> CompareRow:
    """The row whose entry or label is `name`."""
    for row in rows:
        if name in (row.entry, row.label):
            return row
    raise ValueError(f"reference {name!r} is not one of the compared configs: {', '.join(r.entry for r in rows)}")


@dataclasses.dataclass(frozen=True)
class PaperTerm:
    """One counted or measured ratio set beside one of the paper's two figures."""

    claim: str
    """`saving` (MAR cuts compute by 53%) or `vit_l_vs_h` (MAR ViT-L costs 14.5% of ViT-H)."""
    name: str
    value: float


def paper_terms(rows: list[CompareRow], reference: CompareRow) -> list[PaperTerm]:
    """The ratios that bear on the paper's figures, from these rows.

    saving: 1 - MAR / full-token of the same size and clip, per inference view and per
    training clip, counted and measured. vit_l_vs_h: every ratio of a MAR ViT-L row to a
    full-token ViT-H reference.
    """
    terms = []
    full = {(r.variant, r.clip): r for r in rows if r.arch == "vit"}
    for r in rows:
        base = full.get((r.variant, r.clip))
        if r.arch != "mar" or base is None:
            continue
        pairs = [("inference per view, counted", r.macs_view, base.macs_view),
                 ("training per clip, counted", r.macs_train_clip, base.macs_train_clip)]
        if r.measured and base.measured:
            pairs += [
                ("inference per view, measured", r.measured.seconds_per_view, base.measured.seconds_per_view),
                ("training per clip, measured", r.measured.seconds_per_train_clip,
                 base.measured.seconds_per_train_clip),
            ]
        terms += [PaperTerm("saving", f"{r.label} vs {base.label}, {what}", 1 - a / b) for what, a, b in pairs]
    if reference.arch == "vit" and reference.variant == "vit_h":
        for r in rows:
            if r.arch == "mar" and r.variant == "vit_l" and r.clip == reference.clip:
                terms += [
                    PaperTerm("vit_l_vs_h", f"{r.label} / {reference.label}: {RATIO_TERMS[k]}", v)
                    for k, v in r.ratios.items() if v is not None and k not in PHASE_TERMS + ("measured_memory",)
                ]
    return terms


# ------------------------------------------------------------------- what to measure

CPU_BUILD_SECONDS_PER_PARAM = 1.5e-7
"""Building the engine on a CPU: about 15 s for ViT-B's 100M trained parameters (measured)."""
TRAIN_BYTES_PER_PARAM = 20
"""fp32 master weights, gradients and two AdamW moments (16 bytes) plus a 16-bit copy."""


def estimate_seconds(row: CompareRow, batch: int, steps: int, tflops: float, device_type: str) -> float:
    """About how long measuring `row` takes at `tflops` achieved (the rate of a config
    measured before): `steps` training and inference steps of `batch` clips, plus the build."""
    train = batch * 2 * row.macs_train_clip / (tflops * 1e12)
    infer = batch * 2 * row.macs_view / (tflops * 1e12)
    build = row.params_training * CPU_BUILD_SECONDS_PER_PARAM if device_type == "cpu" else 0.0
    return build + steps * (train + infer)


def estimate_memory_bytes(row: CompareRow, cfg: TrainConfig, batch: int) -> int:
    """About the training memory of `row`: optimizer state and weights, plus activations
    (about 40 bytes per visible token and width unit per encoder block, fewer when
    recomputed)."""
    enc = VARIANTS[cfg.model.variant].encoder
    stored = max(1, enc.depth - cfg.model.grad_checkpointing)
    activations = 40 * batch * row.visible_tokens * enc.embed_dim * stored
    return TRAIN_BYTES_PER_PARAM * row.params_training + activations
