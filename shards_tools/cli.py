"""`marscale-shards`: convert video datasets to WebDataset shards, check them, describe them.

    marscale-shards convert --format kinetics --annotations train.txt --root videos/ \\
        --classes classes.txt --out shards/train --prefix train --samples-per-shard 256 \\
        --workers 8 --shuffle-seed 0 [--reencode --short-side 320 --keyframe-interval 16]
    marscale-shards verify shards/train
    marscale-shards stats shards/train [--json]
    marscale-shards synth --out data/synth --num-classes 4 --videos-per-class 100 --shards
    marscale-shards synth --task motion --out data/motion --videos-per-class 200 --shards

Exit status: 0 on success, 1 when verify finds a mismatch, 2 on bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .annotations import FORMATS, AnnotationError
from .convert import ConvertOptions, convert, convert_synthetic
from .options import DEFAULT_SAMPLES_PER_SHARD
from .stats import format_stats, stats_for
from .synth import TASKS, make_synthetic_dataset
from .verify import verify
from .write import ConvertError

log = logging.getLogger("marscale-shards")


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 320x240, got {text!r}") from None
    if w < 2 or h < 2 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError(f"width and height must be even and >= 2, got {text!r}")
    return w, h


def _add_sharding_args(p: argparse.ArgumentParser, default_per_shard: int | None) -> None:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, default=default_per_shard,
                      help=f"samples per shard (default {default_per_shard or DEFAULT_SAMPLES_PER_SHARD})")
    size.add_argument("--max-shard-bytes", type=int, default=None,
                      help="cut shards by size instead: at most this many source bytes per shard")
    p.add_argument("--workers", type=int, default=1, help="processes that decode/re-encode videos")
    p.add_argument("--shuffle-seed", type=int, default=None,
                   help="shuffle samples before sharding with this seed (default: keep annotation order)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an earlier shard set in --out instead of resuming it")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser = argparse.ArgumentParser(prog="marscale-shards", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", parents=[common], help="annotations + videos -> WebDataset shards with a manifest")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--annotations", help="annotation file (kinetics list, VideoMAE csv, SSv2 json)")
    p.add_argument("--root", required=True, help="video root; annotation paths are relative to it")
    p.add_argument("--labels", help="ssv2: something-something-v2-labels.json")
    p.add_argument("--classes", help="kinetics/csv: class names, one a line (default: named by index)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--prefix", required=True, help="shard name prefix: PREFIX-000000.tar")
    _add_sharding_args(p, default_per_shard=None)
    p.add_argument("--reencode", action="store_true", help="re-encode with libx264 (H.264 in MP4)")
    p.add_argument("--short-side", type=int, default=320, help="re-encode: scale the short side down to this")
    p.add_argument("--keyframe-interval", type=int, default=16, help="re-encode: keyframe every N frames")

    p = sub.add_parser("verify", parents=[common], help="decode every sample and compare with the manifest")
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-decode", action="store_true", help="check checksums and records only")

    p = sub.add_parser("stats", parents=[common], help="counts, class balance, durations, resolutions, fps")
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("synth", parents=[common], help="render the synthetic action dataset (optionally as shards)")
    p.add_argument("--out", required=True)
    p.add_argument("--task", choices=tuple(TASKS), default="actions",
                   help="actions: the demo's set (one object; move, grow, rotate); motion: the harder set "
                        "(8 drift directions of several objects among distractors, textured noisy background)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="first K of the task's classes (default: actions 4 of "
                        f"{', '.join(TASKS['actions'].classes)}; motion all 8)")
    p.add_argument("--videos-per-class", type=int, default=50, help="training videos per class")
    p.add_argument("--val-videos-per-class", type=int, default=None, help="default: a quarter of the above")
    p.add_argument("--size", type=_size, default=(64, 64), help="WIDTHxHEIGHT (default 64x64)")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=None,
                   help="std of pixel noise, 0-255 scale (default: the task's, actions 0, motion "
                        f"{TASKS['motion'].default_noise:g})")
    p.add_argument("--keyframe-interval", type=int, default=None, help="GOP in frames (default: libx264's)")
    p.add_argument("--shards", action="store_true", help="also convert to OUT/shards/{train,val}")
    _add_sharding_args(p, default_per_shard=16)
    return parser


def _convert(args: argparse.Namespace) -> int:
    options = ConvertOptions(
        format=args.format,
        root=args.root,
        out=args.out,
        prefix=args.prefix,
        annotations=args.annotations,
        labels=args.labels,
        classes=args.classes,
        samples_per_shard=args.samples_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        shuffle_seed=args.shuffle_seed,
        reencode=args.reencode,
        short_side=args.short_side,
        keyframe_interval=args.keyframe_interval,
        workers=args.workers,
    )
    print(convert(options, overwrite=args.overwrite).summary())
    return 0


def _verify(args: argparse.Namespace) -> int:
    status = 0
    for root in args.dirs:
        report = verify(root, workers=args.workers, decode=not args.no_decode)
        print(report.summary())
        status = status or (0 if report.ok else 1)
    return status


def _stats(args: argparse.Namespace) -> int:
    stats = stats_for(args.dirs)
    if args.json:
        print(json.dumps(stats if len(stats) > 1 else stats[0], indent=1))
    else:
        print("\n\n".join(format_stats(s) for s in stats))
    return 0


def _synth(args: argparse.Namespace) -> int:
    width, height = args.size
    info = make_synthetic_dataset(
        args.out,
        num_classes=args.num_classes,
        videos_per_class=args.videos_per_class,
        val_videos_per_class=args.val_videos_per_class,
        width=width,
        height=height,
        num_frames=args.frames,
        fps=args.fps,
        seed=args.seed,
        workers=args.workers,
        noise=args.noise,
        gop=args.keyframe_interval,
        progress=None,
        task=args.task,
    )
    print(f"{args.out}: {info['num_videos']} videos of {len(info['classes'])} classes ({', '.join(info['classes'])})")
    if args.shards:
        results = convert_synthetic(
            args.out,
            os.path.join(args.out, "shards"),
            splits=info["lists"],
            samples_per_shard=args.samples_per_shard,
            max_shard_bytes=args.max_shard_bytes,
            shuffle_seed=args.seed if args.shuffle_seed is None else args.shuffle_seed,
            workers=args.workers,
            overwrite=args.overwrite,
        )
        for result in results.values():
            print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    commands = {"convert": _convert, "verify": _verify, "stats": _stats, "synth": _synth}
    try:
        return commands[args.command](args)
    except (ConvertError, AnnotationError, ValueError, FileNotFoundError) as e:
        log.debug("details", exc_info=True)
        print(f"marscale-shards {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
