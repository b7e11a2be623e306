"""Distributed state in one place: rank, local rank, world size, this rank's device, main-rank logging.

Everything else asks this module instead of reading environment variables or calling
`torch.distributed` directly, so single-process runs (no launcher) and launched runs
(deepspeed, torchrun, SLURM) look the same to the rest of the code.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import sys
from typing import Any, Callable

import torch
import torch.distributed as torch_dist

from marscale.core import exits
from marscale.core.timeouts import backend_seconds


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def get_rank() -> int:
    if is_initialized():
        return torch_dist.get_rank()
    return int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    if is_initialized():
        return torch_dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def resolve_device(name: str) -> torch.device:
    """`run.device` (auto | cuda | cpu) -> the device of this rank (CUDA device = LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but CUDA is not available; use run.device=auto or cpu")
        return torch.device("cuda", get_local_rank())
    return torch.device("cpu")


def is_main() -> bool:
    return get_rank() == 0


def _slurm_to_torch_env() -> None:
    """Map SLURM's variables onto the torch.distributed ones when srun started us."""
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0
"""The process group's timeout when the caller gives none (torch's own default, 30 min)."""

_collective_timeout_s = DEFAULT_COLLECTIVE_TIMEOUT_S


DEFAULT_SETUP_TIMEOUT_S = 300.0
"""How long the ranks have to meet when the process group is set up (`run.setup_timeout_s`)."""


def init_distributed(
    backend: str | None = None,
    timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
    setup_timeout_s: float = DEFAULT_SETUP_TIMEOUT_S,
) -> None:
    """Initialise the process group for this process (idempotent).

    Works for a plain single process (no launcher: a one-rank group on a free local
    port), the deepspeed launcher, torchrun and srun. Backend: nccl with CUDA, else gloo.
    timeout_s (`run.collective_timeout_s`): how long a collective waits for the other ranks
    before it fails, on gloo and NCCL alike; with NCCL, asynchronous error handling is on
    (`TORCH_NCCL_ASYNC_ERROR_HANDLING=1`, unless set), so a rank stuck in a collective on
    the device is torn down after the timeout instead of waiting forever.

    With several ranks: the interface that routes to MASTER_ADDR carries gloo and NCCL
    unless GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME say otherwise (`cluster.netif`; local
    rank 0 prints the choice), and the set-up (every rank joining, one barrier) must end
    within setup_timeout_s (`run.setup_timeout_s`): otherwise the rank prints one line and
    exits with status 69 (`exits.PEER_LOST`), whatever the backend is waiting on.
    """
    global _collective_timeout_s
    if is_initialized():
        return
    _slurm_to_torch_env()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if get_world_size() > 1:
            raise RuntimeError("MASTER_PORT is not set: start multi-process runs with a launcher")
        os.environ["MASTER_PORT"] = str(free_port())
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if torch.cuda.is_available():
        torch.cuda.set_device(get_local_rank())

    if get_world_size() > 1:
        from marscale.cluster import netif

        chose = netif.choose(os.environ, os.environ["MASTER_ADDR"])
        if chose and get_local_rank() == 0:
            print(f"marscale: {chose}", file=sys.stderr, flush=True)

    # deepspeed.init_distributed wraps torch.distributed and records the backend for
    # DeepSpeed's own communication layer; it reads the same environment variables.
    import deepspeed

    from marscale.core import ds_ops

    ds_ops.skip_shm_comm_op()  # on CPU: no compile of an op marscale does not use

    _collective_timeout_s = timeout_s = backend_seconds(timeout_s)  # .inf: 365 days (marscale.core.timeouts)
    with _deadline(setup_timeout_s, _setup_overdue):
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        if get_world_size() > 1:
            barrier()  # every rank is here (NCCL connects at its first collective)


def _setup_overdue(seconds: float) -> str:
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    return (
        f"rank {get_rank()} of {get_world_size()} on {socket.gethostname()}: the ranks did not all meet at {where} "
        f"within run.setup_timeout_s={seconds:g} s (a node did not start, cannot reach the master or died during "
        f"start-up); start the job again on every node with --resume auto"
    )


class _deadline:
    """Run a block with a deadline: past it, print `message(seconds)` as marscale's one-line
    error and exit this process with status 69 at once (the block may be stuck in C++,
    where no Python exception reaches it)."""

    def __init__(self, seconds: float, message: Callable[[float], str]):
        import threading

        self.seconds, self.message = seconds, message
        self._done = threading.Event()

    def __enter__(self):
        import math
        import threading

        if math.isfinite(self.seconds):
            threading.Thread(target=self._watch, name="marscale-setup-deadline", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()

    def _watch(self) -> None:
        if self._done.wait(self.seconds):
            return
        print(f"marscale train: error: {self.message(self.seconds)}", file=sys.stderr, flush=True)
        exits.record(exits.PEER_LOST)
        os._exit(exits.PEER_LOST)


def collective_timeout() -> "datetime.timedelta":
    """The process group's timeout, for groups created later (`torch_dist.new_group(timeout=...)`)."""

    return datetime.timedelta(seconds=_collective_timeout_s)


EXIT_PEER_LOST = exits.PEER_LOST
"""Exit status of `marscale train` when another rank was lost (EX_UNAVAILABLE): the job
can be started again with `--resume auto` (launch/slurm.sbatch requeues on it); the
contract is `marscale.core.exits`."""


class PeerLost(RuntimeError):
    """A collective failed because another rank is gone (its process died, its node
    dropped off the network, or it did not answer within the process group's timeout).
    The message names the peer where the backend reported it."""


# What gloo and NCCL say when a peer is gone or silent (torch raises DistBackendError,
# DistNetworkError or a plain RuntimeError, depending on the call).
_LOST_PEER_SIGNS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Timed out waiting",
    "timed out",
    "Timeout",
    "NCCL communicator was aborted",
    "Watchdog caught collective operation timeout",
    "Connection refused",
    "No route to host",
    "Network is unreachable",
)
_PEER_ADDRESS = re.compile(r"\[([0-9A-Za-z.:%-]+)\]:(\d+)")


def lost_peer(error: BaseException) -> PeerLost | None:
    """A `PeerLost` saying which peer was lost and what the timeout is, when `error` (or
    an error it was raised from) is a collective failing on a missing rank; else None."""
    seen = error
    while seen is not None:
        text = str(seen)
        distributed = isinstance(seen, torch_dist.DistError) or any(
            name in text.lower() for name in ("gloo", "nccl", "c10d")
        )
        if distributed and any(sign in text for sign in _LOST_PEER_SIGNS):
            break
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    text = str(seen)
    peers = sorted({f"{host}:{port}" for host, port in _PEER_ADDRESS.findall(text)})
    who = f"peer {', '.join(peers)}" if peers else "a peer (the backend did not say which)"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(seen).__name__)
    return PeerLost(
        f"rank {get_rank()} of {get_world_size()} on {socket.gethostname()} lost {who}: {first[:300]}. "
        f"Another rank's process died, or its node dropped off the network or stopped answering for "
        f"run.collective_timeout_s={_collective_timeout_s:g} s"
    )


def decided_on_main(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) on the main rank only; its result, or the exception it raised, reaches
    every rank (collective). One rank does the work (reading and hashing checkpoint files)
    and no rank waits in a collective for a rank that failed: all return or all raise."""
    if not is_initialized() or get_world_size() == 1:
        return fn(*args)
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = (True, fn(*args))
        except Exception as e:  # handed to every rank, raised there
            box[0] = (False, e)
    torch_dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def free_port() -> int:
    """A TCP port free on this host now (a one-rank group's, or a launcher's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def destroy() -> None:
    """Tear the process group down, through DeepSpeed's communication layer when it holds
    it: that also drops the groups DeepSpeed cached (data parallel, world), which would
    otherwise point at the destroyed group when a later `init_distributed` in the same
    process (a second command run in-process, a notebook) builds an engine."""
    if not is_initialized():
        return
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    else:
        torch_dist.destroy_process_group()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted, not to the stream it
    was created with: a caller that swaps stderr (a test capturing it, a wrapper script)
    must not leave the root logger writing to a closed file."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it: nothing to keep
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Log INFO on the main rank and WARNING and above on the others."""
    fmt = f"[%(asctime)s rank{get_rank()}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(
        level=level if is_main() else logging.WARNING, format=fmt, datefmt="%H:%M:%S", force=True,
        handlers=[_StderrHandler()],
    )
