"""Protocol name -> transport classes.

The choice of protocol for a P/D pair is made once, where the pair is chosen:
``scheduler.dispatch.choose_protocol``.

Built-in transports register lazily (their module is imported on first lookup), so importing
``splitwise.transfer`` stays cheap and an optional dependency (pyverbs for rdma) is only needed
when that protocol is asked for. The rdma package plugs in by calling ``register_transport("rdma",
RdmaInitiator, RdmaTarget)`` at import; ``_LAZY_MODULES`` says which module to import for it.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass

from splitwise.codes import PROTOCOLS
from splitwise.transfer.base import TransportInitiator, TransportOptions, TransportTarget
from splitwise.transfer.errors import UnknownProtocolError

KNOWN_PROTOCOLS = PROTOCOLS  # the one list (splitwise.codes.Protocol)

_LAZY_MODULES = {
    "ipc": "splitwise.transfer.ipc",
    "tcp": "splitwise.transfer.tcp",
    "rdma": "rdma.transport",  # registers on import; `import rdma` alone stays light
}


@dataclass(frozen=True)
class TransportClasses:
    initiator: type[TransportInitiator]
    target: type[TransportTarget]


_lock = threading.Lock()
_registry: dict[str, TransportClasses] = {}


def register_transport(name: str, initiator: type[TransportInitiator], target: type[TransportTarget]) -> None:
    """Make ``name`` available to ``get_transport``. Re-registering the same classes is a no-op."""
    with _lock:
        _registry[name] = TransportClasses(initiator, target)


def get_transport(name: str) -> TransportClasses:
    """The classes for ``name``, importing its module on first use. Raises UnknownProtocolError."""
    with _lock:
        found = _registry.get(name)
    if found is not None:
        return found
    module = _LAZY_MODULES.get(name)
    if module is None:
        raise UnknownProtocolError(f"no transport named {name!r}; known: {sorted(KNOWN_PROTOCOLS)}")
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise UnknownProtocolError(
            f"transport {name!r} unavailable: importing {module} failed: {exc}"
        ) from exc
    with _lock:
        found = _registry.get(name)
    if found is None:
        raise UnknownProtocolError(f"module {module} did not register transport {name!r}")
    return found


def create_target(name: str, options: TransportOptions | None = None) -> TransportTarget:
    return get_transport(name).target(options or TransportOptions())  # type: ignore[call-arg]


def create_initiator(name: str, options: TransportOptions | None = None) -> TransportInitiator:
    return get_transport(name).initiator(options or TransportOptions())  # type: ignore[call-arg]


def parse_protocols(value: str) -> tuple[str, ...]:
    """Parse ``--cache-transfer-protocol`` ("rdma,ipc"): names in order, no repeats, all known."""
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    if not names:
        raise ValueError("--cache-transfer-protocol: empty; give e.g. 'rdma,ipc' or 'tcp'")
    unknown = [n for n in names if n not in KNOWN_PROTOCOLS]
    if unknown:
        raise ValueError(f"--cache-transfer-protocol: unknown {unknown}; choose from {list(KNOWN_PROTOCOLS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--cache-transfer-protocol: {value!r} repeats a protocol")
    return names
