"""Two hosts on one machine for multi-node tests: Linux network namespaces joined by a veth pair.

    host 0  netns marscale-test-PID-Nh0   lo, veth0 10.77.0.1/24  ─┐
                                                                 ├─ one veth pair, nothing else
    host 1  netns marscale-test-PID-Nh1   lo, veth0 10.77.0.2/24  ─┘

Each host has its own network stack (addresses, ports, routes): a process on host 1
reaches host 0 only through the veth pair, so cutting the link (`link_down`) or killing
every process of a host (`kill_host`) is what a cluster sees when a node fails. The
namespaces have no route anywhere else: nothing outside them is ever contacted. The
hosts share this machine's filesystem, as cluster nodes share their storage.

Both ends of the pair are called `veth0` (names are per namespace), so one
`GLOO_SOCKET_IFNAME=veth0` tells every process which interface its address is on.

`start_sshd` runs an OpenSSH server inside each host, with a host key and a client key
generated for the test; `ssh_env` gives a launcher process a `PATH` whose `ssh` uses that
key (the user's ~/.ssh is never read or written).

Clean-up (`close`, also run when a test fails): every process inside either namespace is
killed (`ip netns pids`), then the namespaces (and with them the veth pair) are deleted.
Namespaces left behind by a test process that died are deleted at the next start.

`two_hosts_or_skip()` returns a `TwoHosts`, or skips the test with the reason when the
machine cannot build them (not Linux, no `ip`, no permission to create namespaces).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

SUBNET = "10.77.0"
IFNAME = "veth0"
_PREFIX = "marscale-test"


def _ip(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout, check=check)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale() -> None:
    """Delete namespaces of earlier test processes that are gone (killed before clean-up)."""
    listed = _ip("netns", "list", check=False).stdout.split()
    for name in listed:
        parts = name.split("-")
        if name.startswith(_PREFIX + "-") and len(parts) == 4 and parts[2].isdigit() and not _pid_alive(int(parts[2])):
            _delete_namespace(name)


def _namespace_pids(name: str) -> list[int]:
    out = _ip("netns", "pids", name, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _delete_namespace(name: str) -> None:
    for _ in range(50):  # processes can fork while we kill: repeat until none is left
        pids = _namespace_pids(name)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    _ip("netns", "delete", name, check=False)


class TwoHosts:
    """Two namespaced hosts and the processes started in them (see the module docstring)."""

    def __init__(self) -> None:
        _remove_stale()
        stamp = f"{_PREFIX}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
        self.namespaces = [f"{stamp}h0", f"{stamp}h1"]
        self.addresses = [f"{SUBNET}.1", f"{SUBNET}.2"]
        self.procs: list[subprocess.Popen] = []
        self._tmp = tempfile.mkdtemp(prefix="marscale-hosts-")
        self._created: list[str] = []
        try:
            for name in self.namespaces:
                _ip("netns", "add", name)
                self._created.append(name)
                _ip("-n", name, "link", "set", "lo", "up")
            _ip("link", "add", IFNAME, "netns", self.namespaces[0], "type", "veth",
                "peer", "name", IFNAME, "netns", self.namespaces[1])
            for name, address in zip(self.namespaces, self.addresses):
                _ip("-n", name, "addr", "add", f"{address}/24", "dev", IFNAME)
                _ip("-n", name, "link", "set", IFNAME, "up")
        except BaseException:
            self.close()
            raise

    # --- processes ----------------------------------------------------------------------

    def command(self, host: int, cmd: list[str]) -> list[str]:
        """`cmd` run inside host `host`'s network namespace."""
        return ["ip", "netns", "exec", self.namespaces[host], *cmd]

    def popen(self, host: int, cmd: list[str], **kwargs) -> subprocess.Popen:
        """Start `cmd` on host `host` in its own session (killed at clean-up)."""
        proc = subprocess.Popen(self.command(host, cmd), start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, host: int, cmd: list[str], timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, cmd), timeout=timeout, capture_output=True, text=True, **kwargs)

    def kill_host(self, host: int) -> list[int]:
        """SIGKILL every process inside host `host` (what a node crash does). Returns the pids."""
        pids = _namespace_pids(self.namespaces[host])
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def link_down(self, host: int) -> None:
        """Take host `host`'s end of the link down: the two hosts can no longer reach each other."""
        _ip("-n", self.namespaces[host], "link", "set", IFNAME, "down")

    def link_up(self, host: int) -> None:
        """Bring host `host`'s end of the link back up."""
        _ip("-n", self.namespaces[host], "link", "set", IFNAME, "up")

    # --- ssh ------------------------------------------------------------------------------

    def start_sshd(self) -> None:
        """An OpenSSH server on port 22 of each host, accepting a key generated here."""
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        keygen = shutil.which("ssh-keygen")
        if not os.path.isfile(sshd) or keygen is None or shutil.which("ssh") is None:
            pytest.skip("the ssh launcher tests need OpenSSH (sshd, ssh, ssh-keygen): apt-get install openssh-server")
        d = self._tmp
        for key in ("host_key", "client_key"):
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, key)], check=True,
                           timeout=30)
        shutil.copy(os.path.join(d, "client_key.pub"), os.path.join(d, "authorized_keys"))
        # sshd refuses to start without its privilege separation folder.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        for host, address in enumerate(self.addresses):
            config = os.path.join(d, f"sshd_config{host}")
            with open(config, "w") as f:
                f.write(
                    f"ListenAddress {address}\nPort 22\nHostKey {d}/host_key\n"
                    f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n"
                    "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                    "PidFile none\nLogLevel ERROR\n"
                )
            self.popen(host, [sshd, "-D", "-e", "-f", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = os.path.join(d, "ssh_config")
        with open(client, "w") as f:
            f.write(
                f"Host *\n  User root\n  IdentityFile {d}/client_key\n  IdentitiesOnly yes\n"
                "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n"
                "  ConnectTimeout 5\n  LogLevel ERROR\n"
            )
        bin_dir = os.path.join(d, "bin")
        os.makedirs(bin_dir, exist_ok=True)
        wrapper = os.path.join(bin_dir, "ssh")
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {client} \"$@\"\n")
        os.chmod(wrapper, 0o755)
        self._ssh_bin = bin_dir
        deadline = time.time() + 20
        for host, address in enumerate(self.addresses):
            while True:  # from the other host, as the launcher will connect
                probe = self.run(1 - host, [wrapper, address, "true"], timeout=15)
                if probe.returncode == 0:
                    break
                if time.time() > deadline:
                    raise RuntimeError(f"sshd on {address} did not accept the test key: {probe.stderr[-500:]}")
                time.sleep(0.2)

    def ssh_env(self, env: dict[str, str]) -> dict[str, str]:
        """`env` with an `ssh` on PATH that uses the test's key and trusts the test's hosts."""
        return {**env, "PATH": self._ssh_bin + os.pathsep + env.get("PATH", "")}

    # --- clean-up -------------------------------------------------------------------------

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for name in self._created:
            _delete_namespace(name)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._created = []
        shutil.rmtree(self._tmp, ignore_errors=True)


def two_hosts_or_skip() -> TwoHosts:
    """A `TwoHosts`, or `pytest.skip` with the reason this machine cannot build one."""
    if not sys.platform.startswith("linux"):
        pytest.skip("two-host tests need Linux network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("two-host tests need the `ip` command (apt-get install iproute2)")
    try:
        return TwoHosts()
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot create network namespaces here ({' '.join(e.cmd)}: {e.stderr.strip()}); "
                    f"the two-host tests need root or CAP_NET_ADMIN")
