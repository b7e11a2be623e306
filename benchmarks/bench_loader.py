"""Training-loader throughput per decoder and augmentation placement, on the same shards,
with the device-side cost of the device placement counted beside the worker's.

Renders a synthetic set of 10-second 320x240 H.264 videos (`shards_tools.synth`),
shards it twice - as rendered (x264's default keyframe interval of 250 frames, so one
keyframe per video) and re-encoded by the converter (short side capped, keyframe every
16 frames) - and measures, on those shards:

1. decoding alone: open a video and decode one dense 16-frame window (interval 4), CPU
   and wall ms, per decoder (PyAV also with FFmpeg threading, `--threads`);
2. the augmentation alone, per clip, with RandAugment after the crop (this benchmark's
   pipeline, the SSv2 presets) and before it (the K400 presets): the worker's (PIL,
   `TrainTransform`) CPU time, and `DeviceAugment`'s (batches of 8, 16 x 240 x 320 frames
   -> 16 x 224 x 224) on this CPU with one thread (plan and kernels: CPU time) and, where
   there is one, on the CUDA device (CUDA events around the call for the GPU's time, the
   host's CPU time for planning and launching); means over `--augment-batches` draws of
   the parameters, since the RandAugment ops drawn set the cost;
3. the training pipeline in this process (one loader worker: tar reading, decode,
   sampling, the clip's augmentation drawn, batching) per decoder, shards, clips per
   video and placement of the augmentation: "worker" (RandomResizedCrop 224,
   RandAugment rand-m9-mstd0.5-inc1, flip, erasing with PIL in the worker) or "device"
   (the worker only decodes and draws the parameters; `DeviceAugment` runs in the
   training process). The worker's clips per CPU-second, and the same counting both
   sides: the worker's CPU time plus the device side's CPU time per clip from (2) (its
   whole cost when the device is this CPU; planning and launching on a GPU machine, whose
   GPU milliseconds per clip are shown beside). The ratio to the worker placement and the
   loader cores per GPU use the count of both sides;
4. clips/s wall with N loader worker processes (the device placement), and their CPU
   time per clip (the device side added as in 3);
5. resident memory of one loader over a long run (`--rss-clips`, 2,000 by default):
   RSS after the first 100 clips and at the end, and the peak.

    python benchmarks/bench_loader.py --videos 24 --repeats 3 --clips 16 --gpu-clips-per-s 200 \
        --json runs/bench_loader.json

Rates are clips per CPU second of the process (all its threads; torch with one thread,
as in a DataLoader worker): what one worker with a core of its own delivers, robust to
other load on a shared machine; wall rates are shown too. "cores/GPU" =
gpu_clips_per_s / (clips per CPU-second, both sides): the cores one GPU needs for its
loader and its share of the augmentation. The default 200 clips/s is the rate the loader
must sustain for one GPU training ViT-L MAR 50% (the target of the loader work), not a
measurement.

`--json PATH` writes every result, rewritten after each one: a case that fails is
recorded with its error and the others are kept (also when the run is interrupted).
`measure_device_augment` (a preset's shapes, any device) is what `benchmarks/gpu_check.py`
calls.

decord and decord2 are both imported as `decord`: run the script once per installed
package on the same `--work-dir` (the shards are made once and reused); the decoder
column names the package and version.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import marscale  # noqa: F401,E402  (makes `import timm` work on CPU-only machines)
from marscale.core.clip import ClipConfig  # noqa: E402
from marscale.core.io import write_json  # noqa: E402
from marscale.data import DataConfig, available_decoders, build_train_loader  # noqa: E402
from marscale.data.augment_params import AugmentDraw, ClipParams  # noqa: E402
from marscale.data.device_augment import DeviceAugment  # noqa: E402
from marscale.data.decode import open_video, sample_index  # noqa: E402
from marscale.data.frames import FrameIndex  # noqa: E402
from marscale.data.sampling import dense_train_indices  # noqa: E402
from marscale.data.shards import VIDEO_EXTENSIONS, SampleMeta, ShardSet, load_manifest  # noqa: E402
from marscale.data.transforms import TrainTransform  # noqa: E402
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


FRAME_SIZE = (240, 320)
"""Decoded frame (height, width) of the device-side measurements: this benchmark's videos,
which re-encoding to a 256-pixel short side leaves as they are (never upscaled)."""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU, {threads} thread{'' if threads == 1 else 's'}"


def time_device_augment(
    augment: DeviceAugment, video: torch.Tensor, params: list[dict[str, torch.Tensor]], device: str | torch.device
) -> dict[str, Any]:
    """`DeviceAugment` on `device`, once per parameter batch in `params` (host tensors) over
    `video` (uint8 [B, T, H, W, 3], copied to the device once, untimed: the loader's copy,
    not the augmentation's), after one untimed warm-up. Means per batch over the parameter
    batches (the cost varies several-fold with the RandAugment ops drawn - an affine op
    costs far more than a table - and a run pays the mean), with (min, max) beside:

    - ms_per_batch: the device's time. CUDA: CUDA events around `apply` (the parameters'
      copy and the kernels); a CPU: the process's CPU time of the whole call (the CPU is
      the device).
    - host_cpu_ms_per_batch: the host's CPU time in the call: on CUDA planning the batch
      and launching its kernels (the training process's share), on a CPU everything.
    - plan_cpu_ms_per_batch: of that, planning alone (`DeviceAugment.plan`, numpy on the
      host whatever the device).
    - wall_ms_per_batch: wall time to the end of the work (CUDA: after a synchronize).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    on_device = video.to(device)
    frame_size = tuple(video.shape[2:4])
    augment(on_device, params[0])
    if cuda:
        torch.cuda.synchronize(device)
    runs: dict[str, list[float]] = {"ms_per_batch": [], "host_cpu_ms_per_batch": [], "plan_cpu_ms_per_batch": [],
                                    "wall_ms_per_batch": []}
    for batch_params in params:
        cpu, wall = time.process_time(), time.perf_counter()
        plan = augment.plan(batch_params, frame_size)
        planned = time.process_time()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        augment.apply(on_device, plan)
        host = (time.process_time() - cpu) * 1000  # before any sync: the host's own work
        if cuda:
            end.record()
            torch.cuda.synchronize(device)
            runs["ms_per_batch"].append(start.elapsed_time(end))
        else:
            runs["ms_per_batch"].append(host)
        runs["host_cpu_ms_per_batch"].append(host)
        runs["plan_cpu_ms_per_batch"].append((planned - cpu) * 1000)
        runs["wall_ms_per_batch"].append((time.perf_counter() - wall) * 1000)
    batch = video.shape[0]
    out: dict[str, Any] = {
        "device": device_name(device), "batch": batch, "parameter_batches": len(params),
        "clock": "CUDA events" if cuda else f"process CPU time, {torch.get_num_threads()} thread(s)",
    }
    for name, values in runs.items():
        out[name] = statistics.mean(values)
        out[name.replace("_per_batch", "_per_clip")] = statistics.mean(values) / batch
        out[name + "_range"] = [min(values), max(values)]
    return out


def drawn_parameters(
    data: DataConfig, clip: ClipConfig, frame_size: tuple[int, int], batch: int, count: int, seed: int
) -> list[list[ClipParams]]:
    """`count` batches of `batch` clips' augmentation parameters for frames of `frame_size`,
    drawn as the loader draws them."""
    draw, rng = AugmentDraw(data, clip), np.random.default_rng(seed)
    return [[draw(*frame_size, rng) for _ in range(batch)] for _ in range(count)]


def stacked(clips: list[ClipParams], data: DataConfig, clip: ClipConfig) -> dict[str, torch.Tensor]:
    """A batch's parameters as the device path gets them (`stages.collate` of `to_tensors`)."""
    layers = AugmentDraw(data, clip).num_layers
    tensors = [p.to_tensors(layers, clip.img_size) for p in clips]
    return {name: torch.stack([t[name] for t in tensors]) for name in tensors[0]}


def measure_device_augment(
    preset: str = "mar_vit_l_k400", *, batch: int | None = None, device: str = "cuda",
    overrides: list[str] | tuple[str, ...] = (), repeats: int = 10, frame_size: tuple[int, int] = FRAME_SIZE,
    seed: int = 0,
) -> dict[str, Any]:
    """`DeviceAugment`'s cost per batch at a preset's shapes (`clip.num_frames` x
    `clip.img_size`^2 clips, `data.batch_size` clips unless `batch`, its RandAugment and its
    placement; `overrides` as `--set`), from random uint8 frames of `frame_size` (its cost
    does not depend on the pixels) and `repeats` batches of drawn parameters (its cost
    does depend on them), on `device`:
    `time_device_augment`'s numbers plus the settings (JSON-ready)."""
    from marscale.engine.config import load_train_config

    cfg = load_train_config(preset, list(overrides))
    data, clip = cfg.data, cfg.clip
    batch = batch or data.batch_size
    rng = np.random.default_rng(seed)
    video = torch.from_numpy(rng.integers(0, 256, (batch, clip.num_frames, *frame_size, 3), dtype=np.uint8))
    drawn = drawn_parameters(data, clip, frame_size, batch, repeats, seed + 1)
    params = [stacked(clips, data, clip) for clips in drawn]
    return {
        "preset": preset, "overrides": list(overrides), "clip": [clip.num_frames, clip.img_size, clip.img_size],
        "frames": list(frame_size), "rand_augment": data.rand_augment,
        "rand_augment_before_crop": data.rand_augment_before_crop, "random_erasing": data.random_erasing,
        **time_device_augment(DeviceAugment(data, clip), video, params, device),
    }


def bench_augmentation(
    folder: str, backend: str, draws: int, devices: list[str], before_crop: bool, batch: int = 8
) -> dict[str, Any]:
    """The augmentation alone, per clip, on the same decoded 16-frame windows (a batch of
    `batch`) and `draws` batches of parameters: the worker's (PIL) CPU ms, and
    `DeviceAugment`'s on each of `devices` (`time_device_augment`), means over the draws.
    RandAugment before the crop or after it."""
    cfg = dataclasses.replace(loader_config(folder, backend, 1, 2, batch, seed=0), rand_augment_before_crop=before_crop)
    parts = list(loader(cfg, "device", epoch=0))[: batch // 4]  # batches of 4 clips (2 videos)
    video = torch.cat([p["video"] for p in parts])
    clip = ClipConfig()
    host = TrainTransform(cfg, clip)
    drawn = drawn_parameters(cfg, clip, tuple(video.shape[2:4]), len(video), draws, seed=1)
    frames = video.numpy()
    host.apply(frames[0], drawn[0][0])  # warm-up
    worker = []
    for clip_params in drawn:
        cpu = time.process_time()
        for window, p in zip(frames, clip_params):
            host.apply(window, p)
        worker.append((time.process_time() - cpu) / len(frames) * 1000)
    out: dict[str, Any] = {"before_crop": before_crop, "frames": list(video.shape[2:4]), "batch": len(video),
                           "worker_cpu_ms_per_clip": statistics.mean(worker), "device": {}}
    params = [stacked(clip_params, cfg, clip) for clip_params in drawn]
    for device in devices:
        out["device"][device] = time_device_augment(DeviceAugment(cfg, clip), video, params, device)
    return out


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


def table(columns: list[str]) -> Callable[..., None]:
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")

    def row(*cells) -> None:
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)

    return row


class Report:
    """Every result of the run, kept as JSON at `path` (None: not written): rewritten after
    each case, so a case that fails is recorded with its error beside the others, and an
    interrupted run leaves what it measured."""

    def __init__(self, path: str | None, header: dict[str, Any]):
        self.path = path
        self.data: dict[str, Any] = {**header, "decode": [], "augmentation": [], "pipeline": [], "workers": [],
                                     "memory": []}
        self.write()

    def write(self) -> None:
        if self.path:
            write_json(self.path, self.data)

    def case(self, section: str, fields: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """`fields` + what `measure()` returns, or + {"error": ...} when it raises; recorded
        in `section` either way."""
        try:
            row = {**fields, **measure()}
        except Exception as error:  # noqa: BLE001 - one failing case must not lose the others
            first_line = (str(error).strip().splitlines() or [""])[0]
            row = {**fields, "error": f"{type(error).__name__}: {first_line}"}
            print(f"{section} {fields}: failed: {row['error']}", file=sys.stderr, flush=True)
        self.data[section].append(row)
        self.write()
        return row


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def both_sides(worker_rate: float | None, device_side_cpu_ms: float | None) -> float | None:
    """Clips per CPU-second counting the loader worker and the device side's CPU time per clip."""
    if not worker_rate or device_side_cpu_ms is None:
        return None
    return 1000.0 / (1000.0 / worker_rate + device_side_cpu_ms)


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
    parser.add_argument("--augment-batches", type=int, default=12,
                        help="parameter batches (8 clips each) of the augmentation-alone measurement")
    parser.add_argument("--clips", type=int, default=16, help="videos per timed pipeline run")
    parser.add_argument("--decoders", nargs="*", default=None, help="default: every available backend")
    parser.add_argument("--threads", type=int, default=2, help="PyAV is also measured with this many FFmpeg threads")
    parser.add_argument("--num-workers", type=int, nargs="*", default=[1, 2], help="loader processes, wall-time table")
    parser.add_argument("--rss-clips", type=int, default=2000, help="clips of the memory run (0: skip it)")
    parser.add_argument("--gpu-clips-per-s", type=float, default=200.0, help="training clips/s of one GPU (see above)")
    parser.add_argument("--workers", type=int, default=2, help="processes for rendering and converting")
    parser.add_argument("--work-dir", default="/tmp/marscale_bench_loader")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every result here (see above)")
    args = parser.parse_args()

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
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
               f"torch {torch.__version__}, GPU: {gpu or 'none'}")
    print(f"decoders: {', '.join(decoder_label(*d) for d in decoders)}; {machine}; 16x224x224 clips, dense interval 4")
    report = Report(args.json, {"settings": vars(args), "machine": machine, "gpu": gpu,
                                "decoders": [decoder_label(*d) for d in decoders]})
    for name, folder in folders.items():
        videos = read_videos(folder)
        kbps = np.mean([len(v) * 8 / 1000 / args.seconds for v, _ in videos])
        print(f"{name}: {len(videos)} videos, mean {kbps:.0f} kbit/s")

    print("\n### Decoding one dense 16-frame window (open + decode), ms per video\n")
    row = table(["decoder", "shards", "CPU ms", "wall ms"])
    for backend, threads in decoders:
        for name, folder in folders.items():
            r = report.case("decode", {"decoder": decoder_label(backend, threads), "shards": name}, lambda: dict(zip(
                ("cpu_ms", "wall_ms"), bench_decode(read_videos(folder), backend, threads, args.repeats))))
            row(r["decoder"], name, fmt(r.get("cpu_ms")), fmt(r.get("wall_ms")))

    print(f"\n### Augmentation alone, ms per clip (means over {args.augment_batches} batches of 8 clips' "
          "parameters; 16 frames of 240x320 -> 224x224, the full recipe)\n")
    row = table(["RandAugment", "where", "clock", "host CPU ms/clip", "of which planning", "device ms/clip"])
    augment = {}
    for before_crop in (False, True):
        placement = "before the crop (K400 presets)" if before_crop else "after the crop (this pipeline, SSv2 presets)"
        r = report.case("augmentation", {"rand_augment": placement}, lambda: bench_augmentation(
            folders["reencoded"], default, args.augment_batches, devices, before_crop))
        augment[before_crop] = r
        if "error" in r:
            row(placement, "failed: " + r["error"], "", "", "", "")
            continue
        row(placement, "worker (PIL, TrainTransform)", "process CPU time", fmt(r["worker_cpu_ms_per_clip"]), "", "")
        for device, d in r["device"].items():
            where = f"device = {'this CPU' if device == 'cpu' else d['device']} (DeviceAugment)"
            row(placement, where, d["clock"], fmt(d["host_cpu_ms_per_clip"]), fmt(d["plan_cpu_ms_per_clip"], 2),
                fmt(d["ms_per_clip"], 2) if device != "cpu" else "(the CPU's)")

    # The device placement's device-side cost per clip, for this pipeline's recipe
    # (RandAugment after the crop): its CPU time in the training process (all of it when
    # the device is this CPU: the CUDA rows plan and launch only), and GPU time on CUDA.
    device_side = augment[False].get("device", {})
    side = device_side.get("cuda") or device_side.get("cpu")
    side_cpu_ms = side["host_cpu_ms_per_clip"] if side else None
    side_gpu_ms = device_side["cuda"]["ms_per_clip"] if "cuda" in device_side else None
    side_where = "CUDA: host planning + launches" if "cuda" in device_side else "this CPU: the whole augmentation"
    report.data["device_side"] = {"cpu_ms_per_clip": side_cpu_ms, "gpu_ms_per_clip": side_gpu_ms,
                                  "plan_cpu_ms_per_clip": side["plan_cpu_ms_per_clip"] if side else None,
                                  "measured_on": side_where}
    report.write()

    print(f"\n### Training pipeline, one worker process; device side ({side_where}) "
          f"{fmt(side_cpu_ms)} CPU ms/clip{'' if side_gpu_ms is None else f', {side_gpu_ms:.2f} GPU ms/clip'}; "
          f"cores/GPU at {args.gpu_clips_per_s:g} clips/s\n")
    row = table(["decoder", "shards", "clips/video", "augment_on", "worker clips/CPU-s", "device-side CPU ms/clip",
                 "clips/CPU-s both sides", "clips/wall-s", "x worker placement", "cores/GPU", "GPU ms/clip"])
    for backend, threads in decoders:
        for name, folder in folders.items():
            for clips_per_video in (1, 2):
                rates = {}
                for placement in ("worker", "device"):
                    fields = {"decoder": decoder_label(backend, threads), "shards": name,
                              "clips_per_video": clips_per_video, "augment_on": placement}
                    r = report.case("pipeline", fields, lambda: dict(zip(("worker_clips_per_cpu_s", "clips_per_wall_s"),
                                    bench_pipeline(folder, backend, threads, clips_per_video, placement, args.clips,
                                                   args.repeats))))
                    extra_ms = side_cpu_ms if placement == "device" else 0.0
                    rate = both_sides(r.get("worker_clips_per_cpu_s"), extra_ms)
                    rates[placement] = rate
                    ratio = rate / rates["worker"] if rate and rates.get("worker") else None
                    r.update(device_side_cpu_ms_per_clip=extra_ms, clips_per_cpu_s_both_sides=rate,
                             x_worker_placement=ratio, cores_per_gpu=args.gpu_clips_per_s / rate if rate else None,
                             device_side_gpu_ms_per_clip=side_gpu_ms if placement == "device" else None)
                    report.write()
                    row(fields["decoder"], name, clips_per_video, placement,
                        fmt(r.get("worker_clips_per_cpu_s")) if "error" not in r else "failed: " + r["error"],
                        fmt(extra_ms), fmt(rate), fmt(r.get("clips_per_wall_s")), fmt(ratio, 2),
                        fmt(r["cores_per_gpu"]), fmt(r["device_side_gpu_ms_per_clip"], 2))

    print(f"\n### N loader workers ({decoder_label(default, 1)}, re-encoded, 2 clips/video, augment_on device)\n")
    row = table(["workers", "clips/s wall", "worker CPU ms/clip", "worker clips/CPU-s", "clips/CPU-s both sides"])
    for n in args.num_workers:
        r = report.case("workers", {"workers": n}, lambda: dict(zip(
            ("clips_per_wall_s", "worker_cpu_ms_per_clip"), bench_workers(folders["reencoded"], default, n,
                                                                          4 * args.clips))))
        if "error" in r:
            row(n, "failed: " + r["error"], "", "", "")
            continue
        r["clips_per_cpu_s_both_sides"] = both_sides(1000 / r["worker_cpu_ms_per_clip"], side_cpu_ms)
        report.write()
        row(n, fmt(r["clips_per_wall_s"]), fmt(r["worker_cpu_ms_per_clip"]), fmt(1000 / r["worker_cpu_ms_per_clip"]),
            fmt(r["clips_per_cpu_s_both_sides"]))

    if args.rss_clips:
        print(f"\n### Memory over {args.rss_clips} clips (one loader in this process, re-encoded, 2 clips/video)\n")
        row = table(["decoder", "augment_on", "RSS MiB after 100 clips", "RSS MiB at the end", "growth MiB",
                     "peak MiB", "worker clips/CPU-s"])
        for backend in backends:  # the peak includes what the tables above left in this process
            r = report.case("memory", {"decoder": decoder_label(backend, 1), "augment_on": "device"}, lambda: dict(zip(
                ("rss_mib_warm", "rss_mib_end", "peak_mib", "worker_clips_per_cpu_s"),
                bench_rss(folders["reencoded"], backend, "device", args.rss_clips))))
            if "error" in r:
                row(r["decoder"], "device", "failed: " + r["error"], "", "", "", "")
                continue
            growth = r["rss_mib_end"] - r["rss_mib_warm"]
            row(r["decoder"], "device", fmt(r["rss_mib_warm"], 0), fmt(r["rss_mib_end"], 0), f"{growth:+.0f}",
                fmt(r["peak_mib"], 0), fmt(r["worker_clips_per_cpu_s"]))


if __name__ == "__main__":
    main()
