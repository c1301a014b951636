"""Choosing where a request runs: the pair (atomically booked in Redis) and the transfer protocol.

The policy runs inside ``scripts.DISPATCH`` so that choosing and booking are one atomic step that
every concurrent frontend sees at once, at a cost independent of the number of nodes (a bounded
sample of each role's least-loaded candidates). This module prepares its arguments, turns its
answer into an ``Assignment`` and releases bookings.
"""

from __future__ import annotations

import random

import redis.asyncio as aioredis

from scheduler import scripts
from scheduler.errors import NoCapacityError
from scheduler.keys import KeySchema
from scheduler.messages import Assignment, NodeInfo
from scheduler.registry import CandidateGroup, split_member
from scheduler.scripting import Batch
from splitwise.codes import Mode, Protocol

# Candidates sampled per role and pick: ties among up to this many least-loaded nodes are broken
# at random, and up to this many lapsed members are cleaned out per round.
SAMPLE_SIZE = 8


def choose_protocol(prefill: NodeInfo, decode: NodeInfo) -> Protocol | None:
    """ipc when both are on one host (equal host ids, never addresses) and offer it; else the first
    protocol in the decode node's preference list (its --cache-transfer-protocol) that the prefill
    node also offers, ipc excluded.
    With the default preference "ipc,rdma,tcp" that is: ipc, else rdma, else tcp. None: no common one.
    """
    common = [p for p in decode.transfer_protocols if p in prefill.transfer_protocols]
    if Protocol.IPC in common and prefill.host_id != "" and prefill.host_id == decode.host_id:
        return Protocol.IPC
    for protocol in common:
        if protocol != Protocol.IPC:
            return protocol
    return None


def booking_key(keys: KeySchema, member: str) -> str:
    """The candidate set a booking member was made on (``kind|group|...``)."""
    kind, group, _rest = member.split("|", 2)
    return keys.candidates(group, kind)


def queue_release(batch: Batch, keys: KeySchema, members: list[str]) -> None:
    """Queue one idempotent release of ``members`` (its reply: the amount released)."""
    if members:
        batch.script(scripts.RELEASE, [keys.bookings, *(booking_key(keys, m) for m in members)], members)


def booking_members(
    req_id: str, group: str, picked: tuple[str, str, str], *, prompt_tokens: int, attempt: int
) -> list[str]:
    """The booking members ``scripts.DISPATCH`` wrote for this pick (same format, rebuilt here)."""
    mode, p_member, d_member = picked
    tail = f"|{req_id}|{attempt}|"
    if mode.startswith("local/"):  # conditional disaggregation: D alone, one decode slot
        return [f"d|{group}|{d_member}{tail}{scripts.DECODE_BOOKING_UNIT}"]
    if mode == "mixed":
        return [f"m|{group}|{p_member}{tail}{prompt_tokens + 1}"]
    return [
        f"p|{group}|{p_member}{tail}{prompt_tokens}",
        f"d|{group}|{d_member}{tail}{scripts.DECODE_BOOKING_UNIT}",
    ]


class Dispatcher:
    """Runs the dispatch script for one topic."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: KeySchema,
        *,
        rng: random.Random | None = None,
        min_prefill_tokens: int = 0,
        max_prefill_queue: int = 0,
        overlap_weights: tuple[float, float] = (0.0, 0.0),
        prefill_balance_tokens: int = 0,
    ) -> None:
        self._client = client
        self._keys = keys
        self._rng = rng or random.Random()
        self._min_prefill_tokens = min_prefill_tokens  # --disagg-min-prefill-tokens
        self._max_prefill_queue = max_prefill_queue  # --disagg-max-prefill-queue
        self._overlap_weights = overlap_weights  # --kv-overlap-weight-prefill/-decode
        self._prefill_balance_tokens = prefill_balance_tokens  # --kv-prefill-balance-tokens

    async def pick(
        self,
        req_id: str,
        group: CandidateGroup,
        *,
        prompt_tokens: int,
        attempt: int,
        now_ms: int,
        expire_at_ms: int,
        prefix_hashes: list[str] | None = None,
        block_size: int = 0,
        hits_out: list[int] | None = None,
    ) -> tuple[str, str, str] | None:
        """Pick and book within one group: (mode, prefill member, decode member), None when nobody
        live can take it. Mode ``local/<why>`` (why: short_prompt, prefill_queue, no_prefill): the
        decode node was booked alone and prefills locally (conditional disaggregation).
        ``prefix_hashes`` (``prefix_index.prompt_block_hashes``) turn on KV-aware scoring when a
        weight is set; ``hits_out`` receives the cached prefix blocks of the picked P and D (also
        with both weights 0: load-only routing, recorded for comparison) and the prompt tokens
        booked on P (the ``prompt_tokens`` of ``booking_members`` for this pick)."""
        hashes = prefix_hashes if block_size > 0 else None
        k = self._keys
        answer = await scripts.DISPATCH.call(
            self._client,
            [
                k.alive,
                k.bookings,
                k.candidates(group.group, "p"),
                k.candidates(group.group, "d"),
                k.candidates(group.group, "m"),
            ],
            [
                now_ms,
                expire_at_ms,
                req_id,
                attempt,
                prompt_tokens,
                group.roles,
                SAMPLE_SIZE,
                self._rng.randrange(1, 2147483646),
                group.group,
                scripts.DECODE_BOOKING_UNIT,
                self._min_prefill_tokens,
                self._max_prefill_queue,
                *self._overlap_weights,
                k.prefix_index(""),
                block_size,
                self._prefill_balance_tokens,
                *(hashes or []),
            ],
        )
        if not answer:
            return None
        mode, p_member, d_member = (v.decode() for v in answer[:3])
        if hits_out is not None:
            hits_out[:] = [int(v) for v in answer[3:6]]
        return mode, p_member, d_member

    def assignment(
        self,
        req_id: str,
        group: CandidateGroup,
        picked: tuple[str, str, str],
        *,
        prompt_tokens: int,
        attempt: int,
        nodes: dict[str, NodeInfo],
    ) -> Assignment:
        """The Assignment for a pick (raises NoCapacityError when the pair shares no protocol)."""
        mode, p_member, d_member = picked
        (p_id, p_inc), (d_id, d_inc) = split_member(p_member), split_member(d_member)
        bookings = booking_members(req_id, group.group, picked, prompt_tokens=prompt_tokens, attempt=attempt)
        prefill, decode = nodes.get(p_id), nodes.get(d_id)
        if prefill is None or decode is None:
            raise NoCapacityError(
                f"picked node {p_id}/{d_id} is not in this frontend's view yet", req_id=req_id
            )
        common = {
            "prefill_node_id": p_id,
            "decode_node_id": d_id,
            "prefill_host": prefill.host,
            "prefill_pd_comm_port": prefill.pd_comm_port,
            "prefill_incarnation": p_inc,
            "decode_incarnation": d_inc,
            "group": group.group,
            "bookings": bookings,
        }
        if mode == "mixed" or mode.startswith("local/"):  # local: D serves it alone, as a mixed node
            return Assignment(mode=Mode.MIXED, **common)  # type: ignore[arg-type]
        protocol = choose_protocol(prefill, decode)
        if protocol is None:
            raise NoCapacityError(
                f"prefill {p_id} {prefill.transfer_protocols} and decode {d_id} {decode.transfer_protocols} "
                "share no transfer protocol (--cache-transfer-protocol)",
                req_id=req_id,
            )
        return Assignment(
            mode=Mode.DISAGG,
            protocol=protocol,
            prefill_endpoint=prefill.transfer_endpoints.get(protocol),
            decode_endpoint=decode.transfer_endpoints.get(protocol),
            **common,  # type: ignore[arg-type]
        )

    async def release(self, members: list[str]) -> int:
        batch = Batch(self._client)
        queue_release(batch, self._keys, members)
        results = await batch.execute()
        return int(results[0]) if results else 0
