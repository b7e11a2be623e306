"""DeepSpeed's compiled ops at start: the CPU one marscale never uses is not built, and a
build lock that a killed build left behind is named instead of waited on forever.

When its communication backend is created (`deepspeed.init_distributed`), DeepSpeed on
the CPU accelerator JIT-compiles its shared-memory all-reduce, `deepspeed_shm_comm`
(`deepspeed.comm.torch.build_shm_op` -> `ShareMemCommBuilder.load` -> `jit_load` ->
`torch.utils.cpp_extension.load`), in `extensions_root()/deepspeed_shm_comm`. Every new
process runs ninja there under the file `lock`; the build command depends on the
environment (compiler, flags), so runs from different environments rebuild it in turn
(56 s on the 2-core CPU). torch creates the lock with O_EXCL and others poll for it to
vanish with no time limit: a process killed mid-build leaves it, and every later start
sharing that folder (one home on several nodes) hangs after "Setting accelerator to CPU".

We avoid the build rather than do it once at set-up. The op serves only
`inference_all_reduce` (DeepSpeed's tensor-parallel inference layers); the all-reduce of
training goes to `torch.distributed` (gloo) either way, so no number marscale computes
changes. DeepSpeed skips the op when `deepspeed.ops.__compatible_ops__` marks it not
compatible (its own path for a machine that cannot build it); tests/test_ds_ops.py checks
that it still does. GPU accelerators have no such op: nothing to skip there.

DeepSpeed may still JIT-build other ops under the same kind of lock (`cpu_adam` with
`deepspeed.offload_optimizer`), so the start also refuses a stale lock of any DeepSpeed op.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable

import torch

log = logging.getLogger(__name__)

LOCK_FILE = "lock"
"""The file torch builds an extension under (`torch.utils.cpp_extension._jit_compile`:
`FileBaton(<build dir>/lock)`); it is held open by the building process."""

STALE_AFTER_S = 300.0
"""Age at which a lock that no process on this host holds is stale: a build takes about a
minute (56 s on the 2-core CPU), so a younger one may be a build on another host that
shares the folder, and is waited for."""


class StaleBuildLock(ValueError):
    """A build lock no process holds. A ValueError, like a bad input: `marscale train`
    reports it in one line and exits 78 (fix, then start again: a restart without the fix
    would meet the same lock)."""


def skip_shm_comm_op() -> bool:
    """Keep DeepSpeed from building (and loading) its CPU shared-memory all-reduce op.
    Call before `deepspeed.init_distributed`; True when DeepSpeed's accelerator has the op."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    # The builder `build_shm_op` asks for; None on accelerators without the op (CUDA).
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return False
    deepspeed.ops.__compatible_ops__[builder.NAME] = False
    return True


def extensions_root() -> str:
    """The folder torch builds JIT extensions in, one sub-folder per op:
    $TORCH_EXTENSIONS_DIR, else torch's cache folder for this Python and accelerator
    (~/.cache/torch_extensions/py311_cpu), named as `torch.utils.cpp_extension`'s
    `_get_build_directory` names it (which creates the folder; this only reads)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return root
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(get_default_build_root(), f"{python}_{accelerator}")


def lock_holders(path: str) -> list[int] | None:
    """Ids of the processes on this host that hold `path` open; None where /proc cannot
    tell (not Linux). Only this user's processes are readable, as are the builds that
    write this user's cache. readlink, not stat: no I/O on what a descriptor points to (a
    hung network file system would block a stat)."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    target = os.path.realpath(path)
    holders = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # another user's process, or one that has exited
            continue
        for fd in fds:
            try:
                if os.readlink(os.path.join(fd_dir, fd)) == target:
                    holders.append(int(pid))
                    break
            except OSError:
                continue
    return holders


def refuse_stale_build_locks(
    root: str,
    ops: Iterable[str],
    *,
    stale_after_s: float = STALE_AFTER_S,
    poll_s: float = 1.0,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once no build lock of `ops` under `root` is stale; raise StaleBuildLock
    naming the first one that is.

    A lock a process on this host holds is a build under way (another rank of this node
    builds while the others wait on the lock): DeepSpeed waits for it, and so do we, by
    returning. A lock nobody here holds is waited for while it is younger than
    `stale_after_s` (a build on another host sharing the folder ends and removes it) and
    refused once it is that old.
    """
    for op in ops:
        path = os.path.join(root, op, LOCK_FILE)
        waiting = False
        while True:
            try:
                age = clock() - os.stat(path).st_mtime
            except FileNotFoundError:
                break
            if lock_holders(path):
                break
            if age >= stale_after_s:
                raise StaleBuildLock(
                    f"stale build lock {path}: {age:.0f} s old and held by no process on "
                    f"{socket.gethostname()} (a build of DeepSpeed's {op} op was killed part-way; "
                    f"every start would wait on it forever): rm {path} and start again"
                )
            if not waiting:
                log.warning(
                    "waiting for %s (%.0f s old, held by no process on this host: a build on "
                    "another host?); refused as stale at %.0f s", path, age, stale_after_s,
                )
                waiting = True
            sleep(poll_s)


def prepare_op_builds() -> None:
    """Before DeepSpeed creates its communication backend: no CPU op built that marscale
    does not use (`skip_shm_comm_op`), no wait on a stale build lock of DeepSpeed's ops."""
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    skip_shm_comm_op()
    refuse_stale_build_locks(extensions_root(), sorted(ALL_OPS))
