"""Multi-node training on two real (namespaced) hosts: the README's commands as written,
a node lost mid-run, recovery, and a bounded start-up.

Two hosts (tests/netns.py): each its own network namespace, joined by one veth pair,
10.77.0.1 and 10.77.0.2; one rank per host (gloo).

- The README's "Running on a cluster" step 0, run as written from a fresh shell (no
  virtual environment on PATH, nothing set by hand; the test writes the hostfile the
  README asks for): the demo data, then the job over ssh with a hostfile (sshd in each
  host, pdsh), without ssh (one command per host) and with torchrun (rendezvous on host 0). The ssh form is pre-empted mid-run (SIGTERM to the launch script:
  every rank saves, status 75) and the same command resumes it. The three forms give the same losses
  step for step; every validation video is counted once; both ranks' shards are saved.
- Failure (tiny model, ZeRO-3): every process of host 1 killed (kill -9; launched over
  ssh), or the link cut (without ssh), mid-run: the launch scripts exit 69 within
  run.collective_timeout_s plus a margin, naming the lost peer; after the kill,
  `--resume auto` on both hosts finishes.
- Start-up: a host that does not resolve or answer stops the launch in seconds with one
  line and status 68; a rank whose peer never starts exits 69 after run.setup_timeout_s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
from helpers import DEMO_CONFIG as CONFIG
from helpers import REPO, fresh_shell_env, readme_block, run_overrides, shell_commands, subprocess_env
from netns import IFNAME, two_hosts_or_skip

from marscale.core.dist import EXIT_PEER_LOST
from marscale.core import exits

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 8
TIMEOUT_S = 20
"""run.collective_timeout_s in these runs: a cut link must end them within about this long."""
EXIT_MARGIN_S = 25
"""Allowed on top of TIMEOUT_S for the processes to log, close and exit on a busy 2-core machine."""
RUN_TIMEOUT_S = 240
FINISH_TIMEOUT = ("--set", "run.collective_timeout_s=120")
"""For runs that only have to finish (a resume): processes started together on a busy
2-core machine can reach their first collective tens of seconds apart (imports alone),
and gloo's connect waits only the collective timeout. The bound itself is measured by the
failure tests, with TIMEOUT_S."""
TRY = os.path.join(REPO, "runs", "two-nodes")
"""Where the README's step 0 writes (relative to the checkout, as a user runs it)."""


def overrides(shards: dict[str, str], out: str) -> list[str]:
    return run_overrides(shards, out) + [
        "data.clips_per_video=1", "data.num_workers=0", "data.batch_size=2", "data.eval_batch_size=3",
        "data.test_num_clips=2", "data.test_num_crops=1", "logging.every_steps=1",
        "checkpoint.every_steps=2", "checkpoint.keep_last=0", "deepspeed.zero_stage=3",
        "deepspeed.precision=fp32", f"run.max_steps={STEPS}", f"run.collective_timeout_s={TIMEOUT_S}",
    ]


def command(script: str, shards: dict[str, str], out: str, *extra: str) -> list[str]:
    cmd = ["bash", script, CONFIG]
    for o in overrides(shards, out):
        cmd += ["--set", o]
    return cmd + list(extra)


def host_env(**extra: str) -> dict[str, str]:
    """No GLOO_SOCKET_IFNAME: each host's ranks find the interface that routes to the master."""
    env = subprocess_env()
    env.update(**extra)
    return env


def records(out: str, name: str = "metrics.jsonl") -> list[dict]:
    with open(os.path.join(out, name)) as f:
        return [json.loads(line) for line in f]


def losses_by_step(out: str) -> dict[int, float]:
    """The loss logged at each step; after a restart, the resumed run's value (logged last)."""
    return {r["step"]: r["loss"] for r in records(out)}


class Logged:
    """A started process whose output goes to a file: a pipe that nobody reads until the end
    can fill up and stop a chatty job (torchrun's restarts). `communicate` waits and returns
    (output, None); past its timeout it fails with the output so far."""

    def __init__(self, proc: subprocess.Popen, path: str):
        self.proc, self.path = proc, path

    def __getattr__(self, name):
        return getattr(self.proc, name)

    def read(self) -> str:
        with open(self.path, errors="replace") as f:
            return f.read()

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s; its output:\n{self.read()[-8000:]}") from None
        return self.read(), None


def spawn(hosts, host: int, cmd: list[str], env: dict[str, str]) -> Logged:
    """`cmd` on host `host` in the checkout, its output in a file."""
    fd, path = tempfile.mkstemp(prefix=f"host{host}-", suffix=".log", dir=hosts._tmp)  # removed with the hosts
    with os.fdopen(fd, "w") as log:
        proc = hosts.popen(host, cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return Logged(proc, path)


def finish(procs) -> list[str]:
    logs = [p.communicate(timeout=RUN_TIMEOUT_S)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-5000:]
    return logs


def wait_for_step(out: str, step: int, procs) -> None:
    """Return once `out/metrics.jsonl` reaches `step` (every proc still running)."""
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + RUN_TIMEOUT_S
    while time.time() < deadline:
        if os.path.exists(metrics) and any(r["step"] >= step for r in records(out)):
            return
        for p in procs:
            assert p.poll() is None, p.read()[-5000:]
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {metrics} after {RUN_TIMEOUT_S}s")


@pytest.fixture
def hosts():
    two = two_hosts_or_skip()
    try:
        yield two
    finally:
        two.close()


def start_no_ssh(hosts, shards, out: str, port: str, *extra: str, only=(1, 0)) -> list[subprocess.Popen]:
    """launch/deepspeed.sh with NO_SSH on both hosts (host 1 first), or on the hosts `only`
    names. Returns their processes in host order."""
    hostfile = os.path.join(os.path.dirname(out), "hosts.txt")
    with open(hostfile, "w") as f:
        f.write("".join(f"{a} slots=1\n" for a in hosts.addresses))
    procs = {}
    for host in only:
        env = host_env(NO_SSH="1", HOSTFILE=hostfile, NODE_RANK=str(host), MASTER_ADDR=hosts.addresses[0],
                       MASTER_PORT=port)
        procs[host] = spawn(hosts, host, command("launch/deepspeed.sh", shards, out, *extra), env)
    return [procs[h] for h in sorted(procs)]


# --- the README's step 0, as written -------------------------------------------------------

RESULTS: dict[str, dict[int, float]] = {}
"""Losses by step of each launch form that finished (they must agree)."""


@pytest.fixture(scope="module")
def readme_data():
    """The README's data block, run as written in the checkout (its runs/two-nodes)."""
    shutil.rmtree(TRY, ignore_errors=True)
    for command in shell_commands(readme_block("two-nodes: data")):
        proc = subprocess.run(["bash", "-c", command], cwd=REPO, env=fresh_shell_env(), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-3000:])
    yield
    shutil.rmtree(TRY, ignore_errors=True)


def write_hostfile(hosts) -> None:
    """What the README asks the user to write: one line per node, the first runs rank 0."""
    with open(os.path.join(TRY, "hosts.txt"), "w") as f:
        f.write("".join(f"{a} slots=1\n" for a in hosts.addresses))


def start_readme(hosts, host: int, command: str, env: dict[str, str]) -> Logged:
    return spawn(hosts, host, ["bash", "-c", command], env)


def check_readme_run(form: str) -> None:
    """Every step logged once, every validation video counted once over the two hosts,
    both ranks' state in the last checkpoint, and the losses of the other forms."""
    out = os.path.join(TRY, form)
    losses = losses_by_step(out)
    assert sorted(losses) == list(range(1, STEPS + 1)), losses
    result = json.load(open(os.path.join(out, "eval.json")))
    assert result["step"] == STEPS
    assert result["num_videos"] == result["expected_videos"] == 8 and result["incomplete_videos"] == 0
    files = set(os.listdir(os.path.join(out, "checkpoints", f"step-{STEPS}")))
    assert {"COMPLETE", "rng_state_rank0.pt", "rng_state_rank1.pt"} <= files, files
    for other, theirs in RESULTS.items():
        for step, loss in theirs.items():
            if step in losses:
                assert losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (form, other, step, losses, theirs)
    RESULTS[form] = losses


def test_readme_ssh_form_is_preempted_and_resumed(hosts, readme_data):
    """The hostfile over ssh (pdsh), from a fresh shell: SIGTERM to the launch script
    mid-run reaches both hosts' ranks, which save the same step; status 75. The same
    command then resumes and finishes."""
    hosts.start_sshd()
    write_hostfile(hosts)
    [command] = shell_commands(readme_block("two-nodes: ssh"))
    env = hosts.ssh_env(fresh_shell_env())
    proc = start_readme(hosts, 0, command, env)
    out = os.path.join(TRY, "ssh")
    wait_for_step(out, 3, [proc])
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=RUN_TIMEOUT_S)[0]
    assert proc.returncode == exits.PREEMPTED, log[-5000:]
    for expected in ("2 hosts answer ssh", f"MASTER_ADDR={hosts.addresses[0]}", "remote ranks get PATH=",
                     f"GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME={IFNAME}", "+ deepspeed ", "--hostfile"):
        assert expected in log, (expected, log[-5000:])
    stopped = records(out)[-1]["step"]
    assert stopped < STEPS
    for address in hosts.addresses:  # pdsh prefixes each host's output with its name
        assert f"{address}: " in log
    files = set(os.listdir(os.path.join(out, "checkpoints", f"step-{stopped}")))
    assert {"COMPLETE", "rng_state_rank0.pt", "rng_state_rank1.pt"} <= files, files

    log = finish([start_readme(hosts, 0, command, env)])[0]
    assert f"at step {stopped}" in log and "resumed from" in log
    check_readme_run("ssh")


def test_readme_no_ssh_form(hosts, readme_data):
    write_hostfile(hosts)
    commands = shell_commands(readme_block("two-nodes: no-ssh"))
    assert len(commands) == 2 and "NODE_RANK=0" in commands[0] and "NODE_RANK=1" in commands[1]
    procs = [start_readme(hosts, host, commands[host], fresh_shell_env()) for host in (1, 0)][::-1]
    logs = finish(procs)
    assert "two_nodes: mar vit_tiny, 2 ranks" in logs[0]  # host 0 runs rank 0
    check_readme_run("no-ssh")


def worker_pids(hosts, host: int) -> list[int]:
    """The marscale training processes (not the launcher) running on `host`."""
    from netns import _namespace_pids

    found = []
    for pid in _namespace_pids(hosts.namespaces[host]):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        launcher = any(a.endswith((b"torchrun", b"deepspeed")) for a in argv[:2])  # [python, script, ...]
        if b"marscale.cli" in argv and not launcher:
            found.append(pid)
    return found


def test_readme_torchrun_form(hosts, readme_data):
    """The torchrun block on both hosts (rendezvous on host 0): the same job, the same
    losses. (Its MAX_RESTARTS=3 is torchelastic's: README step 6 says what was seen of it
    on these hosts.)"""
    write_hostfile(hosts)
    [command] = shell_commands(readme_block("two-nodes: torchrun"))
    procs = [start_readme(hosts, host, command, fresh_shell_env()) for host in (0, 1)]
    logs = finish(procs)
    assert "--rdzv_backend c10d" in logs[0] and "hosts the rendezvous" in logs[0] and "joins the rendezvous" in logs[1]
    check_readme_run("torchrun")


# --- a node lost mid-run ----------------------------------------------------------------


def time_to_exit(procs, since: float) -> list[tuple[float, int, str]]:
    """(seconds from `since` to exit, exit status, output) of each process."""
    result = [None] * len(procs)
    deadline = since + TIMEOUT_S + EXIT_MARGIN_S + 60  # past the bound: fail, but never hang
    while any(r is None for r in result) and time.time() < deadline:
        for i, p in enumerate(procs):
            if result[i] is None and p.poll() is not None:
                result[i] = (time.time() - since, p.returncode, p.read())
        time.sleep(0.05)
    for i, p in enumerate(procs):
        if result[i] is None:
            p.kill()
            result[i] = (float("inf"), None, p.communicate()[0])
    return result


def resume_and_finish(hosts, shards, out: str) -> None:
    """`--resume auto` on both hosts continues from the newest complete checkpoint to the end."""
    newest = max(int(d.split("-")[1]) for d in os.listdir(os.path.join(out, "checkpoints"))
                 if os.path.isfile(os.path.join(out, "checkpoints", d, "COMPLETE")))
    logs = finish(start_no_ssh(hosts, shards, out, "29501", "--resume", "auto", *FINISH_TIMEOUT))
    assert f"resumed from {os.path.join(out, 'checkpoints', f'step-{newest}')} at step {newest}" in logs[0]
    assert records(out)[-1]["step"] == STEPS
    assert json.load(open(os.path.join(out, "eval.json")))["step"] == STEPS


def error_line(log: str) -> str:
    return next((line for line in log.splitlines() if "marscale train: error:" in line), "(no error line)")


def assert_lost_peer_reported(log: str, peer: str) -> None:
    assert "marscale train: error: rank 0 of 2" in log, log[-5000:]
    assert re.search(rf"lost peer {re.escape(peer)}:\d+|lost a peer", log), log[-5000:]
    assert f"run.collective_timeout_s={TIMEOUT_S}" in log and "--resume auto" in log


def test_node_killed_ends_the_job_in_bounded_time_and_it_resumes(hosts, synthetic_shards, tmp_path):
    """The job launched over ssh (pdsh) from host 0; every process of host 1 (its sshd
    too) killed mid-run. Host 0's rank exits 69; pdsh returns the largest host status (ssh's
    255 for the host it lost), which the launch script reports as 69."""
    hosts.start_sshd()
    out = str(tmp_path / "run")
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("".join(f"{a} slots=1\n" for a in hosts.addresses))
    env = hosts.ssh_env(host_env(HOSTFILE=str(hostfile), MASTER_PORT="29500", OMP_NUM_THREADS="1"))
    proc = spawn(hosts, 0, command("launch/deepspeed.sh", synthetic_shards, out), env)
    wait_for_step(out, 3, [proc])
    killed_at = time.time()
    assert hosts.kill_host(1)
    [(seconds, status, log)] = time_to_exit([proc], killed_at)
    print(f"\nhost 1 killed (kill -9), launched over ssh: the launch script exited {status} after {seconds:.1f}s "
          f"(run.collective_timeout_s={TIMEOUT_S})\n{error_line(log)}")
    assert status == EXIT_PEER_LOST, log[-5000:]
    assert re.search(r"the launcher exited (255|24\d): job status 69", log), log[-3000:]
    assert seconds < TIMEOUT_S + EXIT_MARGIN_S
    assert_lost_peer_reported(log, hosts.addresses[1])
    resume_and_finish(hosts, synthetic_shards, out)


def test_link_cut_ends_the_job_in_bounded_time(hosts, synthetic_shards, tmp_path):
    """Both hosts' launch scripts exit 69 within the collective timeout and a margin. (The
    resume after a lost node is the killed-node test's: the checkpoint is the same kind.)"""
    out = str(tmp_path / "run")
    procs = start_no_ssh(hosts, synthetic_shards, out, "29500")
    wait_for_step(out, 3, procs)
    cut_at = time.time()
    hosts.link_down(1)
    exits = time_to_exit(procs, cut_at)
    for host, (seconds, status, log) in enumerate(exits):
        print(f"\nlink cut: host {host} exited {status} after {seconds:.1f}s "
              f"(run.collective_timeout_s={TIMEOUT_S})\n{error_line(log)}")
    for seconds, status, log in exits:
        assert status == EXIT_PEER_LOST, log[-5000:]
        assert seconds < TIMEOUT_S + EXIT_MARGIN_S
    assert_lost_peer_reported(exits[0][2], hosts.addresses[1])


# --- a bounded start-up -------------------------------------------------------------------


def test_hosts_that_do_not_answer_stop_the_launch_in_seconds(hosts, synthetic_shards, tmp_path):
    """A hostfile with a host that does not resolve and one that does not answer: one line
    naming each, status 68, before any rank starts; without ssh, a MASTER_ADDR that does
    not answer likewise."""
    hosts.start_sshd()
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text(f"{hosts.addresses[0]} slots=1\n10.77.0.9 slots=1\nno-such-node.invalid slots=1\n")
    out = str(tmp_path / "run")
    env = hosts.ssh_env(host_env(HOSTFILE=str(hostfile), CHECK_TIMEOUT_S="3"))
    started = time.time()
    proc = hosts.run(0, command("launch/deepspeed.sh", synthetic_shards, out), cwd=REPO, env=env, timeout=60)
    seconds = time.time() - started
    print(f"\nunreachable hosts: status {proc.returncode} after {seconds:.1f}s\n{proc.stderr.strip()}")
    assert proc.returncode == exits.NO_HOST, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and "10.77.0.9 does not answer ssh" in error[0], proc.stderr
    assert "no-such-node.invalid does not resolve" in error[0] and f"host {hosts.addresses[0]} " not in error[0]
    assert not os.path.exists(out) and seconds < 20

    env = host_env(NO_SSH="1", HOSTFILE=str(hostfile), NODE_RANK="1", MASTER_ADDR="10.77.0.9", CHECK_TIMEOUT_S="3")
    proc = hosts.run(1, command("launch/deepspeed.sh", synthetic_shards, out), cwd=REPO, env=env, timeout=60)
    assert proc.returncode == exits.NO_HOST, proc.stderr[-3000:]
    assert "MASTER_ADDR 10.77.0.9 (10.77.0.9) does not answer on port 29500" in proc.stderr


def test_a_node_that_never_starts_ends_the_others_after_the_setup_timeout(hosts, synthetic_shards, tmp_path):
    """Host 0 starts its rank; host 1 never does. Host 0's rank gives up after
    run.setup_timeout_s with one line, and the launch script exits 69."""
    out = str(tmp_path / "run")
    setup_s = 8
    [proc] = start_no_ssh(hosts, synthetic_shards, out, "29502", "--set", f"run.setup_timeout_s={setup_s}",
                          only=(0,))
    started = time.time()
    log = proc.communicate(timeout=120)[0]
    seconds = time.time() - started
    print(f"\nno second node: status {proc.returncode} after {seconds:.1f}s (setup_timeout_s={setup_s})\n"
          f"{error_line(log)}")
    assert proc.returncode == exits.PEER_LOST, log[-5000:]
    assert f"did not all meet at {hosts.addresses[0]}:29502 within run.setup_timeout_s={setup_s} s" in log
    assert seconds < setup_s + 60  # imports and DeepSpeed's start on a busy machine come first
