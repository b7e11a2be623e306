"""Packed vs padded training steps on batches whose clips keep different numbers of tokens.

A MAR batch whose clips draw their mask ratios from {0.25, 0.5, 0.75} holds clips of
different lengths. Padding runs every clip at the longest one's length (masked tokens as pads, one
rectangular batch with no attention mask, so SDPA's fastest kernels stay open); packing concatenates the
visible tokens and attends within each clip (`marscale.model.attention`). This times a
training step (forward, loss, backward; no optimizer) of both, for batch compositions from
no padding to a lot, and reports the padding fraction (share of padded token slots), each
method's median step time, packing's speed-up and the crossover: the padding fraction above
which the fastest packed backend wins.

Imports only torch and marscale's model, masking, packing and losses: it runs where only
PyTorch is installed. On a GPU it also times the GPU backends (torch_varlen, flex,
flash_varlen where installed).

    # CPU: ViT-S at real shapes (16x224x224, 1568 tokens) and the demo's shapes, 1 thread
    python benchmarks/bench_packing.py
    # GPU, bf16 autocast
    python benchmarks/bench_packing.py --device cuda --batch 16 [--json out.json]
    # quick check of the code path
    python benchmarks/bench_packing.py --shapes demo --repeats 1 --batch 4

On CPU the times are process CPU time with one thread (as benchmarks/bench_model.py: on a
shared machine wall time swings with other load, one thread's CPU time counts the work).

A method that raises on a batch (out of memory, a kernel that refuses the input, anything)
is recorded in that row as `<method>_error` ("Type: message") and the others go on; a shape
that fails to build keeps its error. The JSON (`--json`) is written at the end whatever
failed, and when the run is interrupted, with the rows timed so far.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from marscale.core.clip import ClipConfig, token_grid  # noqa: E402
from marscale.engine.loss import build_loss  # noqa: E402
from marscale.tokens.masking import cell_running_mask  # noqa: E402
from marscale.model import BridgeConfig, ModelConfig, build_model  # noqa: E402
from marscale.model.attention import resolve_backend  # noqa: E402
from marscale.tokens.packing import pack_mask  # noqa: E402

SHAPES = {
    # name: (variant, frames, size, bridge)
    "vit_s": ("vit_s", 16, 224, BridgeConfig(embed_dim=384, depth=2, num_heads=6)),
    "demo": ("vit_tiny", 16, 64, BridgeConfig(embed_dim=96, depth=2, num_heads=4)),
}


def compositions(batch: int) -> list[tuple[str, list[float]]]:
    """Batch mixes from no padding to a lot (ratios per clip, in ascending order as the
    trainer draws them: clips of one length sit together)."""
    third = max(1, batch // 3)
    mixes = [
        ("all 50%", [0.5] * batch),
        ("one 50% among 25%", [0.5] + [0.25] * (batch - 1)),
        ("one 75% among 50%", [0.75] + [0.5] * (batch - 1)),
        ("two 50% among 25%", [0.5] * 2 + [0.25] * (batch - 2)),
        ("half 25%, half 50%", [0.25] * (batch // 2) + [0.5] * (batch - batch // 2)),
        ("one 25% among 50%", [0.25] + [0.5] * (batch - 1)),
        ("half 50%, half 75%", [0.5] * (batch // 2) + [0.75] * (batch - batch // 2)),
        ("thirds 25/50/75%", ([0.25] * third + [0.5] * third + [0.75] * batch)[:batch]),
        ("one 25% among 75%", [0.25] + [0.75] * (batch - 1)),
    ]
    return [(label, sorted(ratios)) for label, ratios in mixes]


def backends(device: torch.device) -> list[str]:
    names = ["per_clip", "sdpa_mask"] if device.type == "cpu" else ["per_clip", "sdpa_mask", "flex", "torch_varlen",
                                                                    "flash_varlen"]
    usable = []
    for name in names:
        try:
            resolve_backend(name, device)
            usable.append(name)
        except RuntimeError as e:
            print(f"  backend {name}: not available ({e})")
    return usable


def padded_step(model, loss_fn, video, labels, mask):
    """Every clip at the longest clip's length: each clip's visible tokens plus masked ones
    as pads, run as one uniform batch (attention's rectangular fast path, no mask: the pads
    are attended to, which costs what masked-out pads cost and keeps SDPA's fastest kernels
    open). The work of padding, not its exact numbers."""
    lengths = (~mask).sum(1)
    longest = int(lengths.max())
    padded = mask.clone()
    for b in range(mask.shape[0]):  # unmask the first (longest - length) masked tokens as pads
        pads = mask[b].nonzero().flatten()[: longest - int(lengths[b])]
        padded[b, pads] = False
    tokens = pack_mask(padded).to(video.device)
    assert tokens.uniform
    out = model(video, tokens)
    parts = loss_fn(out, video, tokens, labels)
    parts["loss"].backward()


def packed_step(model, loss_fn, video, labels, packed):
    out = model(video, packed)
    parts = loss_fn(out, video, packed, labels)
    parts["loss"].backward()


def timed(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    """(median seconds, median wall seconds) over `repeats` runs after one warm-up."""
    def clock():
        if device.type == "cuda":
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    fn()
    times, walls = [], []
    for _ in range(repeats):
        w0, t0 = time.perf_counter(), clock()
        fn()
        t1 = clock()
        times.append(t1 - t0)
        walls.append(time.perf_counter() - w0)
    return statistics.median(times), statistics.median(walls)


def describe(err: BaseException) -> str:
    """`Type: the message's first line`, as a row records an error."""
    lines = str(err).strip().splitlines()
    return type(err).__name__ + (f": {lines[0]}" if lines else "")


def run_shape(name: str, args, device: torch.device, rows: list[dict]) -> None:
    """Time every batch composition of shape `name`, appending each row to `rows` as it is
    done (so an interrupted run keeps them)."""
    variant, frames, size, bridge = SHAPES[name]
    clip = ClipConfig(num_frames=frames, img_size=size)
    cfg = ModelConfig(num_classes=400, variant=variant, drop_path=0.0, head_dropout=0.0, bridge=bridge)
    torch.manual_seed(0)
    model = build_model(cfg, clip).to(device).train()
    loss_fn = build_loss(clip, cfg.patch_size, recon_weight=1.0)
    grid = token_grid(clip, cfg.patch_size)
    g = torch.Generator().manual_seed(0)
    video = torch.randn(args.batch, 3, frames, size, size, generator=g).to(device)
    labels = torch.randint(0, 400, (args.batch,), generator=g).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    usable = backends(device)
    for label, ratios in compositions(args.batch):
        mask = cell_running_mask(args.batch, grid, ratios, torch.Generator().manual_seed(1))
        lengths = (~mask).sum(1)
        pad = 1 - float(lengths.sum()) / (args.batch * int(lengths.max()))
        row = {"shapes": name, "batch": label, "ratios": ratios, "padding": pad}

        def step(fn, *a):
            def go():
                model.zero_grad(set_to_none=True)
                with amp:
                    fn(model, loss_fn, video, labels, *a)
            return go

        rows.append(row)
        try:
            row["padded_s"], row["padded_wall_s"] = timed(step(padded_step, mask), args.repeats, device)
        except Exception as err:  # recorded; the packed backends still run
            row["padded_error"] = describe(err)
        packed = pack_mask(mask).to(device)
        for backend in usable:  # a uniform batch takes the rectangular fast path whatever the backend
            try:
                model.set_attention(backend, device)
                row[f"{backend}_s"], _ = timed(step(packed_step, packed), args.repeats, device)
            except Exception as err:
                row[f"{backend}_error"] = describe(err)
        ran = [b for b in usable if f"{b}_s" in row]
        if ran:
            row["best_packed"] = min(ran, key=lambda b: row[f"{b}_s"])
            if "padded_s" in row:
                row["speedup"] = row["padded_s"] / row[f"{row['best_packed']}_s"]
        print(format_row(row, usable), flush=True)


def format_row(row: dict, usable: list[str]) -> str:
    def cell(method: str) -> str:
        return f"{row[f'{method}_s']:.3f}s" if f"{method}_s" in row else f"failed ({row[f'{method}_error']})"

    packed = " ".join(f"{b} {cell(b)}" for b in usable)
    speedup = (f"packed/padded speed-up {row['speedup']:.2f}x ({row['best_packed']})" if "speedup" in row
               else "no speed-up (a method failed)")
    return (f"  {row['shapes']:6s} {row['batch']:20s} padding {row['padding']:5.1%} | padded {cell('padded')} | "
            f"{packed} | {speedup}")


def crossover(rows: list[dict]) -> str:
    """The padding fraction from which packing wins, from the measured rows of one shape
    (rows where padding or every packed backend failed have no speed-up and are left out)."""
    ordered = sorted((r for r in rows if "speedup" in r), key=lambda r: r["padding"])
    if not ordered:
        return "no row has both methods measured"
    losing = [r["padding"] for r in ordered if r["speedup"] < 1.0]
    winning = [r["padding"] for r in ordered if r["speedup"] >= 1.0]
    if not losing:
        return "packing wins at every measured padding fraction"
    if not winning:
        return "packing loses at every measured padding fraction"
    above = [w for w in winning if w > max(losing)]
    if not above:
        return f"no clean crossover: packing wins at {winning}, loses at {losing}"
    return f"packing wins from {min(above):.1%} padding (loses at {max(losing):.1%})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", default=["vit_s", "demo"], choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: CPU time counts work)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"packed vs padded training steps on {name}, torch {torch.__version__}, batch {args.batch}, "
          f"median of {args.repeats}")
    results: dict[str, dict] = {}
    complete = False
    try:
        for shape in args.shapes:
            results[shape] = {"rows": []}
            try:
                run_shape(shape, args, device, results[shape]["rows"])
            except Exception as err:  # building the model, drawing masks: the next shape goes on
                results[shape]["error"] = describe(err)
                print(f"  {shape}: failed: {results[shape]['error']}", flush=True)
            results[shape]["crossover"] = crossover(results[shape]["rows"])
            print(f"  {shape}: {results[shape]['crossover']}")
        complete = True
    finally:  # the rows so far, also when interrupted
        if args.json:
            Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "batch": args.batch,
                                                   "repeats": args.repeats, "complete": complete,
                                                   "results": results}, indent=1))
    failed = any("error" in r or any(k.endswith("_error") for row in r["rows"] for k in row) for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
