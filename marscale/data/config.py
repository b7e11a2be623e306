"""`DataConfig`: where the shards are and how clips are batched, decoded and augmented.

One flat dataclass (the `data:` section of a run's YAML file). The clip itself (frames,
size, sampling, pixel statistics) is the `clip:` section (`marscale.core.clip.ClipConfig`),
shared with the model and the loss. Derived values - batches per epoch, the resolved
decoder - come from the run plan (`marscale.engine.plan`) and `marscale.data.decode`,
never from changing these fields.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal, Optional

from marscale.core.choices import check_choices

SSV2_FLIP_LABEL_PAIRS: tuple[tuple[int, int], ...] = ((86, 87), (93, 94), (166, 167))
"""Something-Something v2 classes that a horizontal flip turns into each other (0-based
indices of the official label file; the MAR reference's `label_transforms` in
`dataset/base/base_dataset.py`, `__getitem__`): 86/87 "Pulling something from left to
right" / "... from right to left", 93/94 "Pushing something from left to right" / "...
from right to left", 166/167 "Turning the camera left / right while filming something".
The SSv2 presets write these pairs out as `data.flip_label_pairs`
(tests/test_data_transforms.py checks that they match)."""

ClipWindows = Literal["shared", "independent"]
AugmentOn = Literal["auto", "worker", "device"]
BudgetUnit = Literal["visible", "cost"]


@dataclasses.dataclass
class DataConfig:
    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "num_frames": "clip.num_frames",
        "img_size": "clip.img_size",
        "sampling": "clip.sampling",
        "sampling_interval": "clip.sampling_interval",
        "mean": "clip.mean",
        "std": "clip.std",
    }

    train_shards: str
    """Training shard folder (holds `manifest.json` and the `.tar` shards)."""

    val_shards: str
    """Evaluation shard folder, same layout as `train_shards`."""

    short_side: int = 224
    """Evaluation: frames are resized so their short side is this long before cropping
    `clip.img_size` squares; must be >= `clip.img_size`."""

    batch_size: int = 8
    """Clips per rank per step (all `clips_per_video` clips of a video count); with
    `token_budget`, the most clips a micro-batch may hold."""

    token_budget: int | None = None
    """Form training batches by a budget instead of a clip count: each micro-batch takes
    clips (with the mask ratios drawn for them) while what they weigh (`budget_unit`) fits
    in this many tokens, at most `batch_size` clips (`marscale.tokens.batches`). null:
    `batch_size` clips."""

    budget_unit: BudgetUnit = "visible"
    """What a clip weighs against `token_budget`. "visible" (default): its visible encoder
    tokens; the encoder's tokens per step are then about equal, not the step's cost (the
    decoder runs on every token of every clip). "cost": its counted training FLOPs
    (`marscale.cost.counting`: encoder on its visible tokens, bridging classifier, decoder
    on all tokens, forward and backward), in the tokens of the least-masked clip: such a
    clip weighs its visible tokens, a clip masked more weighs its FLOPs relative to it.
    The same budget then holds the same clips of the least-masked ratio in both units;
    a batch costs at most the budget, and less than the group drawn next below it: the
    spread left (docs/benchmarks.md, "Token budgets: what a step costs"). The weights
    are counted at start, so a resume composes the original batches where it counts the
    same (a torch or marscale version whose counter counts otherwise forms other batches
    from the resumed step on). Needs `token_budget`."""

    clips_per_video: int = 1
    """Repeated augmentation: clips made from one decoded video, each with its own spatial
    augmentation (their temporal windows: `clip_windows`). Must divide `batch_size`; the
    clips of a video are consecutive within one batch."""

    clip_windows: ClipWindows = "shared"
    """Temporal windows of the `clips_per_video` clips of a video. "shared": one window,
    decoded once, cut into differently augmented clips (VideoMAE's repeated augmentation).
    "independent" (the MAR reference, which samples a window per clip): each clip draws
    its own window; the union of the windows' frames is read with one reader in one
    call, so the video is opened and parsed once (a backend that decodes forward, such
    as PyAV, may still decode the frames between two distant windows)."""

    test_num_clips: int = 5
    """Evaluation: temporal windows per video."""

    test_num_crops: int = 3
    """Evaluation: spatial crops per window (3: left/centre/right or top/centre/bottom
    along the long side; 1: centre)."""

    eval_batch_size: int = 8
    """Evaluation views per batch."""

    num_workers: int = 4
    """DataLoader worker processes per rank (0: decode in the training process). The
    training stream depends on it: resume with the same value."""

    decoder: Literal["auto", "decord", "pyav", "torchcodec"] = "auto"
    """Video decoder backend: auto | decord | pyav | torchcodec. "auto" takes the fastest
    installed one (PyAV, measured: see `marscale.data.decode.AUTO_ORDER`). "decord" is
    whichever of decord or decord2 is installed (both import as `decord`)."""

    decode_threads: int = 1
    """The decoder's own threads per worker (FFmpeg frame/slice threading). 1 (default):
    parallelism comes from `num_workers`, and on CPU time per clip one thread is cheapest
    (docs/benchmarks.md); more lowers a single video's latency (e.g. few workers, long
    high-resolution videos) at some CPU cost."""

    shuffle_buffer: int = 500
    """Training: samples held by each worker's shuffle buffer (encoded bytes, so about
    `shuffle_buffer` x mean video size of memory per worker). 0 or 1 disables it."""

    samples_per_epoch: Optional[int] = None
    """Videos per epoch over all ranks; None: the number of videos in the training
    manifest. Each video yields `clips_per_video` clips."""

    flip: bool = True
    """Random horizontal flip in training, drawn per clip with probability 0.5. Where labels
    depend on left/right, either list the classes that swap in `flip_label_pairs`
    (Something-Something v2 in the MAR recipe) or set False (the synthetic set)."""

    flip_label_pairs: tuple[tuple[int, int], ...] = ()
    """Classes that a horizontal flip turns into each other: for each pair (a, b), a
    flipped clip labelled a is labelled b and one labelled b is labelled a; other labels
    are kept, and unflipped clips keep theirs. Swapped in the worker for the clip whose
    flip was drawn, so before mixup. () (default): a plain flip. Something-Something v2:
    the pairs of `SSV2_FLIP_LABEL_PAIRS`, written out in the preset. Pairs are disjoint
    non-negative class indices; they describe the labels, so they may stay set with
    `flip` off (then nothing is flipped or swapped)."""

    augment_on: AugmentOn = "auto"
    """Where the training augmentation (crop, flip, RandAugment, erasing) runs: "worker"
    (the loader's CPU processes, with PIL), "device" (batched torch ops on the training
    device, `marscale.data.device_augment`: the workers only decode) or "auto": "device"
    on CUDA, "worker" otherwise. Both draw the same parameters from the same stream, so
    the data and resume do not depend on it; pixels differ by interpolation rounding
    (docs/benchmarks.md). On a CPU-only machine the device path would run the
    augmentation in the training process, on the cores the model needs, hence "worker"
    there. Evaluation crops in the workers either way."""

    rand_augment: str = "rand-m9-mstd0.5-inc1"
    """timm RandAugment config string, applied with the same ops to every frame; "" disables."""

    rand_augment_before_crop: bool = False
    """Where RandAugment runs. False (default; the MAR reference for Something-Something
    v2): on the `clip.img_size` crop, after RandomResizedCrop. True (the MAR reference for
    Kinetics-400, as VideoMAE): on the full decoded frames, before the crop; costlier in
    proportion to the frame's area. Either way the ops and magnitudes are the same on
    every frame of a clip. No effect when `rand_augment` is ""."""

    random_erasing: float = 0.25
    """Probability of erasing one rectangle (the same on every frame of a clip)."""

    rrc_scale: tuple = (0.08, 1.0)
    """RandomResizedCrop area range, as a fraction of the frame."""

    rrc_ratio: tuple = (0.75, 1.3333)
    """RandomResizedCrop aspect-ratio (width / height) range."""

    mixup: float = 0.8
    """Mixup alpha (0 disables)."""

    cutmix: float = 1.0
    """CutMix alpha (0 disables)."""

    label_smoothing: float = 0.1
    """Label smoothing of the soft targets."""

    seed: int = 0
    """Root of every random stream of the loader (with epoch, rank and worker)."""

    def __post_init__(self) -> None:
        check_choices(self)
        # YAML gives lists; keep tuples so configs compare and hash the same way.
        for name in ("rrc_scale", "rrc_ratio"):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        self.flip_label_pairs = check_flip_label_pairs(self.flip_label_pairs)

        if not self.train_shards or not self.val_shards:
            raise ValueError("train_shards and val_shards must name shard folders (each with a manifest.json)")
        positive = (
            "short_side",
            "batch_size",
            "clips_per_video",
            "test_num_clips",
            "test_num_crops",
            "eval_batch_size",
            "decode_threads",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.clips_per_video:
            raise ValueError(
                f"clips_per_video={self.clips_per_video} must divide batch_size={self.batch_size} "
                f"(a batch holds whole videos); e.g. set batch_size to "
                f"{self.clips_per_video * max(1, self.batch_size // self.clips_per_video)}"
            )
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"token_budget must be >= 1 visible tokens, or null; got {self.token_budget}")
        if self.budget_unit != "visible" and self.token_budget is None:
            raise ValueError(
                f"budget_unit={self.budget_unit!r} weighs clips against token_budget, which is null: set "
                f"token_budget (e.g. batch_size x the visible tokens of a clip), or drop budget_unit"
            )
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 decodes in the main process), got {self.num_workers}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0 (0 disables shuffling), got {self.shuffle_buffer}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(
                f"samples_per_epoch must be >= 1, or null to take the count from the manifest; "
                f"got {self.samples_per_epoch}"
            )
        if self.rand_augment and not self.rand_augment.startswith("rand"):
            raise ValueError(
                f"rand_augment={self.rand_augment!r} is not a timm RandAugment string "
                f"(e.g. 'rand-m9-mstd0.5-inc1'); use '' to disable it"
            )
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ValueError(f"random_erasing is a probability in [0, 1], got {self.random_erasing}")
        if len(self.rrc_scale) != 2 or not 0.0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1.0:
            raise ValueError(f"rrc_scale must be (min, max) with 0 < min <= max <= 1, got {self.rrc_scale}")
        if len(self.rrc_ratio) != 2 or not 0.0 < self.rrc_ratio[0] <= self.rrc_ratio[1]:
            raise ValueError(f"rrc_ratio must be (min, max) with 0 < min <= max, got {self.rrc_ratio}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError(f"mixup and cutmix are Beta alphas >= 0 (0 disables); got {self.mixup}, {self.cutmix}")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(
                f"mixup/cutmix pair each clip with the reversed batch and need an even batch_size, "
                f"got {self.batch_size}; change batch_size or set mixup and cutmix to 0"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def flip_label_map(self) -> dict[int, int]:
        """label -> label after a horizontal flip, for the labels that change (both ways)."""
        return {**dict(self.flip_label_pairs), **{b: a for a, b in self.flip_label_pairs}}

    @property
    def videos_per_batch(self) -> int:
        """Distinct videos in a training batch: batch_size / clips_per_video."""
        return self.batch_size // self.clips_per_video

    @property
    def views_per_video(self) -> int:
        """Evaluation views of one video: test_num_clips x test_num_crops."""
        return self.test_num_clips * self.test_num_crops


def resolve_augment_on(augment_on: AugmentOn, device_type: str) -> Literal["worker", "device"]:
    """Where the training augmentation runs for `augment_on` on a `device_type` ("cuda",
    "cpu", ...) training device: "auto" is "device" on CUDA, "worker" elsewhere."""
    if augment_on == "auto":
        return "device" if device_type == "cuda" else "worker"
    return augment_on


def check_flip_label_pairs(pairs) -> tuple[tuple[int, int], ...]:
    """`pairs` as a tuple of (a, b) int pairs; ValueError unless each has two distinct
    non-negative class indices and no class is in two pairs."""
    out, seen = [], set()
    for pair in pairs:
        pair = tuple(pair)
        if len(pair) != 2 or not all(isinstance(c, int) and not isinstance(c, bool) for c in pair):
            raise ValueError(f"flip_label_pairs holds [a, b] pairs of class indices, e.g. [[86, 87]]; got {pair!r}")
        a, b = pair
        if a < 0 or b < 0 or a == b:
            raise ValueError(f"flip_label_pairs: {pair} must be two different class indices >= 0")
        repeated = seen & {a, b}
        if repeated:
            raise ValueError(
                f"flip_label_pairs: class {min(repeated)} is in more than one pair; each class swaps with one other"
            )
        seen |= {a, b}
        out.append((a, b))
    return tuple(out)
