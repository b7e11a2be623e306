"""The network interface a node's ranks talk over: the one that routes to the master.

gloo binds to the address its host name resolves to unless `GLOO_SOCKET_IFNAME` names an
interface; on many clusters (and in /etc/hosts files that map the host name to
127.0.1.1) that is loopback, and the other nodes cannot connect to it. NCCL's bootstrap
(`NCCL_SOCKET_IFNAME`) guesses too. Asking the kernel which source address it would use
to reach the master address, and which interface holds that address, gives the right
interface on every node, the master's own included.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

_SIOCGIFADDR = 0x8915
IFNAME_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def source_address(address: str, port: int = 29500) -> str:
    """This host's address on the route to `address` (a name or an IPv4 address)."""
    target = socket.gethostbyname(address)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((target, port))  # UDP: chooses the route, sends nothing
        return s.getsockname()[0]


def interface_address(name: str) -> str | None:
    """The IPv4 address of interface `name`, or None when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def interface_to(address: str) -> tuple[str, str] | None:
    """(interface, its address) this host uses to reach `address`; None when the route is
    loopback (the master is this host and named by a loopback address: one node)."""
    local = source_address(address)
    if ipaddress.ip_address(local).is_loopback:
        return None
    for _, name in socket.if_nameindex():
        if interface_address(name) == local:
            return name, local
    return None


def choose(environ: dict[str, str], master_addr: str) -> str | None:
    """Set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME in `environ` to the interface that
    routes to `master_addr`, each only where unset. Returns a line saying what was chosen
    (None when nothing was: both set already, or a one-node job on loopback)."""
    missing = [v for v in IFNAME_VARIABLES if not environ.get(v)]
    if not missing:
        return None
    try:
        found = interface_to(master_addr)
    except OSError as e:
        raise RuntimeError(
            f"cannot find the route to MASTER_ADDR={master_addr} ({e}); set GLOO_SOCKET_IFNAME and "
            f"NCCL_SOCKET_IFNAME to the interface the nodes talk over"
        ) from None
    if found is None:
        return None
    name, local = found
    for v in missing:
        environ[v] = name
    return (f"{socket.gethostname()}: {' and '.join(missing)}={name} ({local}, the route to MASTER_ADDR "
            f"{master_addr}); set them to choose another interface")
