"""Time MAR against full-token ViTs: training steps (forward + backward) and inference.

Compares measured time ratios with counted FLOP ratios (marscale.cost.counting), and on a GPU
reports clips/s, peak memory, achieved TFLOP/s and MFU. Imports only torch and
marscale's model, masking, losses and cost modules, so it runs where only PyTorch is
installed (e.g. a fresh GPU node with this checkout):

    # CPU (default without CUDA): ViT-S, 16x224x224, batch 1, 1 thread, MAR 50% vs full tokens
    python benchmarks/bench_model.py
    # GPU: ViT-L MAR 50% vs full ViT-L and full ViT-H, bf16 weights as the engine trains them,
    # batch 8, with and without activation checkpointing, JSON with device, versions, settings
    python benchmarks/bench_model.py --device cuda [--batch 8] [--grad-checkpointing on|off|both] \
        [--precision bf16-weights|autocast-fp32-weights|fp32] [--sdpa flash] [--compile] [--json out.json]
    # quick check of the GPU code path on CPU
    python benchmarks/bench_model.py --device cpu --variants vit_tiny --also-full vit_tiny \
        --precision bf16-weights --repeats 2

A training step is: forward, total loss (soft-target cross-entropy + masked MSE of the
reconstruction decoder for MAR), backward and an AdamW step (torch's fused kernel on CUDA,
foreach on CPU: what the engine's `optim.fused: auto` picks; two parameter groups,
decayed and not, as the engine's per-layer groups do the same work); `--no-optimizer`
leaves the step out. Each phase is timed (forward + loss, backward, optimizer) and set
beside what it must cost: the counted FLOPs of the phase at the device's peak, and for
the optimizer its memory traffic at the device's memory bandwidth (28 bytes per
parameter: fp32 weight, gradient and two moments read, weight and moments written; 40
under bf16-weights, which also reads the bf16 gradient, writes its fp32 copy, and copies
the updated fp32 weight back to bf16).
Inference is one forward without the decoder. The mask is cell running masking, drawn
once before timing.

Precision (`--precision`), named by what it computes, since "bf16" alone named two things:
- `bf16-weights` (default on CUDA): what the engine trains under `deepspeed.precision: bf16`
  (DeepSpeed's bf16 mode): weights, activations and gradients in bf16, the clip cast to
  bf16; the optimizer step copies the gradients into fp32, updates fp32 master weights
  with AdamW and copies them back into the bf16 weights.
- `autocast-fp32-weights`: PyTorch AMP: fp32 weights, gradients and AdamW, matmuls and
  attention in bf16 under `torch.autocast` (norms and softmax stay fp32). Not what the
  engine runs.
- `fp32` (default on CPU): everything in fp32 (the engine's `deepspeed.precision: fp32`).

Every case runs on its own: one that raises (out of memory, a CUDA error, anything) is
recorded with its error type and message and the others go on; the JSON (`--json`) is
written at the end whatever failed, and also when the run is interrupted (Ctrl-C), with
the steps timed so far.

Achieved TFLOP/s uses true FLOPs (2 x multiply-accumulates) counted on the same model
shape; recomputation under --grad-checkpointing is not counted (model FLOPs, as MFU is
defined). MFU divides by the engine's peak (`marscale.engine.metrics.resolve_peak`, the one
table) at the precision timed (bf16 for both bf16 forms); every row prints the peak.

Ratios: each MAR run against the full-token run of its size, and every run against the
reference (`--reference`, full ViT-H on CUDA) at the same checkpointing setting. Training
ratios should be within 10% of the FLOP ratio (the target), inference within 15%.

On CPU, time ratios compare process CPU time with one thread by default: on a shared
machine wall time swings with other load (seen: 1.0 s to 4.7 s for the same forward),
and with several threads OpenMP spin-waits while a sibling thread is descheduled,
inflating CPU time too. One thread's CPU time counts the work done, so it tracks FLOPs.
Wall time is printed beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from marscale.cost.counting import count_model  # noqa: E402
from marscale.cost.table import DISPLAY_NAMES  # noqa: E402
from marscale.core.clip import ClipConfig, token_grid  # noqa: E402
from marscale.engine.loss import build_loss  # noqa: E402
from marscale.engine.metrics import Peak, match_device, resolve_peak  # noqa: E402
from marscale.tokens.masking import MaskingConfig, make_mask  # noqa: E402
from marscale.tokens.packing import pack_mask  # noqa: E402
from marscale.model import VARIANTS, ModelConfig, build_model  # noqa: E402

RECON_WEIGHT = 0.01  # Kinetics-400; only the loss value depends on it, not the cost
OPTIMIZER_BYTES_PER_PARAM = {
    "fp32": 28,  # read fp32 weight, grad, m, v (16); write weight, m, v (12)
    "autocast-fp32-weights": 28,
    "bf16-weights": 40,  # + read the bf16 grad, write its fp32 copy (6); read the fp32 weight, write bf16 (6)
}
INFERENCE_TOLERANCE = 0.15
TRAIN_TOLERANCE = 0.10
PHASES = ("forward", "backward", "optimizer")
PRECISIONS = {
    "bf16-weights": "bf16 weights, activations and gradients; fp32 master weights and AdamW (the engine's bf16)",
    "autocast-fp32-weights": "fp32 weights, gradients and AdamW; matmuls in bf16 under torch.autocast",
    "fp32": "fp32 throughout",
}
"""`--precision`: each name says what is computed (see the module docstring)."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """One model at one mask ratio (0 = the full-token baseline), with or without
    activation checkpointing of every encoder block."""

    variant: str
    ratio: float
    recompute: bool = False

    @property
    def label(self) -> str:
        name = f"{DISPLAY_NAMES.get(self.variant, self.variant)} " + (
            "full" if self.ratio == 0 else f"MAR {round(self.ratio * 100)}%"
        )
        return name + (" +ckpt" if self.recompute else "")


@dataclasses.dataclass
class Result:
    setup: str
    variant: str
    ratio: float
    recompute: bool
    mode: str
    """'train' (forward + backward [+ optimizer]) or 'infer' (forward)."""
    precision: str
    """`PRECISIONS` key: what the step computes in."""
    batch: int
    times_s: list[float]
    """Wall time per step (CUDA-event time on GPU)."""
    flops_per_clip: int
    """True FLOPs (2 x MACs) per clip, counted."""
    flops_forward_per_clip: int = 0
    """Training: true FLOPs of the forward (with the decoder); the rest is backward."""
    params: int = 0
    cpu_times_s: list[float] | None = None
    """Process CPU time per step (CPU runs only)."""
    phase_s: dict[str, float] | None = None
    """Training: median time of each phase (forward + loss, backward, optimizer)."""
    phase_steps: list[dict[str, float]] | None = None
    """Training: each timed step by phase."""
    peak_mem_gib: float | None = None
    error: str | None = None
    """`Type: message` of what the case raised (None when it ran)."""

    @property
    def timed(self) -> bool:
        """Ran without an error and has timed steps (an interrupted run may have none)."""
        return self.error is None and bool(self.times_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def compare_s(self) -> float:
        """The time that ratios compare: CPU time on CPU, CUDA-event time on GPU."""
        return statistics.median(self.cpu_times_s) if self.cpu_times_s else self.median_s

    @property
    def tflops(self) -> float:
        return self.flops_per_clip * self.batch / self.median_s / 1e12


def model_config(args, s: Setup) -> ModelConfig:
    return ModelConfig(
        num_classes=args.num_classes,
        arch="vit" if s.ratio == 0 else "mar",
        variant=s.variant,
        grad_checkpointing=VARIANTS[s.variant].encoder.depth if s.recompute else 0,
    )


def clip_config(args) -> ClipConfig:
    return ClipConfig(num_frames=args.num_frames, img_size=args.img_size)


def sdpa_context(name: str):
    """Force one SDPA backend (`--sdpa`), or leave PyTorch's choice (auto)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([backend])


class Case:
    """A built model with fixed inputs, ready to run a training or an inference step."""

    def __init__(self, args, setup: Setup, device: torch.device):
        self.setup, self.device = setup, device
        self.cfg, self.clip = model_config(args, setup), clip_config(args)
        self.model = build_model(self.cfg, self.clip, device=device)
        if args.compile:
            for block in self.model.encoder.blocks:
                block.compile()  # in place; the encoder's loop and checkpointing stay eager
        self.loss = build_loss(self.clip, self.cfg.patch_size, RECON_WEIGHT)
        self.params = list(self.model.parameters())
        # bf16-weights: the model in bf16, and fp32 master copies of its weights for AdamW
        # to update, made from the bf16 weights as DeepSpeed's bf16 mode makes them.
        self.master = None
        dtype = torch.float32
        if args.precision == "bf16-weights":
            dtype = torch.bfloat16
            self.model.to(dtype)
            self.master = [p.detach().float() for p in self.params]
            for m in self.master:
                m.grad = torch.zeros_like(m)
        self.optimizer = None
        if args.optimizer:
            trained = self.master if self.master is not None else self.params
            decay = [p for p in trained if p.ndim > 1]
            rest = [p for p in trained if p.ndim <= 1]
            groups = [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}]
            impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
            self.optimizer = torch.optim.AdamW(groups, lr=1e-4, **impl)
        grid = token_grid(self.clip, self.cfg.patch_size)
        g = torch.Generator().manual_seed(0)
        b = args.batch
        shape = (b, 3, self.clip.num_frames, self.clip.img_size, self.clip.img_size)
        self.video = torch.randn(shape, generator=g).to(device, dtype)  # the engine casts the clip to its dtype
        self.target = torch.softmax(torch.randn(b, self.cfg.num_classes, generator=g), -1).to(device)
        self.tokens = self.eval_tokens = None
        if setup.ratio > 0:
            masking = MaskingConfig(kind=args.mask, ratio=setup.ratio)
            self.tokens = pack_mask(make_mask(masking, b, grid, g, train=True)).to(device)
            self.eval_tokens = pack_mask(make_mask(masking, b, grid, g, train=False)).to(device)
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "autocast-fp32-weights"
            else contextlib.nullcontext()
        )
        self.sdpa = args.sdpa

    def train_step(self, mark=lambda phase: None) -> None:
        """One training step; `mark(phase)` is called as each phase ends."""
        self.model.train()
        with sdpa_context(self.sdpa):
            with self.autocast:
                out = self.model(self.video, self.tokens)
                loss = self.loss(out, self.video, self.tokens, self.target)["loss"]
            mark("forward")
            loss.backward()
        mark("backward")
        if self.optimizer is not None:
            self.optimizer_step()
        self.model.zero_grad(set_to_none=True)
        mark("optimizer")

    @torch.no_grad()
    def optimizer_step(self) -> None:
        if self.master is None:
            self.optimizer.step()
            return
        torch._foreach_copy_([m.grad for m in self.master], [p.grad for p in self.params])  # bf16 -> fp32
        self.optimizer.step()
        torch._foreach_copy_(self.params, self.master)  # fp32 -> the bf16 weights

    def infer_step(self, mark=lambda phase: None) -> None:
        self.model.eval()
        with torch.inference_mode(), self.autocast, sdpa_context(self.sdpa):
            self.model(self.video, self.eval_tokens)

    def step(self, mode: str, mark=lambda phase: None) -> None:
        (self.train_step if mode == "train" else self.infer_step)(mark)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _phases(marks: list[tuple[str, float]], start: float) -> dict[str, float]:
    out, last = {}, start
    for phase, t in marks:
        out[phase] = t - last
        last = t
    return out


def time_cpu(setups: list[Setup], modes: list[str], args, results: list[Result]) -> None:
    """All models built up front and timed in turn (round robin), so a slow spell of a
    shared machine hits every case alike. Fills `results` as it goes (one per setup and
    mode, appended before timing starts), so an interrupted run keeps what was timed."""
    device = torch.device("cpu")
    running: list[tuple[Case, Result]] = []
    for s in setups:
        try:
            case = Case(args, s, device)
        except Exception as err:  # the other cases go on
            results += [failed(args, s, m, f"building the model: {describe(err)}") for m in modes]
            continue
        for m in modes:
            r = counted(args, s, m, [])
            r.cpu_times_s, r.phase_steps = [], []
            results.append(r)
            running.append((case, r))
    for case, r in list(running):
        try:
            for _ in range(args.warmup):
                case.step(r.mode)
        except Exception as err:
            r.error = describe(err)
            running.remove((case, r))
    for _ in range(args.repeats):
        for case, r in list(running):
            marks: list[tuple[str, float]] = []
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                case.step(r.mode, lambda phase: marks.append((phase, time.process_time())))
            except Exception as err:
                r.error = describe(err)
                running.remove((case, r))
                continue
            r.times_s.append(time.perf_counter() - t0)
            r.cpu_times_s.append(time.process_time() - c0)
            if r.mode == "train":
                r.phase_steps.append(_phases(marks, c0))
                r.phase_s = median_phases(r.phase_steps)


def median_phases(per_step: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(p[k] for p in per_step) for k in per_step[0]} if per_step else {}


def describe(err: BaseException) -> str:
    """`Type: the message's first line`, as a result records an error."""
    lines = str(err).strip().splitlines()
    return type(err).__name__ + (f": {lines[0]}" if lines else "")


def time_cuda(setups: list[Setup], modes: list[str], args, device: torch.device, results: list[Result]) -> None:
    """One model on the GPU at a time (clean peak memory); CUDA events, one sync per case.
    Any error (out of memory, a CUDA error) is recorded in that case's result and the next
    case runs; a CUDA error that breaks the context fails the later cases in turn."""
    for s in setups:
        try:
            case = Case(args, s, device)
        except Exception as err:
            results += [failed(args, s, m, f"building the model: {describe(err)}") for m in modes]
            continue
        for m in modes:
            try:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                for _ in range(args.warmup):
                    case.step(m)
                steps = []
                for _ in range(args.repeats):
                    start = torch.cuda.Event(enable_timing=True)
                    marks: list[tuple[str, torch.cuda.Event]] = []

                    def mark(phase):
                        e = torch.cuda.Event(enable_timing=True)
                        e.record()
                        marks.append((phase, e))

                    start.record()
                    case.step(m, mark)
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                    steps.append((start, marks, end))
                sync(device)
                r = result(case, m, [a.elapsed_time(b) / 1e3 for a, _, b in steps], args)
                if m == "train":
                    r.phase_steps = [_phases([(p, start.elapsed_time(e) / 1e3) for p, e in marks], 0.0)
                                     for start, marks, _ in steps]
                    r.phase_s = median_phases(r.phase_steps)
                r.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
            except Exception as err:
                r = failed(args, s, m, describe(err))
            results.append(r)
            case.model.zero_grad(set_to_none=True)
        del case  # its memory returns to the allocator before the next case is built


def result(case: Case, mode: str, times: list[float], args) -> Result:
    return counted(args, case.setup, mode, times)


def failed(args, s: Setup, mode: str, error: str) -> Result:
    r = counted(args, s, mode, [])
    r.error = error
    return r


def counted(args, s: Setup, mode: str, times: list[float]) -> Result:
    c = count_model(model_config(args, s), clip_config(args), s.ratio)
    flops = 2 * (c.macs_training if mode == "train" else c.macs_inference)
    return Result(s.label, s.variant, s.ratio, s.recompute, mode, args.precision, args.batch, times, flops,
                  flops_forward_per_clip=2 * c.macs_training_forward, params=c.params_training)


def baseline_of(r: Result, results: list[Result]) -> Result | None:
    """The full-token run of the same size, mode and checkpointing (the ratio's denominator)."""
    for b in results:
        if (b.variant, b.ratio, b.mode, b.recompute) == (r.variant, 0, r.mode, r.recompute) and b.timed:
            return b
    return None


def reference_of(r: Result, results: list[Result], variant: str | None) -> Result | None:
    """The full-token `variant` run of the same mode and checkpointing."""
    if variant is None:
        return None
    for b in results:
        if (b.variant, b.ratio, b.mode, b.recompute) == (variant, 0, r.mode, r.recompute) and b.timed:
            return b
    return None


def markdown(results: list[Result], peak: Peak, gpu: bool) -> str:
    """One row per result; TFLOP/s and MFU with the peak they are set against in the row."""
    head = ["model", "mode", "precision", "batch", "median ms"] + ([] if gpu else ["CPU ms"])
    head += ["clips/s", "time / full", "FLOPs / full", "GFLOP/clip", "TFLOP/s", "MFU", "MFU peak TFLOP/s"]
    if gpu:
        head.append("peak mem GiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        if not r.timed:
            error = r.error or "not timed"
            lines.append("| " + " | ".join([r.setup, r.mode, r.precision, str(r.batch), error]
                                           + ["-"] * (len(head) - 5)) + " |")
            continue
        base = baseline_of(r, results)
        cells = [r.setup, r.mode, r.precision, str(r.batch), f"{r.median_s * 1e3:.1f}"]
        if not gpu:
            cells.append(f"{r.compare_s * 1e3:.1f}")
        cells += [
            f"{r.batch / r.median_s:.2f}",
            f"{r.compare_s / base.compare_s:.3f}" if base else "-",
            f"{r.flops_per_clip / base.flops_per_clip:.3f}" if base else "-",
            f"{r.flops_per_clip / 1e9:.1f}",
            f"{r.tflops:.3f}" if r.tflops < 1 else f"{r.tflops:.1f}",
            f"{r.tflops / peak.tflops:.1%}" if peak.tflops else "-",
            f"{peak.tflops:g} ({peak.name})" if peak.tflops else "none",
        ]
        if gpu:
            cells.append(f"{r.peak_mem_gib:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def phase_table(results: list[Result], peak: float | None, bandwidth: float | None) -> str:
    """Each training phase: what it took (median) beside what it must cost on this device."""
    head = ["model", "phase", "took ms", "must cost ms", "counted"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        if r.mode != "train" or not r.timed or not r.phase_s:
            continue
        need = {
            "forward": (r.flops_forward_per_clip * r.batch, "FLOP"),
            "backward": ((r.flops_per_clip - r.flops_forward_per_clip) * r.batch, "FLOP"),
            "optimizer": (OPTIMIZER_BYTES_PER_PARAM[r.precision] * r.params, "B"),
        }
        for phase in PHASES:
            if phase not in r.phase_s:
                continue
            amount, unit = need[phase]
            rate = (peak * 1e12 if unit == "FLOP" else bandwidth * 1e12 if bandwidth else None) if peak else None
            must = f"{amount / rate * 1e3:.2f}" if rate else "-"
            lines.append(f"| {r.setup} | {phase} | {r.phase_s[phase] * 1e3:.1f} | {must} | "
                         f"{amount / 1e9:.2f} G{unit} |")
    return "\n".join(lines)


def ratio_checks(results: list[Result], reference: str | None = None) -> list[str]:
    """Measured time ratio vs counted FLOP ratio: every MAR run against the full run of its
    size, and every other run against the full `reference` size."""
    lines = []
    for r in results:
        if not r.timed:
            continue
        pairs = [("full " + DISPLAY_NAMES.get(r.variant, r.variant), baseline_of(r, results))] if r.ratio else []
        ref = reference_of(r, results, reference)
        if ref is not None and ref.variant != r.variant:
            pairs.append(("full " + DISPLAY_NAMES.get(ref.variant, ref.variant), ref))
        for name, base in pairs:
            if base is None:
                continue
            t, f = r.compare_s / base.compare_s, r.flops_per_clip / base.flops_per_clip
            clock = "CPU-time" if r.cpu_times_s else "time"
            line = f"{r.setup} {r.mode} vs {name}: {clock} ratio {t:.3f}, FLOP ratio {f:.3f} (time/FLOP {t / f:.2f})"
            if r.cpu_times_s:
                line += f"; wall-time ratio {r.median_s / base.median_s:.3f}"
            tolerance = TRAIN_TOLERANCE if r.mode == "train" else INFERENCE_TOLERANCE
            ok = abs(t / f - 1) <= tolerance
            line += f" -> {'within' if ok else 'NOT within'} {tolerance:.0%} of the FLOP ratio"
            lines.append(line)
    return lines


def environment(device: torch.device, name: str) -> dict:
    """Device, versions and the commit: enough to tell two result files apart."""
    env = {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["sdpa_flash_enabled"] = torch.backends.cuda.flash_sdp_enabled()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                       capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = None  # a copied checkout without .git
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", nargs="+", default=None, help="default: vit_s on CPU, vit_l on CUDA")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.0], help="mask ratios (0 = full tokens)")
    p.add_argument("--also-full", nargs="*", default=None,
                   help="extra full-token variants to time (default: vit_h on CUDA, none on CPU)")
    p.add_argument("--reference", default=None,
                   help="full-token variant every run is also compared with (default: vit_h on CUDA, none on CPU)")
    p.add_argument("--modes", nargs="+", choices=("train", "infer"), default=["train", "infer"])
    p.add_argument("--batch", type=int, default=None, help="clips per step (default: 1 on CPU, 8 on CUDA)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=400)
    p.add_argument("--mask", choices=("cell_running", "random"), default="cell_running")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                   help="bf16-weights (the engine's bf16: bf16 weights, fp32 master weights in AdamW), "
                   "autocast-fp32-weights (torch.autocast over fp32 weights) or fp32 "
                   "(default: bf16-weights on CUDA, fp32 on CPU)")
    p.add_argument("--grad-checkpointing", nargs="?", const="on", choices=("off", "on", "both"), default=None,
                   help="recompute every encoder block in backward: off, on (the bare flag) or both "
                        "(default: both on CUDA, off on CPU)")
    p.add_argument("--optimizer", action=argparse.BooleanOptionalAction, default=True,
                   help="include the AdamW step in a training step (default: on)")
    p.add_argument("--sdpa", choices=("auto", "flash", "efficient", "cudnn", "math"), default="auto",
                   help="force one scaled-dot-product-attention backend (default: PyTorch's choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile every encoder block")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per case (default: 1 CPU, 3 CUDA)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per case (default: 5 CPU, 10 CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="for MFU (default: the GPU's row of marscale.engine.metrics.DEVICE_PEAKS at the precision timed)")
    p.add_argument("--bandwidth-tbs", type=float, default=None,
                   help="memory bandwidth for the optimizer's cost (default: from the GPU's name)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 on CPU, see above)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    defaults = dict(variants=["vit_l" if gpu else "vit_s"], also_full=["vit_h"] if gpu else [],
                    reference="vit_h" if gpu else None, batch=8 if gpu else 1,
                    precision="bf16-weights" if gpu else "fp32",
                    grad_checkpointing="both" if gpu else "off", warmup=3 if gpu else 1,
                    repeats=10 if gpu else 5, threads=None if gpu else 1)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    recompute = {"off": [False], "on": [True], "both": [False, True]}[args.grad_checkpointing]
    setups = [Setup(v, r, c) for c in recompute for v in args.variants for r in args.ratios]
    setups += [Setup(v, 0.0, c) for c in recompute for v in args.also_full if Setup(v, 0.0, c) not in setups]

    # The engine's peak table (marscale.engine.metrics.DEVICE_PEAKS), at the precision timed.
    peak = resolve_peak(device, "fp32" if args.precision == "fp32" else "bf16", args.peak_tflops, "--peak-tflops")
    bandwidth = args.bandwidth_tbs
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        row = match_device(name)
        bandwidth = bandwidth or (row.bandwidth_tbs if row else None)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        threads = torch.get_num_threads()
        name = f"CPU, {threads} thread{'' if threads == 1 else 's'}"
    clip = f"{args.num_frames}x{args.img_size}x{args.img_size}"
    print(f"# {name}; torch {torch.__version__}; clip {clip}; batch {args.batch}; "
          f"{args.precision} ({PRECISIONS[args.precision]}); grad checkpointing {args.grad_checkpointing}; "
          f"{'AdamW step' if args.optimizer else 'no optimizer step'}; SDPA {args.sdpa}"
          f"{'; compiled blocks' if args.compile else ''}; median of {args.repeats} after {args.warmup} warm-up",
          flush=True)

    results: list[Result] = []
    complete = False
    try:
        if device.type == "cuda":
            time_cuda(setups, args.modes, args, device, results)
        else:
            time_cpu(setups, args.modes, args, results)
        complete = True
    finally:  # the results so far, also when interrupted
        for r in results:
            if r.error is None and not r.times_s:
                r.error = "not timed: the run was interrupted"
        checks = report(results, args, device, peak, bandwidth)
        if args.json:
            write_json(args, argv, device, name, peak, bandwidth, results, checks, complete)
    return 0 if all(r.error is None for r in results) else 1


def report(results: list[Result], args, device: torch.device, peak: Peak, bandwidth: float | None) -> list[str]:
    """Print the tables and ratio checks; returns the checks."""
    print(markdown(results, peak, device.type == "cuda"))
    if device.type == "cpu":
        print("\ntime / full compares process CPU time (medians); clips/s and TFLOP/s use wall time.")
    print(f"\n{peak.describe()}" + ("; TFLOP/s from true FLOPs (2 x MACs), marscale.cost.counting."
                                   if peak.tflops else ""))
    phases = phase_table(results, peak.tflops, bandwidth)
    if phases.count("\n") > 1:
        clock = "CPU time" if device.type == "cpu" else "CUDA events"
        print(f"\nTraining step by phase ({clock}, medians); 'must cost': counted FLOPs at "
              f"{peak.tflops or '?'} TFLOP/s, optimizer bytes at {bandwidth or '?'} TB/s:")
        print(phases)
    checks = ratio_checks(results, args.reference)
    if checks:
        print()
        print("\n".join(checks))
    return checks


def write_json(args, argv, device: torch.device, name: str, peak: Peak, bandwidth: float | None,
               results: list[Result], checks: list[str], complete: bool) -> None:
    doc = {
        **environment(device, name),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else " ".join(argv),
        "complete": complete,
        "precision": args.precision,
        "precision_means": PRECISIONS[args.precision],
        "peak_tflops": peak.tflops,
        "mfu_peak": peak.name,
        "bandwidth_tbs": bandwidth,
        "results": [
            dict(dataclasses.asdict(r), median_s=r.median_s if r.times_s else None,
                 mfu=r.tflops / peak.tflops if peak.tflops and r.times_s else None, mfu_peak=peak.name,
                 mfu_peak_tflops=peak.tflops)
            for r in results
        ],
        "ratio_checks": checks,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2))
    print(f"\nwrote {args.json}" + ("" if complete else " (incomplete: interrupted)"))


if __name__ == "__main__":
    sys.exit(main())
