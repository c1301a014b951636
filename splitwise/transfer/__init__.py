"""KV block transfer between prefill (P) and decode (D) nodes, and the P<->D control channel.

The contract is ``base.TransportTarget`` / ``base.TransportInitiator``; ``registry`` maps protocol
names (ipc, tcp, rdma) to implementations and picks one for a node pair.
"""

from splitwise.transfer.base import (
    BlockRun,
    Endpoint,
    TransferState,
    TransferStatus,
    TransportInitiator,
    TransportOptions,
    TransportTarget,
    coalesce_runs,
)
from splitwise.transfer.errors import TransferError
from splitwise.transfer.registry import (
    create_initiator,
    create_target,
    get_transport,
    parse_protocols,
    register_transport,
)

__all__ = [
    "BlockRun",
    "Endpoint",
    "TransferError",
    "TransferState",
    "TransferStatus",
    "TransportInitiator",
    "TransportOptions",
    "TransportTarget",
    "coalesce_runs",
    "create_initiator",
    "create_target",
    "get_transport",
    "parse_protocols",
    "register_transport",
]
