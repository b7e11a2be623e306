"""marscale/core/ds_ops.py: DeepSpeed builds no CPU communication op at start, and a stale
build lock is named (with its fix) instead of waited on, while a build under way is not."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import subprocess_env

from marscale.core import ds_ops

OP = "deepspeed_shm_comm"


def _lock(root, age_s: float = 0.0) -> str:
    """A lock of OP under `root`, as a killed build leaves it, last touched `age_s` ago."""
    os.makedirs(os.path.join(root, OP), exist_ok=True)
    path = os.path.join(root, OP, ds_ops.LOCK_FILE)
    open(path, "w").close()
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def _no_sleep(_s: float) -> None:
    raise AssertionError("waited")


def test_no_lock_passes(tmp_path):
    os.makedirs(tmp_path / OP)
    ds_ops.refuse_stale_build_locks(str(tmp_path), [OP, "cpu_adam"], sleep=_no_sleep)


def test_a_stale_lock_is_named_with_its_fix(tmp_path):
    path = _lock(tmp_path, age_s=ds_ops.STALE_AFTER_S + 60)
    with pytest.raises(ds_ops.StaleBuildLock) as e:
        ds_ops.refuse_stale_build_locks(str(tmp_path), [OP], sleep=_no_sleep)
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith(f"stale build lock {path}: ")
    assert "s old and held by no process on " in text
    assert text.endswith(f": rm {path} and start again")
    assert isinstance(e.value, ValueError)  # one line from `marscale train`, exit 78


def test_a_lock_a_build_on_this_host_holds_is_not_stale(tmp_path):
    """Another rank of this node builds (torch's FileBaton holds the lock open) while this
    one starts: not stale, whatever its age; DeepSpeed waits for that build."""
    path = os.path.join(tmp_path, OP, ds_ops.LOCK_FILE)
    os.makedirs(os.path.dirname(path))
    builder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from torch.utils.file_baton import FileBaton
            assert FileBaton({path!r}).try_acquire()
            print("building", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert builder.stdout.readline().strip() == "building"
        old = time.time() - 10 * ds_ops.STALE_AFTER_S
        os.utime(path, (old, old))
        assert ds_ops.lock_holders(path) == [builder.pid]
        ds_ops.refuse_stale_build_locks(str(tmp_path), [OP], sleep=_no_sleep)
    finally:
        builder.kill()
        builder.wait()


class _FakeClock:
    """time.time for the check, advanced by its sleeps (no real waiting)."""

    def __init__(self, start: float):
        self.now = start
        self.slept = 0

    def time(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s
        self.slept += 1


def test_a_young_lock_nobody_holds_is_waited_for_then_refused(tmp_path):
    """Perhaps a build on another host sharing the folder: waited for until it is stale."""
    path = _lock(tmp_path)
    clock = _FakeClock(os.stat(path).st_mtime)
    with pytest.raises(ds_ops.StaleBuildLock, match=f"rm {path} and start again"):
        ds_ops.refuse_stale_build_locks(
            str(tmp_path), [OP], stale_after_s=30.0, poll_s=1.0, clock=clock.time, sleep=clock.sleep
        )
    assert clock.slept == 30


def test_a_young_lock_that_goes_away_passes(tmp_path):
    """The other host's build ends and removes its lock: the start goes on."""
    path = _lock(tmp_path)
    clock = _FakeClock(os.stat(path).st_mtime)

    def build_ends(s: float) -> None:
        clock.sleep(s)
        if clock.slept == 5:
            os.remove(path)

    ds_ops.refuse_stale_build_locks(str(tmp_path), [OP], clock=clock.time, sleep=build_ends)
    assert clock.slept == 5


def test_extensions_root_is_the_folder_torch_builds_in(tmp_path, monkeypatch):
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert ds_ops.extensions_root() == os.path.dirname(_get_build_directory(OP, verbose=False))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert ds_ops.extensions_root() == os.path.dirname(_get_build_directory(OP, verbose=False))


def test_deepspeed_starts_its_cpu_backend_without_building_the_op(tmp_path):
    """What `marscale train` runs before `init_distributed`, then DeepSpeed's backend on one
    gloo rank: the op is never built (any JIT build fails this test at once, without
    compiling) and the backend has no shm op, so its all-reduce is gloo's."""
    script = textwrap.dedent("""
        import datetime, os
        import deepspeed
        from deepspeed.ops.op_builder.builder import OpBuilder
        from marscale.core import ds_ops, dist

        def no_build(self, verbose=True):
            raise SystemExit(f"DeepSpeed built {self.name}")

        OpBuilder.jit_load = no_build
        ds_ops.prepare_op_builds()
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(dist.free_port()))
        deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=60))
        from deepspeed.comm import comm
        print("shm op:", comm.cdb.shm_comm_op)
    """)
    env = subprocess_env()
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path), DS_ACCELERATOR="cpu")
    out = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "shm op: None"
    assert not os.path.exists(tmp_path / OP)
