"""The exit-status contract of `marscale train` and of every launch script.

A job's caller (a shell, `launch/slurm.sbatch`, a workflow tool) decides from one number
whether to start the job again. Every launch form (the deepspeed launcher over ssh/pdsh,
its `--no_ssh` form, torchrun, srun) ends with one of these, whatever it carried:

    status  meaning                                                   start it again?
    0       finished                                                  no
    1       an error marscale did not foresee (traceback in the log)  no: read the log
    2       the command line is wrong (usage)                         no
    68      a host does not resolve or answer (checked before start)  after fixing the hostfile
    69      a rank or node was lost (died, killed, dropped off the    yes, --resume auto
            network, did not join the process group in time)
    75      pre-empted: a checkpoint was saved                        yes, --resume auto
    78      bad configuration or input (config, shards, weights,      no: fix the input
            checkpoint), refused before training

Launchers carry statuses in their own ways: pdsh returns the largest of its hosts', the
deepspeed launcher a rank's first non-zero status (a rank killed by signal N as 256-N),
torchrun 1 whatever failed, srun the largest task status. `job_status` turns what a
launcher returned into the contract; `combine` joins several ranks' statuses.
"""

from __future__ import annotations

FINISHED = 0
FAILED = 1
USAGE = 2
NO_HOST = 68
"""EX_NOHOST: a host of the job does not resolve or does not answer."""
PEER_LOST = 69
"""EX_UNAVAILABLE: a rank or a node of the job was lost."""
PREEMPTED = 75
"""EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after saving a checkpoint."""
BAD_INPUT = 78
"""EX_CONFIG: the configuration or an input it names is wrong."""

CONTRACT = (FINISHED, FAILED, USAGE, NO_HOST, PEER_LOST, PREEMPTED, BAD_INPUT)
RESTARTABLE = (PEER_LOST, PREEMPTED)
"""Statuses after which the same command with `--resume auto` continues the run."""


def job_status(raw: int) -> int:
    """The contract's status for what a launcher or a process returned: a contract status
    stays; a process killed by a signal (negative in Python, 128+N from a shell, 256-N from
    the deepspeed launcher) and ssh's 255 (the connection to a host was lost) mean a lost
    rank; anything else is an unforeseen error."""
    if raw in CONTRACT:
        return raw
    if raw < 0 or raw > 128:
        return PEER_LOST
    return FAILED


def combine(statuses) -> int:
    """One job status for several ranks' (each mapped by `job_status`): the highest, so a
    pre-emption (75) or a bad input (78) is not hidden by the peers that lost it (69)."""
    mapped = [job_status(s) for s in statuses]
    return max(mapped, default=FINISHED)


STATUS_DIR_ENV = "MARSCALE_STATUS_DIR"
"""Where each process of a launched job records its exit status (set by the launch
wrapper, `marscale.cluster.launch`, for launchers that do not pass statuses on: torchrun)."""


def record(status: int) -> None:
    """Write this process's exit status into `$MARSCALE_STATUS_DIR/status-<pid>` as
    "<RANK> <status>", when the variable is set; a failure to write is not an error."""
    import os

    folder = os.environ.get(STATUS_DIR_ENV)
    if not folder:
        return
    path = os.path.join(folder, f"status-{os.getpid()}")
    try:
        with open(path + ".tmp", "w") as f:
            f.write(f"{os.environ.get('RANK', '0')} {status}\n")
        os.replace(path + ".tmp", path)
    except OSError:
        pass


def recorded(folder: str) -> dict[int, int]:
    """The statuses `record` wrote into `folder`: {pid: status}."""
    import os

    found = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if not name.startswith("status-") or name.endswith(".tmp"):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                found[int(name.split("-", 1)[1])] = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return found


def main(argv: list[str] | None = None) -> int:
    """`python -m marscale.core.exits STATUS`: print the contract's status for STATUS (for
    shell scripts such as launch/slurm.sbatch)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].lstrip("-").isdigit():
        print("usage: python -m marscale.core.exits STATUS", file=sys.stderr)
        return USAGE
    print(job_status(int(args[0])))
    return FINISHED


if __name__ == "__main__":
    raise SystemExit(main())
