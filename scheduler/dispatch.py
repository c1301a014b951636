"""Choosing where a request runs: the pair (atomically booked in Redis) and the transfer protocol.

The policy runs inside ``scripts.DISPATCH`` so that choosing and booking are one atomic step that
every concurrent frontend sees at once, at a cost independent of the number of nodes (a bounded
sample of each role's least-loaded candidates). This module prepares its arguments, turns its
answer into an ``Assignment`` and releases bookings.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import redis.asyncio as aioredis

from scheduler import scripts
from scheduler.errors import MessageDecodeError, NoCapacityError
from scheduler.keys import KeySchema
from scheduler.messages import Assignment, NodeInfo, WorkItem, decode
from scheduler.registry import CandidateGroup, split_member
from scheduler.scripting import Batch
from splitwise.codes import Mode, Protocol

# The assignment a frontend encodes in the WorkItem it hands to the dispatch script: the decode node
# replaces it with the one it builds from its work entry (``work_from_entry``).
UNASSIGNED = Assignment(mode=Mode.MIXED, prefill_node_id="", decode_node_id="")

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


@dataclass(frozen=True)
class Picked:
    """What one ``scripts.DISPATCH`` call chose and booked (and, given a payload, enqueued)."""

    mode: str  # disagg, mixed, local/<why>
    prefill_member: str
    decode_member: str
    booked: int  # the prompt tokens booked on P (the ``prompt_tokens`` of ``booking_members``)
    entry_id: bytes | None = None  # the work entry the script added (None: the caller enqueues)
    created_id: bytes | None = None  # the marker of a work stream the script had to re-create
    hits: tuple[int, ...] = ()  # cached prefix blocks of P and D (disaggregated, hashes sent)

    @property
    def members(self) -> tuple[str, str, str]:
        return self.mode, self.prefill_member, self.decode_member


def build_assignment(
    req_id: str,
    group: str,
    picked: tuple[str, str, str],
    bookings: list[str],
    prefill: NodeInfo,
    decode: NodeInfo,
) -> Assignment:
    """The Assignment of a pick, from the pair's descriptions: the frontend builds it from its view,
    the decode node from the descriptions in its work entry (the same function: the same answer).
    Raises NoCapacityError when a disaggregated pair shares no transfer protocol."""
    mode, p_member, d_member = picked
    (p_id, p_inc), (d_id, d_inc) = split_member(p_member), split_member(d_member)
    common = {
        "prefill_node_id": p_id,
        "decode_node_id": d_id,
        "prefill_host": prefill.host,
        "prefill_pd_comm_port": prefill.pd_comm_port,
        "prefill_incarnation": p_inc,
        "decode_incarnation": d_inc,
        "group": group,
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


class EntryDecoder:
    """The decode node's side of the hand-off: a work entry written by ``scripts.DISPATCH`` (its
    WorkItem with a placeholder assignment, the pick and the pair's NodeInfo payloads) becomes
    the WorkItem with the Assignment the frontend built from the same pick. Entries written
    whole (``m`` alone: the frontend's fallback) decode as they are. Descriptions are decoded
    once per payload (a node sees few distinct peers). Raises MessageDecodeError (dead letter)
    and NoCapacityError (the pair shares no protocol: the frontend withdrew it)."""

    def __init__(self) -> None:
        self._infos: dict[bytes, NodeInfo] = {}

    def info(self, payload: bytes) -> NodeInfo:
        info = self._infos.get(payload)
        if info is None:
            if len(self._infos) >= 4096:
                self._infos.clear()
            info = self._infos[payload] = decode(payload, NodeInfo)
        return info

    def work_item(self, fields: dict[bytes, bytes]) -> WorkItem:
        item: WorkItem = decode(fields[b"m"], WorkItem)
        mode = fields.get(b"mode")
        if mode is None:
            return item
        try:
            picked = (mode.decode(), fields[b"p"].decode(), fields[b"d"].decode())
            group, bookings = fields[b"g"].decode(), fields[b"b"].decode().split(" ")
            prefill, decode_info = self.info(fields[b"pi"]), self.info(fields[b"di"])
        except (KeyError, UnicodeDecodeError) as exc:
            raise MessageDecodeError(f"work entry without its pick fields ({exc!r})") from None
        assignment = build_assignment(item.req_id, group, picked, bookings, prefill, decode_info)
        return dataclasses.replace(item, assignment=assignment)


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
        stream_maxlen: int = 100_000,
        stream_ttl_ms: int = 0,
        prefill_balance_tokens: int = 0,
    ) -> None:
        self._client = client
        self._keys = keys
        self._rng = rng or random.Random()
        self._min_prefill_tokens = min_prefill_tokens  # --disagg-min-prefill-tokens
        self._max_prefill_queue = max_prefill_queue  # --disagg-max-prefill-queue
        self._overlap_weights = overlap_weights  # --kv-overlap-weight-prefill/-decode
        self._stream_maxlen = stream_maxlen
        self._stream_ttl_ms = stream_ttl_ms
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
        work_payload: bytes = b"",
    ) -> Picked | None:
        """Pick and book within one group, None when nobody live can take it. Mode ``local/<why>``
        (why: short_prompt, prefill_queue, no_prefill): the decode node was booked alone and
        prefills locally (conditional disaggregation). ``prefix_hashes``
        (``prefix_index.prompt_block_hashes``) turn on KV-aware scoring when a weight is set; the
        cached prefix blocks of the picked P and D come back in ``hits`` (also with both weights 0:
        load-only routing, recorded for comparison). With ``work_payload`` (an encoded WorkItem,
        its assignment a placeholder) the script also enqueues the work entry."""
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
                k.nodes,
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
                work_payload,
                k.work(""),
                self._stream_maxlen,
                self._stream_ttl_ms,
                self._prefill_balance_tokens,
                *(hashes or []),
            ],
        )
        if not answer:
            return None
        mode, p_member, d_member = (bytes(v).decode() for v in answer[:3])
        return Picked(
            mode,
            p_member,
            d_member,
            booked=int(answer[7]),
            entry_id=bytes(answer[3]) or None,
            created_id=bytes(answer[4]) or None,
            hits=(int(answer[5]), int(answer[6])) if mode == "disagg" and hashes else (),
        )

    def assignment(
        self, req_id: str, group: CandidateGroup, picked: Picked, *, attempt: int, nodes: dict[str, NodeInfo]
    ) -> Assignment:
        """The Assignment for a pick (raises NoCapacityError when the pair shares no protocol, or a
        picked node is not in ``nodes``)."""
        bookings = booking_members(
            req_id, group.group, picked.members, prompt_tokens=picked.booked, attempt=attempt
        )
        p_id, d_id = split_member(picked.prefill_member)[0], split_member(picked.decode_member)[0]
        prefill, decode = nodes.get(p_id), nodes.get(d_id)
        if prefill is None or decode is None:
            raise NoCapacityError(
                f"picked node {p_id}/{d_id} is not in this frontend's view yet", req_id=req_id
            )
        return build_assignment(req_id, group.group, picked.members, bookings, prefill, decode)

    async def release(self, members: list[str]) -> int:
        batch = Batch(self._client)
        queue_release(batch, self._keys, members)
        results = await batch.execute()
        return int(results[0]) if results else 0
