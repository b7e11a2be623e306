"""`marscale predict`: classify video files with trained weights, as evaluation would see them.

    marscale predict VIDEO... --checkpoint model.pt|RUN|RUN/checkpoints/step-N
                     [--mask-ratio R] [--views N|CLIPSxCROPS] [--top-k K] [--format table|json]

A VIDEO is a file, a folder (its video files, recursively, in name order) or a `.txt` list
of paths (one per line, relative to the list's folder). Each video is cut into the views
evaluation cuts (`decode_views`: the stored config's frame sampling, short-side resize and
crops, `data.test_num_clips x data.test_num_crops` unless `--views` says otherwise), every
view is scored with the evaluation mask, and the views' softmax scores are averaged, as
`marscale.engine.evaluate` averages them per video.

The checkpoint becomes a model and a config exactly as in `marscale eval` (the same
functions, `marscale.commands.eval`), so every layout eval reads works here. The mask
ratio defaults to the one evaluation uses (`masking.eval_ratio`, else the trained ratio;
0 for a full-token model); any other ratio is checked before a weight is read, and a
full-token model is then masked as `marscale eval --mask-ratios` masks it.

Per video: the top-k classes with their probabilities, the seconds it took (reading,
decoding and scoring; the first video includes warm-up) and the GFLOPs spent on it
(inference multiply-accumulates of all its views, counted by `marscale.cost.counting`).
Class names are the ones stored with the weights (checkpoints and exports carry their
training manifest's); for weights without them, the manifest of the config's
`data.val_shards` (or `train_shards`); without either, classes are shown by index and the
output says so.

A file that cannot be read or decoded is one line on stderr naming it and the decoder's
error, and the other videos go on; the exit status is 78 (bad input) when no video could
be classified, 0 otherwise. Runs on the GPU when there is one (`--device`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from marscale.commands.common import add_config_arguments
from marscale.core import exits

if TYPE_CHECKING:
    from marscale.core.clip import ClipConfig
    from marscale.data import DataConfig
    from marscale.engine.config import TrainConfig
    from marscale.tokens.masking import MaskingConfig

logger = logging.getLogger(__name__)

LIST_SUFFIX = ".txt"
"""A VIDEO argument with this suffix is a list of videos, one path per line."""
# Shards store only the first few (`shards.VIDEO_EXTENSIONS`); users' folders also hold the
# containers the decoders read that the converter re-encodes.
FOLDER_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v", "mpg", "mpeg", "flv", "wmv", "asf", "ogv", "3gp", "ts")
"""Files of a folder argument that are read as videos (other files are left alone)."""
DEFAULT_TOP_K = 5
GFLOPS_NOTE = (
    "GFLOPs: inference per video, all its views (encoder + classifier), counted by marscale.cost.counting; "
    "1e9 multiply-accumulates, the papers' convention (hardware FLOPs are 2x)"
)
SECONDS_NOTE = "s/video: reading, decoding and scoring one video (the first one includes warm-up)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "videos", nargs="+", metavar="VIDEO", help="video files, folders of videos or .txt lists of them"
    )
    parser.add_argument(
        "--checkpoint", required=True,
        help="exported weights (.pt from `marscale export`, or any layout `marscale eval` reads) or a "
        "DeepSpeed checkpoint folder (step-N, or a run folder: its newest complete checkpoint)",
    )
    add_config_arguments(
        parser, required=False,
        help_text="YAML config (file or preset name); default: the config stored in the checkpoint",
    )
    parser.add_argument(
        "--mask-ratio", type=float, default=None, metavar="R",
        help="share of tokens masked at inference, in [0, 1) (default: the evaluation ratio of the config: "
        "masking.eval_ratio, else the trained ratio; 0 for a full-token model)",
    )
    parser.add_argument(
        "--views", default=None, metavar="N|CLIPSxCROPS",
        help="views per video: N temporal clips with one centre crop each, or CLIPSxCROPS (e.g. 5x3); "
        "default: data.test_num_clips x data.test_num_crops of the config",
    )
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="classes shown per video (default 5)")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output (default: table)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="where the model runs (auto: the GPU when there is one)",
    )


# ----------------------------------------------------------------------- the inputs


def parse_views(text: str) -> tuple[int, int]:
    """`3` -> (3 clips, 1 crop); `5x3` -> (5, 3). ValueError naming the option otherwise."""
    parts = text.lower().split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or min(numbers) < 1:
        raise ValueError(f"--views {text}: give N (clips, one centre crop each) or CLIPSxCROPS, e.g. 5x3")
    return numbers[0], numbers[1] if len(numbers) == 2 else 1


def find_videos(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(video paths in order, [(input, why it gives no video)]) for the VIDEO arguments."""
    videos: list[str] = []
    problems: list[tuple[str, str]] = []

    def add(path: str, listed: bool) -> None:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(folder, name)
                for folder, _, names in os.walk(path)
                for name in names
                if name.rsplit(".", 1)[-1].lower() in FOLDER_EXTENSIONS and "." in name
            )
            if not found:
                problems.append((path, f"no video files in this folder ({', '.join(FOLDER_EXTENSIONS)})"))
            videos.extend(found)
        elif path.lower().endswith(LIST_SUFFIX) and not listed and os.path.isfile(path):
            base = os.path.dirname(path)
            try:
                with open(path) as f:
                    entries = [line.strip() for line in f]
            except (OSError, UnicodeDecodeError) as e:
                problems.append((path, f"not a readable list of videos ({e})"))
                return
            for entry in entries:
                if entry and not entry.startswith("#"):
                    add(os.path.join(base, entry), listed=True)  # a list inside a list is no list
        elif not os.path.exists(path):
            problems.append((path, "no such file or folder"))
        else:
            videos.append(path)

    for item in inputs:
        add(item, listed=False)
    return videos, problems


def class_names(
    data_cfg: DataConfig, num_classes: int, stored: tuple[list[str] | None, str] = (None, "")
) -> tuple[list[str] | None, str]:
    """(names by label, where they came from): `stored` (names kept with the weights, and
    where) when they fit the model, else the manifest of the config's shard folders;
    (None, why not) when nothing fits."""
    from marscale.data.shards import load_manifest, manifest_path

    tried = []
    names, source = stored
    if names is not None:
        if len(names) <= num_classes:
            return names, source
        tried.append(f"{source} names {len(names)} classes, the model has {num_classes}")
    for root in (data_cfg.val_shards, data_cfg.train_shards):
        try:
            names = load_manifest(root).class_names
        except (OSError, ValueError) as e:
            tried.append(str(e))
            continue
        if len(names) > num_classes:
            tried.append(f"{manifest_path(root)} names {len(names)} classes, the model has {num_classes}")
            continue
        return list(names), manifest_path(root)
    return None, "; ".join(dict.fromkeys(tried))


# ------------------------------------------------------------------ views and scores


def decode_views(data: bytes, ext: str, data_cfg: DataConfig, clip: ClipConfig, decoder: str) -> torch.Tensor:
    """uint8 [V, C, T, S, S]: the evaluation views of one encoded video, V = test_num_clips x
    test_num_crops, view = clip * crops + crop, cut as the evaluation loader cuts them
    (`marscale.data.stages.decode_eval_views`: the same sampling, reader and transform).
    Raises `DecodeError` (or `FrameRateError`) for a video that cannot be read."""
    from marscale.data import sampling
    from marscale.data.decode import open_sample
    from marscale.data.transforms import EvalTransform

    reader = open_sample(data, ext, None, decoder, data_cfg.decode_threads)
    try:
        windows = sampling.eval_indices(clip, reader.num_frames, reader.fps, data_cfg.test_num_clips)  # [clips, T]
        wanted, positions = np.unique(windows, return_inverse=True)
        frames = reader.get_frames(wanted)  # the distinct frames, decoded once
    finally:
        reader.close()
    return torch.stack(EvalTransform(data_cfg, clip)(frames, positions.reshape(windows.shape)))


class ViewScorer:
    """A model in eval mode and the evaluation mask: views -> the video's mean class
    probabilities, as `marscale.engine.evaluate` scores a video."""

    def __init__(
        self, model: torch.nn.Module, masking: MaskingConfig, grid: tuple[int, int, int], clip: ClipConfig, *,
        device: torch.device, dtype: torch.dtype, batch_size: int,
    ):
        self.model, self.masking, self.grid, self.clip = model, masking, grid, clip
        self.device, self.dtype, self.batch_size = device, dtype, batch_size

    def _layouts(self, first_view: int, count: int):
        """(tokens, complement or None) for views first_view.. of a video, or None (every token)."""
        from marscale.core.seeding import derive_seed
        from marscale.tokens.masking import make_mask, shuffle_time_slices
        from marscale.tokens.packing import pack_mask

        mask = make_mask(self.masking, count, self.grid, None, train=False)
        if mask is None:
            return None
        if self.masking.eval_temporal_shuffle:
            # Seeded as evaluation seeds video 0's views: a file scores the same wherever it is listed.
            views = range(first_view, first_view + count)
            generators = [torch.Generator().manual_seed(derive_seed(0, v)) for v in views]
            mask = shuffle_time_slices(mask, self.grid, generators)
        complement = pack_mask(~mask).to(self.device) if self.masking.eval_complement else None
        return pack_mask(mask).to(self.device), complement

    @torch.no_grad()
    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 [V, C, T, S, S] -> float64 [K] on the host: the mean over views of the softmax."""
        from marscale.data.mixup import normalize

        total = None
        for first in range(0, views.shape[0], self.batch_size):
            video = views[first : first + self.batch_size].to(self.device, non_blocking=True)
            tokens, complement = self._layouts(first, video.shape[0]) or (None, None)
            x = normalize(video, self.clip.mean, self.clip.std, self.dtype)
            logits = self.model(x, tokens)["logits"]
            if complement is not None:
                logits = (logits.float() + self.model(x, complement)["logits"].float()) / 2
            scores = torch.softmax(logits.float(), dim=-1).double().sum(dim=0)
            total = scores if total is None else total + scores
        return (total / views.shape[0]).cpu()  # the host copy waits for the device: timing ends here


@dataclasses.dataclass(frozen=True)
class Prediction:
    path: str
    top: list[tuple[int, float]]
    """(class index, probability), most probable first."""
    seconds: float
    macs: int
    """Inference multiply-accumulates of all the video's views."""


def classify(
    path: str, scorer: ViewScorer, data_cfg: DataConfig, clip: ClipConfig, decoder: str, top_k: int, macs: int
) -> Prediction:
    """One file -> its prediction. OSError / DecodeError / FrameRateError for an unreadable file."""
    start = time.perf_counter()
    with open(path, "rb") as f:
        data = f.read()
    ext = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
    probs = scorer(decode_views(data, ext, data_cfg, clip, decoder))
    top = torch.topk(probs, min(top_k, probs.numel()))
    return Prediction(
        path, [(int(i), float(p)) for i, p in zip(top.indices, top.values)], time.perf_counter() - start, macs
    )


# ------------------------------------------------------------------------- output


@dataclasses.dataclass(frozen=True)
class Setting:
    """What every prediction of one command shares (the header of the output)."""

    checkpoint: str
    folder: str | None
    cfg: TrainConfig
    mask_ratio: float
    tokens: int
    visible_tokens: int
    masking_note: str | None
    names: list[str] | None
    names_source: str
    device: torch.device
    dtype: torch.dtype

    def label(self, index: int) -> str:
        if self.names is not None and index < len(self.names):
            return self.names[index]
        return f"#{index}"


def _gflops(macs: int) -> str:
    g = macs / 1e9
    return f"{g:.1f}" if g >= 10 else f"{g:.3g}"


def header_lines(s: Setting) -> list[str]:
    cfg = s.cfg
    used = "" if s.folder is None or os.path.samefile(s.folder, s.checkpoint) else f" ({os.path.basename(s.folder)})"
    clips, crops = cfg.data.test_num_clips, cfg.data.test_num_crops
    names = (
        f"class names from {s.names_source}" if s.names is not None
        else f"no class names (classes shown by index): {s.names_source}"
    )
    lines = [
        f"checkpoint: {s.checkpoint}{used}: {cfg.model.arch} {cfg.model.variant}, "
        f"{cfg.model.num_classes} classes; {names}",
        f"views: {clips} clip{'s' if clips != 1 else ''} x {crops} crop{'s' if crops != 1 else ''} of "
        f"{cfg.clip.num_frames}x{cfg.clip.img_size}x{cfg.clip.img_size} per video; mask ratio {s.mask_ratio:g}: "
        f"{s.visible_tokens} of {s.tokens} tokens visible; {s.device.type}, {str(s.dtype).removeprefix('torch.')}",
    ]
    if s.masking_note:
        lines.append(s.masking_note)
    return lines


def format_table(predictions: list[Prediction], s: Setting) -> str:
    """The header, one row per (video, rank) with the video's seconds and GFLOPs on its
    first row, and the notes on the units."""
    columns = ("video", "rank", "class", "probability", "s/video", "GFLOPs")
    rows = []
    for p in predictions:
        for rank, (index, prob) in enumerate(p.top, 1):
            first = rank == 1
            rows.append((
                p.path if first else "", str(rank), s.label(index), f"{prob:.4f}",
                f"{p.seconds:.3f}" if first else "", _gflops(p.macs) if first else "",
            ))
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    right = (False, True, False, True, True, True)

    def line(cells) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    table = [line(columns), *(line(r) for r in rows)]
    return "\n".join([*header_lines(s), "", *table, "", GFLOPS_NOTE + ".", SECONDS_NOTE + "."]) + "\n"


def json_record(predictions: list[Prediction], failures: list[tuple[str, str]], s: Setting) -> dict:
    cfg = s.cfg
    return {
        "checkpoint": os.path.abspath(s.checkpoint),
        "checkpoint_folder": None if s.folder is None else os.path.abspath(s.folder),
        "model": {"arch": cfg.model.arch, "variant": cfg.model.variant, "num_classes": cfg.model.num_classes},
        "class_names": s.names,
        "class_names_from": s.names_source if s.names is not None else None,
        "class_names_missing": None if s.names is not None else s.names_source,
        "clip": {"num_frames": cfg.clip.num_frames, "img_size": cfg.clip.img_size},
        "views": {"clips": cfg.data.test_num_clips, "crops": cfg.data.test_num_crops},
        "mask_ratio": s.mask_ratio,
        "tokens": s.tokens,
        "visible_tokens": s.visible_tokens,
        "masking_note": s.masking_note,
        "device": str(s.device),
        "dtype": str(s.dtype).removeprefix("torch."),
        "unit": "macs: multiply-accumulates per video at inference, all views (the papers' FLOPs); "
                "gflops = macs / 1e9; hardware FLOPs = 2 x MACs",
        "videos": [
            {
                "path": p.path,
                "top": [
                    {"rank": rank, "index": index, "class": s.label(index) if s.names is not None else None,
                     "probability": prob}
                    for rank, (index, prob) in enumerate(p.top, 1)
                ],
                "seconds": p.seconds,
                "macs": p.macs,
                "gflops": p.macs / 1e9,
            }
            for p in predictions
        ],
        "failed": [{"path": path, "error": error} for path, error in failures],
    }


# ------------------------------------------------------------------------ command


def _config_args(args: argparse.Namespace) -> argparse.Namespace:
    """The namespace `marscale eval`'s config loading reads: --views as overrides, and with
    --mask-ratio the masking section loaded as `--mask-ratios` loads it (each ratio set later)."""
    overrides = list(args.overrides)
    if args.views is not None:
        clips, crops = parse_views(args.views)
        overrides += [f"data.test_num_clips={clips}", f"data.test_num_crops={crops}"]
    mask_ratios = None if args.mask_ratio is None else str(args.mask_ratio)
    return argparse.Namespace(**{**vars(args), "overrides": overrides, "mask_ratios": mask_ratios})


def _inference_pass(cfg: TrainConfig, ratio: float | None):
    """The `eval_ratios.RatioPass` at `ratio` (None: the config's evaluation ratio), checked."""
    from marscale.commands import eval_ratios
    from marscale.core.clip import token_grid

    if ratio is None:
        ratio = cfg.masking.ratio_at(train=False)
    elif not 0.0 <= ratio < 1.0:
        raise ValueError(f"--mask-ratio {ratio:g} is outside [0, 1) (0 shows every token; 1 would show none)")
    try:
        masking = eval_ratios.masking_for(cfg.masking, ratio)
        masking.check_grid(token_grid(cfg.clip, cfg.model.patch_size))
    except ValueError as e:
        raise ValueError(f"--mask-ratio {ratio:g} does not fit this model: {e}") from None
    return eval_ratios.plan_passes(cfg, [ratio])[0]


def _masking_note(masking: MaskingConfig, ratio: float) -> str | None:
    """What the output says when a full-token model is masked (as `marscale eval --mask-ratios` masks it)."""
    from marscale.commands import eval_ratios

    if not (eval_ratios.substituted_masking(masking) and ratio > 0):
        return None
    cell = "x".join(map(str, eval_ratios.DEFAULT_CELL))
    return (
        f"masking.kind is none (the model was trained on every token): mask ratio {ratio:g} masks with cell "
        f"running masking in {cell} cells (the evaluation pattern), which this model never saw in training"
    )


def _stored_names(args: argparse.Namespace, folder: str | None) -> tuple[list[str] | None, str]:
    """(class names kept with the weights, where), or (None, "") without them."""
    from marscale.weights.export import stored_class_names
    from marscale.weights.hf import locate

    path = locate(args.checkpoint)
    names = stored_class_names(path, folder)
    return names, f"{folder or path} (stored with the weights)"


def _attention(cfg: TrainConfig, device: torch.device) -> str:
    """The config's attention backend where it runs on `device`, else "auto" (a model trained
    with a GPU-only kernel still classifies on a CPU; the numbers are the same kernels' math)."""
    from marscale.model.attention import resolve_backend

    try:
        resolve_backend(cfg.model.attention, device)
        return cfg.model.attention
    except RuntimeError as e:
        logger.warning("%s: using model.attention=auto here", e)
        return "auto"


def run(args: argparse.Namespace) -> int:
    """Classify every video; print a table or JSON. 78 when no video could be classified."""
    from marscale.commands import eval as eval_command
    from marscale.core import dist
    from marscale.core.clip import token_grid
    from marscale.data import resolve_decoder
    from marscale.data.decode import DecodeError
    from marscale.data.sampling import FrameRateError
    from marscale.engine.config import PRECISION_DTYPES
    from marscale.model import build_model

    if args.top_k < 1:
        raise ValueError(f"--top-k {args.top_k}: show at least 1 class")
    config_args = _config_args(args)
    videos, failures = find_videos(args.videos)
    # The checkpoint and its config as `marscale eval` reads them (one place for every
    # layout). DeepSpeed's consolidation of a ZeRO checkpoint prints to stdout (and its
    # logger keeps the stream it found when it was imported, here): stdout stays the output's.
    with contextlib.redirect_stdout(sys.stderr):
        folder, stored = eval_command._open_checkpoint(config_args)
        cfg = eval_command._eval_config(config_args, stored)
        ratio_pass = _inference_pass(cfg, args.mask_ratio)  # checked before any weight is read
        decoder = resolve_decoder(cfg.data.decoder)
        model = build_model(cfg.model, cfg.clip)
        eval_command._load_weights(model, config_args, folder, cfg)
    device = dist.resolve_device(args.device)
    dtype = PRECISION_DTYPES[cfg.deepspeed.precision]
    model.to(device=device, dtype=dtype).eval()
    model.set_attention(_attention(cfg, device), device)
    names, names_source = class_names(cfg.data, cfg.model.num_classes, _stored_names(config_args, folder))
    setting = Setting(
        args.checkpoint, folder, cfg, ratio_pass.mask_ratio, ratio_pass.tokens, ratio_pass.visible_tokens,
        _masking_note(cfg.masking, ratio_pass.mask_ratio), names, names_source, device, dtype,
    )
    scorer = ViewScorer(
        model, ratio_pass.masking, token_grid(cfg.clip, cfg.model.patch_size), cfg.clip,
        device=device, dtype=dtype, batch_size=cfg.data.eval_batch_size,
    )
    macs = ratio_pass.macs_view * cfg.data.views_per_video
    for path, problem in failures:
        print(f"marscale predict: skipped {path}: {problem}", file=sys.stderr)
    predictions = []
    for path in videos:
        try:
            predictions.append(classify(path, scorer, cfg.data, cfg.clip, decoder, args.top_k, macs))
        except (OSError, DecodeError, FrameRateError) as e:
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
            failures.append((path, error))
            print(f"marscale predict: skipped {path}: {error}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(json_record(predictions, failures, setting), indent=1))
    elif predictions:
        print(format_table(predictions, setting), end="")
    if not predictions:
        print(f"marscale predict: no video could be classified ({len(failures)} skipped)", file=sys.stderr)
        return exits.BAD_INPUT
    return exits.FINISHED
