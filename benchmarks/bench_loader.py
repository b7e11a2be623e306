"""Training-loader throughput per decoder and augmentation placement, on the same shards.

Renders a synthetic set of 10-second 320x240 H.264 videos (`shards_tools.synth`),
shards it twice - as rendered (x264's default keyframe interval of 250 frames, so one
keyframe per video) and re-encoded by the converter (short side capped, keyframe every
16 frames) - and measures, on those shards:

1. decoding alone: open a video and decode one dense 16-frame window (interval 4), CPU
   and wall ms, per decoder (PyAV also with FFmpeg threading, `--threads`);
2. the training pipeline in this process (one loader worker: tar reading, decode,
   sampling, the clip's augmentation drawn, batching) per decoder, shards, clips per
   video and placement of the augmentation: "worker" (RandomResizedCrop 224,
   RandAugment rand-m9-mstd0.5-inc1, flip, erasing with PIL in the worker: the pipeline
   before `augment_on`) or "device" (the worker only decodes and draws the parameters;
   `DeviceAugment` runs in the training process). Clips per CPU-second of the worker,
   and the ratio to the worker placement with the same decoder, shards and clips;
3. the device augmentation's own time per clip (`DeviceAugment` on this machine's CPU
   with one thread: an upper bound for what it costs an accelerator) and the worker
   augmentation's (PIL), for comparison;
4. clips/s wall with N loader worker processes (the device placement), and their CPU
   time per clip;
5. resident memory of one loader over a long run (`--rss-clips`, 2,000 by default):
   RSS after the first 100 clips and at the end, and the peak.

    python benchmarks/bench_loader.py --videos 24 --repeats 3 --clips 16 --gpu-clips-per-s 200

Rates are clips per CPU second of the process (all its threads; torch with one thread,
as in a DataLoader worker): what one worker with a core of its own delivers, robust to
other load on a shared machine; wall rates are shown too. "cores/GPU" =
gpu_clips_per_s / (clips per CPU-second): the loader cores one GPU needs.
The default 200 clips/s is the rate the loader must sustain for one GPU training ViT-L
MAR 50% (the target of the loader work), not a measurement.

decord and decord2 are both imported as `decord`: run the script once per installed
package on the same `--work-dir` (the shards are made once and reused); the decoder
column names the package and version.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import marscale  # noqa: F401,E402  (makes `import timm` work on CPU-only machines)
from marscale.core.clip import ClipConfig  # noqa: E402
from marscale.data import DataConfig, available_decoders, build_train_loader  # noqa: E402
from marscale.data.decode import open_video, sample_index  # noqa: E402
from marscale.data.frames import FrameIndex  # noqa: E402
from marscale.data.sampling import dense_train_indices  # noqa: E402
from marscale.data.shards import VIDEO_EXTENSIONS, SampleMeta, ShardSet, load_manifest  # noqa: E402
from shards_tools.convert import ConvertOptions, convert  # noqa: E402
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


def decoder_label(backend: str, threads: int) -> str:
    """The decoder as the tables name it: package and version, and threads when > 1."""
    if backend == "decord":
        import decord

        fork = int(decord.__version__.split(".")[0]) >= 3  # decord2's versions start at 3
        name = f"{'decord2' if fork else 'decord'} {decord.__version__}"
    elif backend == "pyav":
        import av

        name = f"pyav {av.__version__}"
    else:
        import torchcodec

        name = f"torchcodec {torchcodec.__version__}"
    return name + (f" x{threads} threads" if threads > 1 else "")


def bench_decode(videos: list, backend: str, threads: int, repeats: int) -> tuple[float, float]:
    """Medians over repeats of the mean CPU and wall ms to open a video and decode one dense 16x4 window."""
    cpu_runs, wall_runs = [], []
    for r in range(repeats):
        rng = np.random.default_rng(r)
        cpu, wall = time.process_time(), time.perf_counter()
        for data, index in videos:
            reader = open_video(data, backend, index, threads)
            reader.get_frames(dense_train_indices(reader.num_frames, 16, 4, rng))
            reader.close()
        cpu_runs.append((time.process_time() - cpu) / len(videos) * 1000)
        wall_runs.append((time.perf_counter() - wall) / len(videos) * 1000)
    return statistics.median(cpu_runs), statistics.median(wall_runs)


def loader_config(folder: str, backend: str, threads: int, clips_per_video: int, videos: int, seed: int,
                  num_workers: int = 0) -> DataConfig:
    return DataConfig(
        train_shards=folder,
        val_shards=folder,
        decoder=backend,
        decode_threads=threads,
        batch_size=2 * clips_per_video,
        clips_per_video=clips_per_video,
        num_workers=num_workers,
        shuffle_buffer=8,
        samples_per_epoch=videos,
        seed=seed,
    )


def loader(cfg: DataConfig, placement: str, epoch: int):
    shard_set = ShardSet.load(cfg.train_shards)
    # One rank, one accumulation step: the run plan's loader batches are videos // videos per batch.
    return build_train_loader(
        cfg, ClipConfig(), shard_set, batches_per_epoch=cfg.samples_per_epoch // 2, epoch=epoch, rank=0,
        world_size=1, num_classes=shard_set.num_classes, augment_on=placement,
    )


def bench_pipeline(
    folder: str, backend: str, threads: int, clips_per_video: int, placement: str, videos: int, repeats: int
) -> tuple[float, float]:
    """Medians over repeats of training clips per CPU second and per wall second, one process."""
    cpu_runs, wall_runs = [], []
    for r in range(repeats):
        cfg = loader_config(folder, backend, threads, clips_per_video, videos + 2, seed=r)
        batches = iter(loader(cfg, placement, epoch=r))
        next(batches)  # fills the shuffle buffer, first decode (the first batch, 2 videos, warms up)
        cpu, wall = time.process_time(), time.perf_counter()
        clips = sum(batch["video"].shape[0] for batch in batches)
        cpu_runs.append(clips / (time.process_time() - cpu))
        wall_runs.append(clips / (time.perf_counter() - wall))
    return statistics.median(cpu_runs), statistics.median(wall_runs)


def bench_augmentation(folder: str, backend: str, repeats: int, batch: int = 8) -> dict[str, float]:
    """CPU ms per clip of the augmentation alone: PIL in the worker (`TrainTransform`) and
    `DeviceAugment` batched on this CPU with one thread, on the same windows and parameters."""
    import torch

    from marscale.data.device_augment import DeviceAugment
    from marscale.data.transforms import TrainTransform

    cfg = loader_config(folder, backend, 1, 2, batch, seed=0)  # batches of 4 clips (2 videos)
    parts = list(loader(cfg, "device", epoch=0))[: batch // 4]
    device_batch = {
        "video": torch.cat([p["video"] for p in parts]),
        "augment": {k: torch.cat([p["augment"][k] for p in parts]) for k in parts[0]["augment"]},
    }
    host, device = TrainTransform(cfg, ClipConfig()), DeviceAugment(cfg, ClipConfig())
    frames = device_batch["video"].numpy()
    params = [host.draw(*frames.shape[2:4], np.random.default_rng(i)) for i in range(len(frames))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {"worker_cpu": [], "device_cpu": [], "device_wall": []}
    try:
        device(device_batch["video"], device_batch["augment"])  # warm-up
        for _ in range(repeats):
            cpu = time.process_time()
            for clip, p in zip(frames, params):
                host.apply(clip, p)
            out["worker_cpu"].append((time.process_time() - cpu) / len(frames) * 1000)
            cpu, wall = time.process_time(), time.perf_counter()
            device(device_batch["video"], device_batch["augment"])
            out["device_cpu"].append((time.process_time() - cpu) / len(frames) * 1000)
            out["device_wall"].append((time.perf_counter() - wall) / len(frames) * 1000)
    finally:
        torch.set_num_threads(threads)
    return {k: statistics.median(v) for k, v in out.items()}


def bench_workers(folder: str, backend: str, num_workers: int, videos: int) -> tuple[float, float]:
    """(clips/s wall, worker CPU ms per clip) of a loader with `num_workers` processes, device placement."""
    cfg = loader_config(folder, backend, 1, 2, videos, seed=5, num_workers=num_workers)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    clips = sum(batch["video"].shape[0] for batch in loader(cfg, "device", epoch=5))  # workers exit at the end
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return clips / wall, cpu / clips * 1000


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_rss(folder: str, backend: str, placement: str, clips: int) -> tuple[float, float, float, float]:
    """(RSS MiB after 100 clips, at the end, peak, clips/CPU-s) of one loader in this process over `clips` clips."""
    cfg = loader_config(folder, backend, 1, 2, clips // 2, seed=7)
    seen, warm = 0, None
    cpu = time.process_time()
    for batch in loader(cfg, placement, epoch=7):
        seen += batch["video"].shape[0]
        if warm is None and seen >= 100:
            warm = rss_mib()
    rate = seen / (time.process_time() - cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return warm, rss_mib(), peak, rate


def table(columns: list[str]) -> callable:
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")

    def row(*cells) -> None:
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)

    return row


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
    parser.add_argument("--threads", type=int, default=2, help="PyAV is also measured with this many FFmpeg threads")
    parser.add_argument("--num-workers", type=int, nargs="*", default=[1, 2], help="loader processes, wall-time table")
    parser.add_argument("--rss-clips", type=int, default=2000, help="clips of the memory run (0: skip it)")
    parser.add_argument("--gpu-clips-per-s", type=float, default=200.0, help="training clips/s of one GPU (see above)")
    parser.add_argument("--workers", type=int, default=2, help="processes for rendering and converting")
    parser.add_argument("--work-dir", default="/tmp/marscale_bench_loader")
    args = parser.parse_args()

    import torch

    # As in a DataLoader worker (torch sets one thread there): on a loaded machine, idle
    # intra-op threads spinning in small ops (a 50 kB torch.zeros took 5.7 ms CPU with two
    # threads, 0.02 ms with one) would be charged to the pipeline.
    torch.set_num_threads(1)
    folders = make_shards(args)
    backends = args.decoders or available_decoders()
    decoders = [(b, 1) for b in backends]
    if "pyav" in backends and args.threads > 1:
        decoders.append(("pyav", args.threads))
    default = backends[0]
    print(f"decoders: {', '.join(decoder_label(*d) for d in decoders)}; torch {torch.__version__}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; 16x224x224 clips, dense interval 4")
    for name, folder in folders.items():
        videos = read_videos(folder)
        kbps = np.mean([len(v) * 8 / 1000 / args.seconds for v, _ in videos])
        print(f"{name}: {len(videos)} videos, mean {kbps:.0f} kbit/s")

    print("\n### Decoding one dense 16-frame window (open + decode), ms per video\n")
    row = table(["decoder", "shards", "CPU ms", "wall ms"])
    for backend, threads in decoders:
        for name, folder in folders.items():
            cpu_ms, wall_ms = bench_decode(read_videos(folder), backend, threads, args.repeats)
            row(decoder_label(backend, threads), name, f"{cpu_ms:.1f}", f"{wall_ms:.1f}")

    print("\n### Augmentation alone, CPU ms per clip (16 frames of 320x240 -> 224x224, the full recipe)\n")
    aug = bench_augmentation(folders["reencoded"], default, args.repeats)
    row = table(["where", "CPU ms/clip", "wall ms/clip"])
    row("worker (PIL, TrainTransform)", f"{aug['worker_cpu']:.1f}", "")
    row("device = this CPU, 1 thread (DeviceAugment, batch of 8)", f"{aug['device_cpu']:.1f}",
        f"{aug['device_wall']:.1f}")

    print(f"\n### Training pipeline, one worker process; cores/GPU at {args.gpu_clips_per_s:g} clips/s\n")
    row = table(["decoder", "shards", "clips/video", "augment_on", "clips/CPU-s/worker", "clips/wall-s",
                 "x worker placement", "cores/GPU"])
    for backend, threads in decoders:
        for name, folder in folders.items():
            for clips_per_video in (1, 2):
                rates = {}
                for placement in ("worker", "device"):
                    rate, wall = bench_pipeline(folder, backend, threads, clips_per_video, placement, args.clips,
                                                args.repeats)
                    rates[placement] = rate
                    row(decoder_label(backend, threads), name, clips_per_video, placement, f"{rate:.1f}",
                        f"{wall:.1f}", f"{rate / rates['worker']:.2f}", f"{args.gpu_clips_per_s / rate:.1f}")

    print(f"\n### N loader workers ({decoder_label(default, 1)}, re-encoded, 2 clips/video, augment_on device)\n")
    row = table(["workers", "clips/s wall", "worker CPU ms/clip", "clips/CPU-s"])
    for n in args.num_workers:
        wall_rate, cpu_ms = bench_workers(folders["reencoded"], default, n, 4 * args.clips)
        row(n, f"{wall_rate:.1f}", f"{cpu_ms:.1f}", f"{1000 / cpu_ms:.1f}")

    if args.rss_clips:
        print(f"\n### Memory over {args.rss_clips} clips (one loader in this process, re-encoded, 2 clips/video)\n")
        row = table(["decoder", "augment_on", "RSS MiB after 100 clips", "RSS MiB at the end", "growth MiB",
                     "peak MiB", "clips/CPU-s"])
        for backend in backends:  # the peak includes what the tables above left in this process
            warm, end, peak, rate = bench_rss(folders["reencoded"], backend, "device", args.rss_clips)
            row(decoder_label(backend, 1), "device", f"{warm:.0f}", f"{end:.0f}", f"{end - warm:+.0f}",
                f"{peak:.0f}", f"{rate:.1f}")


if __name__ == "__main__":
    main()
