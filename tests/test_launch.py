"""The exit-status contract (marscale/core/exits.py) and the launch wrapper behind
launch/*.sh (marscale/cluster/launch.py) without a cluster: status mapping, a bad config
refused in one line before anything starts, hostfile errors, torchrun's failure summary,
the network interface choice, the stop file. The two-host behaviour (ssh checks,
pre-emption across hosts, a lost node) is in tests/test_multinode.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from helpers import REPO, fresh_shell_env, subprocess_env

from marscale import cli
from marscale.cluster import launch, netif
from marscale.core import exits
from marscale.core.dist import free_port


@pytest.mark.parametrize(
    "raw, status",
    [
        (0, 0), (1, 1), (2, 2), (68, 68), (69, 69), (75, 75), (78, 78),
        (-9, 69),  # Python: killed by SIGKILL
        (247, 69),  # the deepspeed launcher: sys.exit(-9)
        (137, 69),  # a shell or srun: 128 + SIGKILL
        (134, 69),  # SIGABRT: NCCL's watchdog tearing the process down
        (250, 69),  # the deepspeed launcher: a rank aborted (-6)
        (255, 69),  # ssh (pdsh): the connection to a host was lost
        (3, 1), (100, 1),  # anything else: an unforeseen error
    ],
)
def test_every_launcher_status_maps_to_the_contract(raw, status):
    assert exits.job_status(raw) == status


def test_combine_keeps_the_most_telling_status():
    assert exits.combine([]) == exits.FINISHED
    assert exits.combine([69, 75, -15]) == exits.PREEMPTED  # the peers of a pre-empted job
    assert exits.combine([1, -9]) == exits.PEER_LOST
    assert exits.combine([78, 69]) == exits.BAD_INPUT


def test_the_mapping_as_a_command_for_shell_scripts():
    run = subprocess.run([sys.executable, "-m", "marscale.core.exits", "247"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "69"
    bad = subprocess.run([sys.executable, "-m", "marscale.core.exits", "x"], capture_output=True, text=True)
    assert bad.returncode == exits.USAGE and "usage" in bad.stderr


def test_a_command_records_its_status_for_the_wrapper(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(exits.STATUS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    demo = os.path.join(REPO, "marscale", "configs", "demo.yaml")
    assert cli.main(["train", "--config", demo, "--set", "optim.lrr=1"]) == exits.BAD_INPUT
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err
    assert exits.recorded(str(tmp_path)) == {os.getpid(): exits.BAD_INPUT}
    assert open(tmp_path / f"status-{os.getpid()}").read().split() == ["3", "78"]


@pytest.mark.parametrize("script", ["launch/deepspeed.sh", "launch/torchrun.sh"])
def test_a_bad_config_stops_the_launch_script_in_one_line(script, tmp_path):
    """From a shell without the virtual environment on PATH: one line, status 78, no
    launcher started (nothing printed as `+ deepspeed` / `+ torchrun`)."""
    started = time.time()
    proc = subprocess.run(["bash", script, "demo", "--set", "masking.ratio=0.3"], cwd=REPO, env=fresh_shell_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == exits.BAD_INPUT, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("marscale train: error: ") and "got ratio 0.3" in lines[0], proc.stderr
    assert "+ " not in proc.stderr and time.time() - started < 60


def test_hostfile_mistakes_are_named(tmp_path):
    bad = tmp_path / "hosts.txt"
    bad.write_text("node-a slots=2\nnode-b 8\n")
    with pytest.raises(launch.LaunchError, match=r"line 2: 'node-b 8' is not 'HOST slots=N'") as e:
        launch.read_hostfile(str(bad))
    assert e.value.status == exits.BAD_INPUT
    bad.write_text("# only a comment\n\n")
    with pytest.raises(launch.LaunchError, match="names no host"):
        launch.read_hostfile(str(bad))
    bad.write_text("node-a slots=2  # the first\n\nnode-b\n")
    assert launch.read_hostfile(str(bad)) == ["node-a", "node-b"]
    with pytest.raises(launch.LaunchError, match="No such file"):
        launch.read_hostfile(str(tmp_path / "missing.txt"))


def test_no_ssh_needs_its_settings(tmp_path):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("a slots=1\nb slots=1\n")
    env = {"NO_SSH": "1", "HOSTFILE": str(hostfile), "NODE_RANK": "2", "MASTER_ADDR": "127.0.0.1"}
    with pytest.raises(launch.LaunchError, match="NODE_RANK=2 but HOSTFILE .* has 2 hosts"):
        launch.plan_deepspeed("demo", [], env, str(tmp_path))
    with pytest.raises(launch.LaunchError, match="NO_SSH needs MASTER_ADDR"):
        launch.plan_deepspeed("demo", [], {"NO_SSH": "1", "HOSTFILE": str(hostfile), "NODE_RANK": "0"}, str(tmp_path))


def test_a_taken_master_port_and_a_silent_master_are_named():
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(launch.LaunchError, match=f"MASTER_PORT {port} is in use") as e:
            launch.check_port_free(port)
        assert e.value.status == exits.NO_HOST
        launch.check_answers("127.0.0.1", port, 2)  # listening: answers
    launch.check_answers("127.0.0.1", free_port(), 2)  # refused: the host is up, the job not yet
    with pytest.raises(launch.LaunchError, match="does not resolve"):
        launch.check_answers("no-such-node.invalid", 29500, 2)


def test_launcher_results_become_one_status(tmp_path):
    """torchrun's own exit is 1 whatever failed: the wrapper takes the failed workers'
    codes it saw, else the statuses the workers recorded; the deepspeed launcher's status
    maps as it is."""
    torchrun = launch.Launch(["torchrun"], {}, torchrun=True)
    status_dir = tmp_path / "status"
    status_dir.mkdir()
    (status_dir / "status-11").write_text("0 75\n")  # a worker torchrun stopped after the failure saved
    assert launch.final_status(torchrun, 1, str(status_dir), failures=[-9]) == exits.PEER_LOST
    assert launch.final_status(torchrun, 1, str(status_dir), failures=[78, 78]) == exits.BAD_INPUT
    assert launch.final_status(torchrun, 1, str(status_dir)) == exits.PREEMPTED  # SIGTERM: every worker saved
    assert launch.final_status(torchrun, 0, str(status_dir)) == exits.FINISHED
    (status_dir / "status-11").unlink()
    assert launch.final_status(torchrun, 1, str(status_dir)) == exits.PEER_LOST  # the rendezvous did not form
    deepspeed = launch.Launch(["deepspeed"], {})
    assert launch.final_status(deepspeed, 247, str(status_dir)) == exits.PEER_LOST
    assert launch.final_status(deepspeed, 75, str(status_dir)) == exits.PREEMPTED


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "soon"])
def test_the_check_timeout_is_checked(value, tmp_path):
    with pytest.raises(launch.LaunchError, match="CHECK_TIMEOUT_S") as e:
        launch.plan_deepspeed("demo", [], {"CHECK_TIMEOUT_S": value}, str(tmp_path))
    assert e.value.status == exits.BAD_INPUT


def _interface_with_address() -> tuple[str, str] | None:
    for _, name in socket.if_nameindex():
        address = netif.interface_address(name)
        if address and not address.startswith("127."):
            return name, address
    return None


def test_the_interface_that_routes_to_the_master_is_chosen_unless_set():
    found = _interface_with_address()
    if found is None:
        pytest.skip("no interface with an IPv4 address besides loopback")
    name, address = found
    env: dict[str, str] = {}
    line = netif.choose(env, address)  # the master is this host: the interface holding its address
    assert env == {"GLOO_SOCKET_IFNAME": name, "NCCL_SOCKET_IFNAME": name}
    assert f"={name} ({address}, the route to MASTER_ADDR {address})" in line
    env = {"GLOO_SOCKET_IFNAME": "ib0"}
    netif.choose(env, address)
    assert env == {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": name}  # only what is unset
    env = {}
    assert netif.choose(env, "127.0.0.1") is None and env == {}  # one machine: loopback, nothing to choose


def test_a_stop_file_stops_like_a_signal(tmp_path):
    from marscale.core.signals import StopSignal

    stop = StopSignal(stop_file=str(tmp_path / "STOP"))
    try:
        assert not stop.agreed()
        (tmp_path / "STOP").write_text("")
        assert stop.agreed() and stop.received == str(tmp_path / "STOP")
    finally:
        stop.close()


@pytest.mark.distributed
def test_a_rank_alone_gives_up_after_the_setup_timeout(synthetic_shards, tmp_path):
    """Rank 0 of 2 whose peer never starts: one line and status 69 after
    run.setup_timeout_s, not the collective timeout (30 min by default)."""
    from helpers import run_overrides

    env = subprocess_env()
    env.update(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = [sys.executable, "-m", "marscale.cli", "train", "--config", "demo", "--set", "run.setup_timeout_s=3"]
    for o in run_overrides(synthetic_shards, str(tmp_path / "run")):
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == exits.PEER_LOST, proc.stderr[-3000:]
    assert "the ranks did not all meet at 127.0.0.1:" in proc.stderr and "run.setup_timeout_s=3 s" in proc.stderr


FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: every task's processes end with $TASK_STATUS (a status, or "killed" by signal 9)
if [[ $TASK_STATUS == killed ]]; then exec bash -c 'kill -9 $$'; fi
exit "$TASK_STATUS"
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ $1 == show && $2 == hostnames ]]; then echo 127.0.0.1; fi
if [[ $1 == requeue ]]; then echo "$2" >> "$REQUEUE_LOG"; fi
"""


@pytest.mark.parametrize(
    "task, restarts, status, requeued",
    [
        ("killed", "0", exits.PEER_LOST, True),  # srun reports 137: a task killed (a node lost, NCCL's abort)
        ("69", "0", exits.PEER_LOST, True),
        ("69", "3", exits.PEER_LOST, False),  # MAX_REQUEUES (3) used up
        ("75", "5", exits.PREEMPTED, True),  # a pre-emption always requeues
        ("78", "0", exits.BAD_INPUT, False),
        ("1", "0", exits.FAILED, False),
    ],
)
def test_the_slurm_script_requeues_on_exactly_the_restartable_statuses(task, restarts, status, requeued, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = subprocess_env()
    env.update(PATH=str(bin_dir) + os.pathsep + env["PATH"], SLURM_JOB_NODELIST="node0", SLURM_JOB_ID="77",
               SLURM_RESTART_COUNT=restarts, REQUEUE_LOG=str(tmp_path / "requeued"), TASK_STATUS=task,
               PYTHON=sys.executable)
    proc = subprocess.run(["bash", "launch/slurm.sbatch", "demo"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert os.path.exists(tmp_path / "requeued") == requeued, proc.stdout
    if task == "killed":
        assert "srun exited 137: job status 69" in proc.stdout
