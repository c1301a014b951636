"""Error root of the transfer package (data plane and P<->D control channel).

Every error carries the context a log line or a failed request report needs: ``req_id``, ``peer``
(peer id or host:port) and, where blocks are involved, ``block_ids``. ``retryable`` says whether
the same operation may succeed later without any change (a lost connection, a timeout), as
opposed to a misconfiguration (incompatible geometry, wrong token, no common protocol).
"""

from __future__ import annotations

from collections.abc import Sequence

from splitwise.errors import SplitwiseError


class TransferError(SplitwiseError):
    """Root of every error the transfer package raises on purpose."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        req_id: str | None = None,
        peer: str | None = None,
        block_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__(message)
        self.req_id = req_id
        self.peer = peer
        self.block_ids = list(block_ids) if block_ids is not None else None

    def __str__(self) -> str:
        context = [
            f"{name}={value}" for name, value in (("req_id", self.req_id), ("peer", self.peer)) if value
        ]
        if self.block_ids is not None:
            shown = self.block_ids[:8]
            more = "" if len(self.block_ids) <= 8 else f"+{len(self.block_ids) - 8}"
            context.append(f"block_ids={shown}{more}")
        base = super().__str__()
        return f"{base} ({', '.join(context)})" if context else base


class ConnectionLostError(TransferError):
    """The peer closed the connection or could not be reached."""

    retryable = True


class TransferTimeoutError(TransferError):
    """A transfer or a reply did not complete within its deadline."""

    retryable = True


class ProtocolError(TransferError):
    """Malformed bytes on the wire: bad length, bad msgpack, unknown schema version or message type."""


class IncompatiblePeerError(TransferError):
    """The peer's KV geometry, model, or schema version does not match ours."""


class AuthenticationError(TransferError):
    """The peer did not prove it knows the cluster token."""


class UnknownProtocolError(TransferError):
    """A protocol name that no transport is registered for (or whose module failed to import)."""


class UnexpectedBlocksError(TransferError):
    """A write named a request or destination blocks the target did not ``expect``."""


class InvalidBlockIdsError(TransferError):
    """Caller error: block id lists of different lengths, negative or out-of-range ids."""


class NotConnectedError(TransferError):
    """An initiator call named a peer that ``connect`` was not called for."""


class NotRegisteredError(TransferError):
    """A transport method needing KV memory was called before ``register``."""


class UnsupportedDeviceError(TransferError):
    """The transport cannot serve this KV cache (e.g. CUDA IPC without cupy, ipc without shared memory)."""


class RemoteError(TransferError):
    """The peer reported a failure for a request (its reason is the message)."""
