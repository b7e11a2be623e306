"""Multi-node training on two real (namespaced) hosts: the three launcher forms, a node
lost mid-run, and recovery.

Two hosts (tests/netns.py): each its own network namespace, joined by one veth pair,
10.77.0.1 and 10.77.0.2; one rank per host (gloo, `GLOO_SOCKET_IFNAME=veth0`). Every run
trains the same tiny MAR model under ZeRO-3 in fp32 for STEPS steps with a checkpoint
every 2 steps, and evaluates at the end.

- Training: launch/deepspeed.sh with NO_SSH on each host; launch/deepspeed.sh with a
  hostfile over ssh (sshd in each host, pdsh, the launcher's default form); launch/torchrun.sh
  with a c10d rendezvous on host 0 and MAX_RESTARTS=3, one of whose workers is killed
  mid-run: the job restarts and resumes by itself. Each matches a one-node run of the same
  two ranks (same global batch, `baseline`) step for step; every validation video is
  counted exactly once; the checkpoints hold both ranks' shards.
- Failure: every process of host 1 killed (kill -9), or the link cut (`ip link set down`),
  mid-run: host 0's processes exit with status 69 (a peer lost) within
  run.collective_timeout_s plus a margin, naming the lost peer; the measured time to exit
  is printed. `--resume auto` on both
  hosts then continues from the newest complete checkpoint and finishes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
from helpers import DEMO_CONFIG as CONFIG
from helpers import REPO, run_overrides, subprocess_env
from netns import IFNAME, two_hosts_or_skip

from marscale.core.dist import EXIT_PEER_LOST, free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 8
TIMEOUT_S = 20
"""run.collective_timeout_s in these runs: a cut link must end them within about this long."""
EXIT_MARGIN_S = 25
"""Allowed on top of TIMEOUT_S for the processes to log, close and exit on a busy 2-core machine."""
RUN_TIMEOUT_S = 240
FINISH_TIMEOUT = ("--set", "run.collective_timeout_s=120")
"""For runs that only have to finish (a resume, torchrun's restarts): processes started
together on a busy 2-core machine can reach their first collective tens of seconds apart
(imports alone), and gloo's connect waits only the collective timeout. The bound itself is
measured by the failure tests, with TIMEOUT_S."""


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
    env = subprocess_env()
    env.update(GLOO_SOCKET_IFNAME=IFNAME, **extra)
    return env


def records(out: str, name: str = "metrics.jsonl") -> list[dict]:
    with open(os.path.join(out, name)) as f:
        return [json.loads(line) for line in f]


def losses_by_step(out: str) -> dict[int, float]:
    """The loss logged at each step; after a restart, the resumed run's value (logged last)."""
    return {r["step"]: r["loss"] for r in records(out)}


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
            assert p.poll() is None, p.communicate()[0][-5000:]
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {metrics} after {RUN_TIMEOUT_S}s")


def assert_matches(out: str, baseline: dict) -> None:
    """Same losses as the one-node run, every validation video once, both ranks' shards saved."""
    losses = losses_by_step(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in baseline["losses"].items():
        assert losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (step, losses, baseline["losses"])
    result = json.load(open(os.path.join(out, "eval.json")))
    assert result["step"] == STEPS
    assert result["num_videos"] == result["expected_videos"] == 8  # each counted once over the two hosts
    assert result["num_views"] == 16 and result["incomplete_videos"] == 0
    for key in ("top1", "top5"):
        assert result[key] == baseline["eval"][key]
    for step in range(2, STEPS + 1, 2):
        files = set(os.listdir(os.path.join(out, "checkpoints", f"step-{step}")))
        assert {"COMPLETE", "rng_state_rank0.pt", "rng_state_rank1.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files, (step, files)


@pytest.fixture
def hosts():
    two = two_hosts_or_skip()
    try:
        yield two
    finally:
        two.close()


@pytest.fixture(scope="module")
def baseline(synthetic_shards, tmp_path_factory) -> dict:
    """The same job on one node: two ranks on this machine, no namespaces."""
    out = str(tmp_path_factory.mktemp("baseline") / "run")
    env = subprocess_env()
    env.update(GPUS="2", MASTER_PORT=str(free_port()))
    proc = subprocess.run(command("launch/deepspeed.sh", synthetic_shards, out), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {"losses": losses_by_step(out), "eval": json.load(open(os.path.join(out, "eval.json")))}


def start_no_ssh(hosts, shards, out: str, port: str, *extra: str) -> list[subprocess.Popen]:
    """launch/deepspeed.sh with NO_SSH on both hosts (host 1 first). Returns [host 0, host 1]."""
    hostfile = os.path.join(os.path.dirname(out), "hosts.txt")
    with open(hostfile, "w") as f:
        f.write("".join(f"{a} slots=1\n" for a in hosts.addresses))
    procs = {}
    for host in (1, 0):
        env = host_env(NO_SSH="1", HOSTFILE=hostfile, NODE_RANK=str(host), MASTER_ADDR=hosts.addresses[0],
                       MASTER_PORT=port)
        procs[host] = hosts.popen(host, command("launch/deepspeed.sh", shards, out, *extra), cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return [procs[0], procs[1]]


# --- training on two hosts: three launcher forms ----------------------------------------


def test_deepspeed_without_ssh_on_two_hosts(hosts, baseline, synthetic_shards, tmp_path):
    out = str(tmp_path / "run")
    logs = finish(start_no_ssh(hosts, synthetic_shards, out, "29500"))
    assert "mar vit_tiny, 2 ranks, global batch 4" in logs[0]  # host 0 runs rank 0
    assert "+ deepspeed " in logs[0]  # the script prints the command it runs
    assert_matches(out, baseline)


def test_deepspeed_over_ssh_with_a_hostfile(hosts, baseline, synthetic_shards, tmp_path):
    """The form most users run: a hostfile, one command on the first node; the launcher
    reaches both hosts over ssh with pdsh. Variables for the remote ranks travel in the
    file DS_ENV_FILE names (deepspeed's .deepspeed_env)."""
    hosts.start_sshd()
    out = str(tmp_path / "run")
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("".join(f"{a} slots=1\n" for a in hosts.addresses))
    # This environment's bin first on PATH, as activating it would: the remote ranks then
    # build DeepSpeed's C++ op with the same tools (ninja) as the local ones, and reuse it.
    remote_env = {"GLOO_SOCKET_IFNAME": IFNAME, "OMP_NUM_THREADS": "1", "MARSCALE_CACHE_DIR": "",
                  "PATH": subprocess_env()["PATH"]}
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        remote_env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    env_file = tmp_path / "deepspeed_env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in remote_env.items()))
    # No MASTER_ADDR: the launcher asks the first host for its address over ssh.
    env = hosts.ssh_env(host_env(HOSTFILE=str(hostfile), DS_ENV_FILE=str(env_file), MASTER_PORT="29500"))
    proc = hosts.popen(0, command("launch/deepspeed.sh", synthetic_shards, out), cwd=REPO, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = finish([proc])[0]
    assert "pdsh" in log and "--hostfile" in log
    for address in hosts.addresses:  # pdsh prefixes each host's output with its name
        assert f"{address}: " in log
    assert_matches(out, baseline)


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


def test_torchrun_rendezvous_restarts_and_resumes_after_a_worker_dies(hosts, baseline, synthetic_shards, tmp_path):
    """launch/torchrun.sh on both hosts, rendezvous on host 0, MAX_RESTARTS=3: the worker
    on host 1 is killed after the step-2 checkpoint; both hosts restart their workers,
    which resume from the newest complete checkpoint and finish with the baseline's numbers."""
    out = str(tmp_path / "run")
    procs = []
    for host in (0, 1):
        env = host_env(NNODES="2", GPUS="1", MASTER_ADDR=hosts.addresses[0], MASTER_PORT="29400",
                       MAX_RESTARTS="3", LOCAL_ADDR=hosts.addresses[host], RDZV_ID="multinode-test")
        procs.append(hosts.popen(host, command("launch/torchrun.sh", synthetic_shards, out, "--resume", "auto",
                                                         *FINISH_TIMEOUT),
                                 cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    wait_for_step(out, 3, procs)
    victims = worker_pids(hosts, 1)
    assert victims, "no worker found on host 1"
    for pid in victims:
        os.kill(pid, 9)
    logs = finish(procs)
    both = "\n".join(logs)
    assert "resumed from" in both and "--rdzv_backend c10d" in both
    steps = [r["step"] for r in records(out)]
    assert steps != sorted(set(steps)), "no step was trained twice: the kill landed after the end"
    assert_matches(out, baseline)


# --- a node lost mid-run ----------------------------------------------------------------


def time_to_exit(procs, since: float) -> list[tuple[float, int, str]]:
    """(seconds from `since` to exit, exit status, output) of each process."""
    result = [None] * len(procs)
    deadline = since + TIMEOUT_S + EXIT_MARGIN_S + 60  # past the bound: fail, but never hang
    while any(r is None for r in result) and time.time() < deadline:
        for i, p in enumerate(procs):
            if result[i] is None and p.poll() is not None:
                result[i] = (time.time() - since, p.returncode, p.stdout.read())
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
    out = str(tmp_path / "run")
    procs = start_no_ssh(hosts, synthetic_shards, out, "29500")
    wait_for_step(out, 3, procs)
    killed_at = time.time()
    assert hosts.kill_host(1)
    (seconds, status, log), _ = time_to_exit(procs, killed_at)
    print(f"\nhost 1 killed (kill -9): host 0 exited {status} after {seconds:.1f}s "
          f"(run.collective_timeout_s={TIMEOUT_S})\n{error_line(log)}")
    assert status == EXIT_PEER_LOST, log[-5000:]
    assert seconds < TIMEOUT_S + EXIT_MARGIN_S
    assert_lost_peer_reported(log, hosts.addresses[1])
    resume_and_finish(hosts, synthetic_shards, out)


def test_link_cut_ends_the_job_in_bounded_time_and_it_resumes(hosts, synthetic_shards, tmp_path):
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
    hosts.link_up(1)
    resume_and_finish(hosts, synthetic_shards, out)
