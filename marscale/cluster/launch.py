"""The launch wrapper behind launch/deepspeed.sh and launch/torchrun.sh.

    python -m marscale.cluster.launch deepspeed|torchrun CONFIG [marscale train arguments...]

The scripts read their settings from the environment (their headers list them) and hand
over to this module, which, before anything starts:
- reads the config and the `--set` overrides: a bad one is one line and status 78,
  before any node is contacted;
- checks every host: with a hostfile over ssh, each host resolves, answers ssh within
  `CHECK_TIMEOUT_S` (default 10) and has the launch folder (the deepspeed launcher starts
  every node's ranks in the folder it was started from); without ssh and with torchrun,
  the master address resolves and answers (a refused connection answers: the port opens
  when the master starts). A failure is one line per host and status 68, in seconds;
- gives the remote ranks (pdsh) this environment's PATH, its virtual environment's `bin`
  first, and the variables below, in a `.deepspeed_env` of its own that extends the
  user's (`DS_ENV_FILE`, or ./.deepspeed_env and ~/.deepspeed_env: the user's values win);
- prints what it chose (network interface, master address, remote variables) and the
  exact launcher command (`+ deepspeed ...`).

While the job runs, SIGTERM or SIGUSR1 to this process is a pre-emption (`Preemption`):
every rank of the job saves the same step and exits 75. At the end the launcher's status
is turned into the contract of `marscale.core.exits`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from marscale.core import exits

DEFAULT_PORT = "29500"


def say(line: str) -> None:
    print(f"marscale launch: {line}", file=sys.stderr, flush=True)


class LaunchError(Exception):
    """Stops the launch before any rank starts: `status` is the contract's."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


# --- the config -------------------------------------------------------------------------


def check_config(config: str, args: list[str]):
    """Read the config with `marscale train`'s own arguments: a bad one is refused here,
    once, rather than by every rank after the job has started."""
    from marscale.commands import train
    from marscale.engine.config import load_train_config

    parser = argparse.ArgumentParser(prog="marscale train", add_help=False)
    train.add_arguments(parser)
    try:
        parsed = parser.parse_args(["--config", config, *args])
    except SystemExit:
        raise LaunchError("the marscale train arguments above are wrong", exits.USAGE) from None
    overrides = list(parsed.overrides)
    if parsed.resume is not None:
        overrides.append(f"checkpoint.resume={parsed.resume}")
    try:
        return load_train_config(config, overrides)
    except (ValueError, FileNotFoundError) as e:
        raise LaunchError(f"marscale train: error: {e}", exits.BAD_INPUT) from None


# --- hosts ------------------------------------------------------------------------------


def read_hostfile(path: str) -> list[str]:
    """The hosts of a DeepSpeed hostfile ("HOST slots=N" per line, # comments), in order."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise LaunchError(f"HOSTFILE {path}: {e.strerror}", exits.BAD_INPUT) from None
    hosts = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) > 2 or (len(fields) == 2 and not fields[1].startswith("slots=")):
            raise LaunchError(f"HOSTFILE {path} line {number}: {line!r} is not 'HOST slots=N'", exits.BAD_INPUT)
        hosts.append(fields[0])
    if not hosts:
        raise LaunchError(f"HOSTFILE {path} names no host", exits.BAD_INPUT)
    return hosts


@dataclass
class Probe:
    host: str
    problem: str | None
    addresses: list[str]


def ssh_command(host: str, remote: str, timeout_s: float, ssh_port: str | None) -> list[str]:
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(timeout_s))}"]
    if ssh_port:
        cmd += ["-p", ssh_port]
    return cmd + [host, remote]


def probe_ssh(host: str, folder: str, timeout_s: float, ssh_port: str | None) -> Probe:
    """Does `host` answer ssh without a password, and does it have `folder`?"""
    remote = f"cd {shlex.quote(folder)} && hostname -I"
    try:
        proc = subprocess.run(ssh_command(host, remote, timeout_s, ssh_port), capture_output=True, text=True,
                              timeout=timeout_s + 5, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Probe(host, f"does not answer ssh within {timeout_s:g} s", [])
    if proc.returncode == 0:
        return Probe(host, None, proc.stdout.split())
    err = " ".join(proc.stderr.split())
    if "resolve" in err.lower():
        problem = "does not resolve (" + err.removeprefix("ssh: ")[:200] + ")"
    elif proc.returncode == 255:
        problem = f"does not answer ssh (port {ssh_port or 22}): {err[:200] or 'connection failed'}"
    else:
        problem = (f"has no folder {folder} (the launcher starts every node's ranks in the folder it was "
                   f"started from: launch from storage every node sees)")
    return Probe(host, problem, [])


def check_ssh_hosts(hosts: list[str], folder: str, timeout_s: float, ssh_port: str | None) -> list[Probe]:
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        probes = list(pool.map(lambda h: probe_ssh(h, folder, timeout_s, ssh_port), hosts))
    bad = [p for p in probes if p.problem]
    if bad:
        lines = "; ".join(f"host {p.host} {p.problem}" for p in bad)
        raise LaunchError(f"{lines}. Fix the hostfile (or the node) and start again", exits.NO_HOST)
    return probes


def check_answers(address: str, port: int, timeout_s: float) -> None:
    """`address` resolves, and a TCP connection to `port` is accepted or refused (the host
    is up; the port opens when the job's first node starts) within `timeout_s`."""
    try:
        target = socket.gethostbyname(address)
    except OSError as e:
        raise LaunchError(f"MASTER_ADDR {address} does not resolve ({e})", exits.NO_HOST) from None
    try:
        with socket.create_connection((target, port), timeout=timeout_s):
            return
    except ConnectionRefusedError:
        return
    except OSError as e:
        reason = "no answer" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise LaunchError(
            f"MASTER_ADDR {address} ({target}) does not answer on port {port} within {timeout_s:g} s ({reason})",
            exits.NO_HOST,
        ) from None


def check_port_free(port: int) -> None:
    """This node hosts rank 0 (or the rendezvous): the port must be free."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            raise LaunchError(
                f"MASTER_PORT {port} is in use on {socket.gethostname()} (another job?): choose another MASTER_PORT",
                exits.NO_HOST,
            ) from None


def is_this_host(address: str) -> bool:
    target = _resolve(address)
    if target.startswith("127."):
        return True
    with socket.socket() as s:
        try:
            s.bind((target, 0))  # only an address of this host can be bound
        except OSError:
            return False
    return True


# --- the remote environment -------------------------------------------------------------


def read_env_file(path: str) -> dict[str, str]:
    values = {}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if "=" in line and not line.lstrip().startswith("#"):
                key, value = line.split("=", 1)
                values[key.strip()] = value
    return values


def user_env_files() -> list[str]:
    """The files the deepspeed launcher would read: DS_ENV_FILE (a name looked up in ~
    and ., or a path), else .deepspeed_env in ~ and in ."""
    name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
    found = []
    for folder in (os.path.expanduser("~"), "."):
        path = os.path.abspath(os.path.join(folder, name))
        if os.path.isfile(path) and path not in found:
            found.append(path)
    return found


def remote_env_file(extra: dict[str, str], folder: str) -> tuple[str, list[str]]:
    """A .deepspeed_env in `folder`: `extra`, then the user's files (whose values win).
    Returns its path and a description of what the remote ranks get."""
    values = dict(extra)
    told = [f"{k}={v}" if k != "PATH" else f"PATH={v.split(os.pathsep)[0]}:..." for k, v in extra.items()]
    for path in user_env_files():
        mine = read_env_file(path)
        values.update(mine)
        if mine:
            told.append(f"{', '.join(sorted(mine))} from {path}")
    path = os.path.join(folder, "deepspeed_env")
    with open(path, "w") as f:
        f.write("".join(f"{k}={v}\n" for k, v in values.items()))
    return path, told


# --- the launch -------------------------------------------------------------------------


@dataclass
class Launch:
    cmd: list[str]
    env: dict[str, str]
    torchrun: bool = False


def venv_path(environ: dict[str, str]) -> str:
    """PATH with this interpreter's folder (the virtual environment's bin) first."""
    bin_dir = os.path.dirname(sys.executable)
    rest = [p for p in environ.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    return os.pathsep.join([bin_dir, *rest])


def launcher(name: str) -> str:
    """`deepspeed` / `torchrun` beside this interpreter (the environment's), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.access(beside, os.X_OK) else name


def check_timeout_s(env: dict[str, str]) -> float:
    """CHECK_TIMEOUT_S: seconds a host has to answer the start-up check, in (0, 3600]
    (default 10)."""
    text = env.get("CHECK_TIMEOUT_S", "10")
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:  # False for NaN too
        raise LaunchError(f"CHECK_TIMEOUT_S must be seconds in (0, 3600], got {text!r}", exits.BAD_INPUT)
    return value


def plan_deepspeed(config: str, args: list[str], env: dict[str, str], work: str) -> Launch:
    timeout = check_timeout_s(env)
    port = env.get("MASTER_PORT", DEFAULT_PORT)
    hostfile = env.get("HOSTFILE")
    no_ssh = bool(env.get("NO_SSH"))
    cmd = [launcher("deepspeed"), "--no_local_rank", "--master_port", port]
    if env.get("GPUS"):
        cmd += ["--num_gpus", env["GPUS"]]
    if env.get("SSH_PORT"):
        cmd += ["--ssh_port", env["SSH_PORT"]]
    if env.get("LAUNCHER"):
        cmd += ["--launcher", env["LAUNCHER"]]
    master = env.get("MASTER_ADDR")
    if hostfile:
        hosts = read_hostfile(hostfile)
        cmd += ["--hostfile", hostfile]
        if no_ssh:
            for name in ("NODE_RANK", "MASTER_ADDR"):
                if not env.get(name):
                    raise LaunchError(f"NO_SSH needs {name} (see launch/deepspeed.sh)", exits.BAD_INPUT)
            node = int(env["NODE_RANK"])
            if not 0 <= node < len(hosts):
                raise LaunchError(f"NODE_RANK={node} but HOSTFILE {hostfile} has {len(hosts)} hosts", exits.BAD_INPUT)
            cmd += ["--no_ssh", "--node_rank", str(node)]
            if node == 0:
                check_port_free(int(port))
            else:
                check_answers(master, int(port), timeout)
        elif env.get("LAUNCHER", "pdsh") == "pdsh":
            probes = check_ssh_hosts(hosts, os.getcwd(), timeout, env.get("SSH_PORT"))
            say(f"{len(hosts)} hosts answer ssh and have {os.getcwd()}: {', '.join(hosts)}")
            if not master:
                if not probes[0].addresses:
                    raise LaunchError(f"host {hosts[0]} has no address (hostname -I): set MASTER_ADDR",
                                      exits.NO_HOST)
                master = probes[0].addresses[0]
                say(f"MASTER_ADDR={master} (the first address of {hosts[0]}; set MASTER_ADDR to choose another)")
            extra = {"PATH": venv_path(env)}
            for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR"):
                if env.get(name):
                    extra[name] = env[name]
            path, told = remote_env_file(extra, work)
            env["DS_ENV_FILE"] = path
            say("remote ranks get " + "; ".join(told))
    if master:
        cmd += ["--master_addr", master]
    cmd += ["--module", "marscale.cli", "train", "--config", config, *args]
    return Launch(cmd, env)


def plan_torchrun(config: str, args: list[str], env: dict[str, str], work: str) -> Launch:
    timeout = check_timeout_s(env)
    nnodes = int(env.get("NNODES", "1"))
    master = env.get("MASTER_ADDR", "127.0.0.1")
    port = env.get("MASTER_PORT", DEFAULT_PORT)
    gpus = env.get("GPUS") or _local_gpus()
    cmd = [launcher("torchrun"), "--nnodes", str(nnodes), "--nproc_per_node", gpus,
           "--max_restarts", env.get("MAX_RESTARTS", "0")]
    if nnodes == 1:
        cmd += ["--node_rank", env.get("NODE_RANK", "0"), "--master_addr", master, "--master_port", port]
    else:
        # c10d rendezvous hosted by the node at MASTER_ADDR: nodes join in any order, and when
        # one node's workers fail every node restarts its workers together (MAX_RESTARTS).
        # This node's address as the others reach it: LOCAL_ADDR, else the one on the route
        # to MASTER_ADDR. Knowing it, a node knows whether it hosts the rendezvous (torchrun's
        # own guess compares host names, and misses addresses on secondary interfaces), and
        # the workers' master address is one the other nodes can reach.
        local = env.get("LOCAL_ADDR") or _route_source(master)
        hosting = is_this_host(master) if not local else local == _resolve(master)
        if not hosting:
            check_answers(master, int(port), timeout)
        join = env.get("JOIN_TIMEOUT_S", "300")
        if not join.isdigit() or int(join) < 1:
            raise LaunchError(f"JOIN_TIMEOUT_S must be a whole number of seconds >= 1, got {join!r}", exits.BAD_INPUT)
        conf = [f"join_timeout={join}"]
        if local:
            conf.append(f"is_host={int(hosting)}")
            cmd += ["--local_addr", local]
            say(f"this node: {local} ({'hosts' if hosting else 'joins'} the rendezvous at {master}:{port})")
        cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{master}:{port}",
                "--rdzv_id", env.get("RDZV_ID", "marscale"), "--rdzv_conf", ",".join(conf)]
    cmd += ["-m", "marscale.cli", "train", "--config", config, *args]
    return Launch(cmd, env, torchrun=True)


def _resolve(address: str) -> str:
    """`address` as an IPv4 address (itself when it does not resolve: binding it then fails)."""
    try:
        return socket.gethostbyname(address)
    except OSError:
        return address


def _route_source(master: str) -> str | None:
    """This host's address on the route to `master`; None for loopback (one machine)."""
    from marscale.cluster import netif

    try:
        local = netif.source_address(master)
    except OSError:
        return None
    return None if local.startswith("127.") else local


def _local_gpus() -> str:
    try:
        import torch

        return str(max(torch.cuda.device_count(), 1))
    except ImportError:
        return "1"


class Preemption:
    """SIGTERM/SIGUSR1 to the wrapper of a deepspeed launch: write RUN/STOP, once.
    `run.output_dir` is on storage every node sees: rank 0 finds the file at the next step
    boundary, every rank saves that step and exits 75, and the launchers carry it back."""

    def __init__(self, stop_file: str):
        self.stop_file = stop_file
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested:
            return
        self.requested = True
        say(f"{signal.Signals(signum).name}: asking every rank to save a checkpoint and stop ({self.stop_file})")
        os.makedirs(os.path.dirname(self.stop_file) or ".", exist_ok=True)
        with open(self.stop_file, "w") as f:
            f.write(f"{signal.Signals(signum).name} to the launch script on {socket.gethostname()}\n")


def run_torchrun(launch: Launch) -> tuple[int, list[int]]:
    """torchrun in this process (its `run`, as the `torchrun` command calls it), so that its
    workers' exit codes are seen: the command itself exits 1 whatever failed. Returns
    (0 or 1, the exit codes of the workers that failed, as torchrun saw them)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    os.environ.clear()
    os.environ.update(launch.env)
    args = get_args_parser().parse_args(launch.cmd[1:])
    try:
        torchrun(args)
    except ChildFailedError as e:
        return 1, [failure.exitcode for failure in e.failures.values()]
    except SignalException as e:  # a pre-emption: the workers were told to save and stop
        say(f"torchrun stopped its workers on signal {e.sigval}")
        return 1, []
    except Exception as e:  # the rendezvous did not form, or the agent failed
        say(f"torchrun: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        return 1, []
    return 0, []


def final_status(launch: Launch, raw: int, status_dir: str, failures: list[int] = ()) -> int:
    """The contract's status of the job as this node saw it: what the launcher returned,
    torchrun's failed workers, else what the local ranks recorded."""
    if raw == 0:
        return exits.FINISHED
    if failures:  # the workers torchrun saw fail (those it stopped after them are not the cause)
        return exits.combine(failures)
    seen = list(exits.recorded(status_dir).values())
    if launch.torchrun:
        # No failure summary: a pre-emption (the workers recorded 75) or a rendezvous that
        # did not form (nothing recorded: a node is missing).
        return exits.combine(seen) if seen else exits.PEER_LOST
    return exits.combine([raw, *seen])


def run(form: str, config: str, args: list[str]) -> int:
    env = dict(os.environ)
    env["PATH"] = venv_path(env)
    with tempfile.TemporaryDirectory(prefix="marscale-launch-") as work:
        status_dir = os.path.join(work, "status")
        os.makedirs(status_dir)
        env[exits.STATUS_DIR_ENV] = status_dir
        cfg = check_config(config, args)
        launch = (plan_deepspeed if form == "deepspeed" else plan_torchrun)(config, args, env, work)
        master = launch.env.get("MASTER_ADDR") or _arg(launch.cmd, "--master_addr")
        if master:
            from marscale.cluster import netif

            chose = netif.choose(dict(launch.env), master)
            if chose:
                say(chose + " (each node chooses its own)")
        print("+ " + " ".join(shlex.quote(c) for c in [os.path.basename(launch.cmd[0]), *launch.cmd[1:]]),
              file=sys.stderr, flush=True)
        if launch.torchrun:
            # torchrun's agent handles SIGTERM (it stops the workers with it, restarting
            # nothing); SIGUSR1 becomes that too.
            signal.signal(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
            raw, failures = run_torchrun(launch)
        else:
            from marscale.engine.trainer import STOP_FILE

            proc = subprocess.Popen(launch.cmd, env=launch.env)
            preempt = Preemption(os.path.join(cfg.run.output_dir, STOP_FILE))
            signal.signal(signal.SIGTERM, preempt)
            signal.signal(signal.SIGUSR1, preempt)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher itself
            raw, failures = proc.wait(), []
        status = final_status(launch, raw, status_dir, failures)
    if status != raw:
        say(f"the launcher exited {raw}: job status {status} ({_meaning(status)})")
    return status


def _arg(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def _meaning(status: int) -> str:
    return {
        exits.FINISHED: "finished", exits.FAILED: "an unforeseen error", exits.USAGE: "usage",
        exits.NO_HOST: "a host does not answer", exits.PEER_LOST: "a rank or node was lost: --resume auto",
        exits.PREEMPTED: "pre-empted after a checkpoint: --resume auto", exits.BAD_INPUT: "bad configuration",
    }[status]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] not in ("deepspeed", "torchrun"):
        print("usage: python -m marscale.cluster.launch deepspeed|torchrun CONFIG [marscale train arguments...]",
              file=sys.stderr)
        return exits.USAGE
    try:
        return run(argv[0], argv[1], argv[2:])
    except LaunchError as e:
        print(str(e) if str(e).startswith("marscale") else f"marscale launch: error: {e}", file=sys.stderr)
        return e.status


if __name__ == "__main__":
    sys.exit(main())
