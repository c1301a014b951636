"""The closed vocabularies that cross process boundaries: roles, transfer protocols, dispatch
modes and failure codes (torch-free: the scheduler, the API and the instance all import it).

They are ``StrEnum``s: a member is its string (``Role.DECODE == "decode"``), so on the wire, in
Redis, in logs and in flags they read as before, while code names the member and a typo is an
AttributeError instead of a silently unknown string.
"""

from __future__ import annotations

import enum


class Role(enum.StrEnum):
    MIXED = "mixed"
    PREFILL = "prefill"
    DECODE = "decode"


class Protocol(enum.StrEnum):
    IPC = "ipc"
    RDMA = "rdma"
    TCP = "tcp"


class Mode(enum.StrEnum):
    MIXED = "mixed"  # one node runs the whole request
    DISAGG = "disagg"  # D runs it, P prefills it (the work item goes to D)


class FailureCode(enum.StrEnum):
    """``Failed.code``: why a request ended with an error (the API maps these to HTTP statuses)."""

    INVALID_REQUEST = "invalid_request"  # bad input, e.g. a prompt no cache can hold (HTTP 400)
    NO_CAPACITY = "no_capacity"  # no live compatible pair or mixed node (HTTP 503)
    NODE_LOST = "node_lost"  # the node serving it died and re-dispatch gave up (HTTP 503)
    SCHEDULER_CLOSED = "scheduler_closed"  # the frontend shut down mid-request (HTTP 503)
    DROPPED_BY_NODE = "dropped_by_node"  # the node could not read the work item
    NODE_DRAINING = "node_draining"  # handed back by a draining node (retryable: re-dispatched)
    DECODE_CAPACITY = "decode_capacity"  # too many requests wait for KV blocks on D
    PREFILL_UNAVAILABLE = "prefill_unavailable"  # remote prefill failed, --pd-fallback fail
    ENGINE_ERROR = "engine_error"  # the engine or a transport refused or failed it
    INTERNAL = "internal"  # a bug: logged with its traceback


class RefusalCode(enum.StrEnum):
    """``Refused.code``: why a control-channel or side-channel server closed a connection."""

    AUTH = "auth"  # wrong or missing cluster token
    INCOMPATIBLE = "incompatible"  # model id or KV geometry differ
    PROTOCOL = "protocol"  # a malformed or out-of-order handshake frame


ROLES: tuple[str, ...] = tuple(r.value for r in Role)  # plain strings: error messages list them
PROTOCOLS: tuple[str, ...] = tuple(p.value for p in Protocol)
