"""Which address an instance advertises to its peers, and which host it runs on.

``--host`` is where the listeners bind; a wildcard (``0.0.0.0``, ``::``) binds every interface but
is no address a peer can connect to, so the node advertises ``--advertise-host`` or, without it,
the address of the interface that routes off this machine.

Same-host detection (it decides whether ipc can be used) compares host ids, never addresses: two
nodes on one machine may advertise different addresses (loopback, a NIC, a container IP) and two
containers may advertise the same name. ipc moves KV through POSIX shared memory and CUDA IPC,
which work between processes that share a kernel (boot id) and an IPC namespace; the host id is
exactly that pair, so two containers on one machine match only when they share the IPC namespace
(``--ipc=host``), which is when ipc works between them.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from splitwise.transfer.base import Endpoint

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "", "*"})

_BOOT_ID = "/proc/sys/kernel/random/boot_id"
_IPC_NAMESPACE = "/proc/self/ns/ipc"
_MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def is_wildcard(host: str) -> bool:
    return host in WILDCARD_HOSTS


def advertised(endpoint: Endpoint, host: str) -> Endpoint:
    """A transport endpoint as peers must see it: a wildcard bind address replaced by ``host``
    (the node's --advertise-host), in the registry record and in D's PrefillTask alike."""
    return dataclasses.replace(endpoint, host=host) if is_wildcard(endpoint.host) else endpoint


def routable_address() -> str:
    """The local address of the interface the default route leaves through (no packet is sent:
    connecting a UDP socket only picks the route); the hostname's address, else loopback."""
    for family, probe in ((socket.AF_INET, ("192.0.2.1", 9)), (socket.AF_INET6, ("2001:db8::1", 9))):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect(probe)
                address = str(sock.getsockname()[0])
        except OSError:
            continue
        if not is_wildcard(address):
            return address
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def host_id() -> str:
    """``<boot id>/<ipc namespace>``; where /proc lacks them, machine id and hostname."""
    boot = _read(_BOOT_ID)
    try:
        namespace = os.readlink(_IPC_NAMESPACE)
    except OSError:
        namespace = ""
    if boot and namespace:
        return f"{boot}/{namespace}"
    machine = next((m for m in map(_read, _MACHINE_ID_FILES) if m), "")
    return f"{machine or 'unknown'}/{socket.gethostname()}"


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""
