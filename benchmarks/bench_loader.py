"""Training-loader throughput: clips per second of one worker process, per decoder backend.

Renders a synthetic set of 10-second 320x240 H.264 videos (`shards_tools.synth`),
shards it twice - as rendered (x264's default keyframe interval of 250 frames, so
one keyframe per video) and re-encoded by the converter (short side capped, keyframe
every 16 frames) - and runs the full training pipeline (tar reading, decode, dense
16-frame sampling at interval 4, RandomResizedCrop to 224, RandAugment, erasing,
batching) in this single process, i.e. one loader worker on one core. It also times
decoding alone (open the video and decode one 16-frame dense clip).

    python benchmarks/bench_loader.py --videos 24 --repeats 3 --clips 16 --gpu-clips-per-s 160

Rates are clips per CPU second of this process (all its threads): what one worker with
a core of its own delivers, robust to other load on a shared machine.

"cores/GPU" is the number of loader worker processes (one core each) that a GPU training
at `--gpu-clips-per-s` clips per second needs: gpu_clips_per_s / clips_per_cpu_s. The
default of 160 is an estimate for ViT-L MAR at 50% masking on one H100, not a
measurement: encoder + bridging classifier about 276 GMACs a clip, reconstruction
decoder (12 blocks, 512 wide, 1568 tokens) about 90 GMACs, so about 0.73 TFLOP forward
and 2.2 TFLOP forward + backward a clip, at 35% of the 989 dense bf16 TFLOP/s. Pass a
measured figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import marscale  # noqa: F401,E402  (makes `import timm` work on CPU-only machines)
from marscale.clip import ClipConfig  # noqa: E402
from marscale.data import DataConfig, available_decoders, build_train_loader  # noqa: E402
from marscale.data.decode import open_video, sample_index  # noqa: E402
from marscale.data.frames import FrameIndex  # noqa: E402
from marscale.data.sampling import dense_train_indices  # noqa: E402
from shards_tools.convert import ConvertOptions, convert  # noqa: E402
from marscale.shards import VIDEO_EXTENSIONS, SampleMeta, ShardSet, load_manifest  # noqa: E402
from shards_tools.synth import make_synthetic_dataset  # noqa: E402


def make_shards(args: argparse.Namespace) -> dict[str, str]:
    """Render the videos once and convert them as-is and re-encoded; reuse what exists."""
    work = args.work_dir
    folders = {"source": os.path.join(work, "shards_source"), "reencoded": os.path.join(work, "shards_reencoded")}
    videos_root = os.path.join(work, "videos")
    if not os.path.exists(os.path.join(videos_root, "train.txt")):
        t = time.perf_counter()
        make_synthetic_dataset(
            videos_root,
            num_classes=4,
            videos_per_class=args.videos // 4,
            width=args.width,
            height=args.height,
            num_frames=int(args.seconds * args.fps),
            fps=args.fps,
            noise=args.noise,
            splits=("train",),
            workers=args.workers,
        )
        print(f"rendered {args.videos} videos in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    for name, folder in folders.items():
        if os.path.exists(os.path.join(folder, "manifest.json")):
            continue
        t = time.perf_counter()
        convert(
            ConvertOptions(
                format="kinetics",
                root=os.path.join(videos_root, "videos"),
                annotations=os.path.join(videos_root, "train.txt"),
                classes=os.path.join(videos_root, "classes.txt"),
                out=folder,
                prefix="train",
                samples_per_shard=8,
                shuffle_seed=0,
                reencode=name == "reencoded",
                short_side=args.short_side,
                keyframe_interval=args.keyframe_interval,
                workers=args.workers,
            ),
            progress=False,
        )
        print(f"converted {name} shards in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    return folders


def read_videos(folder: str) -> list[tuple[bytes, FrameIndex | None]]:
    """(video bytes, its record's frame index) of every sample, as the loader has them."""
    import tarfile

    out = []
    for path in load_manifest(folder).shard_paths(folder):
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in members.items():
                stem, _, ext = name.rpartition(".")
                if ext in VIDEO_EXTENSIONS:
                    meta = SampleMeta.from_json(tar.extractfile(members[f"{stem}.json"]).read())
                    out.append((tar.extractfile(member).read(), sample_index(meta)))
    return out


def bench_decode(videos: list[tuple[bytes, FrameIndex | None]], decoder: str, repeats: int) -> float:
    """Median over repeats of the mean CPU ms to open a video and decode one dense 16x4 clip."""
    runs = []
    for r in range(repeats):
        rng = np.random.default_rng(r)
        t = time.process_time()
        for data, index in videos:
            reader = open_video(data, decoder, index)
            reader.get_frames(dense_train_indices(reader.num_frames, 16, 4, rng))
            reader.close()
        runs.append((time.process_time() - t) / len(videos) * 1000)
    return statistics.median(runs)


def bench_augment(videos: list[tuple[bytes, FrameIndex | None]], repeats: int) -> float:
    """Median over repeats of CPU ms for the training augmentation of one 16-frame clip."""
    from marscale.data.transforms import TrainTransform

    transform = TrainTransform(DataConfig(train_shards="-", val_shards="-"), ClipConfig())
    clips = []
    for data, index in videos:
        reader = open_video(data, "pyav", index)
        clips.append(reader.get_frames(dense_train_indices(reader.num_frames, 16, 4, np.random.default_rng(0))))
        reader.close()
    runs = []
    for r in range(repeats):
        rng = np.random.default_rng(r)
        t = time.process_time()
        for clip in clips:
            transform(clip, rng)
        runs.append((time.process_time() - t) / len(clips) * 1000)
    return statistics.median(runs)


def bench_pipeline(
    folder: str, decoder: str, clips_per_video: int, videos: int, repeats: int
) -> tuple[float, float]:
    """Medians over repeats of training clips per CPU second and per wall second, one process.

    CPU time (all threads of this process) is what a worker with a core of its own
    delivers; wall time is also shown because a shared machine inflates it.
    """
    cpu_runs, wall_runs = [], []
    for r in range(repeats):
        cfg = DataConfig(
            train_shards=folder,
            val_shards=folder,
            decoder=decoder,
            batch_size=2 * clips_per_video,
            clips_per_video=clips_per_video,
            num_workers=0,
            shuffle_buffer=8,
            samples_per_epoch=videos + 2,  # the first batch (2 videos) warms up
            seed=r,
        )
        # One rank, one accumulation step: the run plan's loader batches are videos // videos per batch.
        shard_set = ShardSet.load(folder)
        batches = iter(build_train_loader(
            cfg, ClipConfig(), shard_set, batches_per_epoch=(videos + 2) // 2, epoch=r, rank=0, world_size=1,
            num_classes=shard_set.num_classes,
        ))
        next(batches)  # fills the shuffle buffer, first decode
        cpu, wall = time.process_time(), time.perf_counter()
        clips = sum(batch["video"].shape[0] for batch in batches)
        cpu_runs.append(clips / (time.process_time() - cpu))
        wall_runs.append(clips / (time.perf_counter() - wall))
    return statistics.median(cpu_runs), statistics.median(wall_runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=24, help="videos rendered (a multiple of 4)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--noise", type=float, default=1.0, help="pixel noise std: texture for the codec to encode")
    parser.add_argument("--short-side", type=int, default=256, help="re-encoding caps the short side (never scales up)")
    parser.add_argument("--keyframe-interval", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clips", type=int, default=16, help="videos per timed pipeline run")
    parser.add_argument("--decoders", nargs="*", default=None, help="default: every available backend")
    parser.add_argument("--gpu-clips-per-s", type=float, default=160.0, help="training clips/s of one GPU (see above)")
    parser.add_argument("--workers", type=int, default=2, help="processes for rendering and converting")
    parser.add_argument("--work-dir", default="/tmp/marscale_bench_loader")
    args = parser.parse_args()

    folders = make_shards(args)
    decoders = args.decoders or available_decoders()
    print(f"decoders: {', '.join(decoders)}; one process; 16x224x224 clips, dense interval 4, default augmentation")
    for name, folder in folders.items():
        videos = read_videos(folder)
        kbps = np.mean([len(v) * 8 / 1000 / args.seconds for v in videos])
        print(f"{name}: {len(videos)} videos, mean {kbps:.0f} kbit/s")
    augment_ms = bench_augment(read_videos(folders["source"]), args.repeats)
    print(f"augmentation alone (RRC 224, RandAugment, erasing): {augment_ms:.1f} CPU ms/clip")
    print()
    columns = [
        "decoder",
        "shards   ",
        "decode CPU ms/video",
        "clips/video",
        "clips/CPU-s/worker",
        "clips/wall-s",
        f"cores/GPU at {args.gpu_clips_per_s:g} clips/s",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("-" * (len(c) + 2) for c in columns) + "|")
    for decoder in decoders:
        for name, folder in folders.items():
            decode_ms = bench_decode(read_videos(folder), decoder, args.repeats)
            for clips_per_video in (1, 2):
                rate, wall_rate = bench_pipeline(folder, decoder, clips_per_video, args.clips, args.repeats)
                cells = [
                    decoder.ljust(len(columns[0])),
                    name.ljust(len(columns[1])),
                    f"{decode_ms:.1f}",
                    str(clips_per_video),
                    f"{rate:.1f}",
                    f"{wall_rate:.1f}",
                    f"{args.gpu_clips_per_s / rate:.0f}",
                ]
                print("| " + " | ".join(cell.rjust(len(c)) for cell, c in zip(cells, columns)) + " |", flush=True)

if __name__ == "__main__":
    main()
