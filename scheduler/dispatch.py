"""Choosing where a request runs: the pair (atomically booked in Redis) and the transfer protocol.

The policy itself runs inside ``scripts.DISPATCH`` so that choosing and booking are one atomic step
that every concurrent frontend sees at once. This module prepares its arguments, turns its answer
into an ``Assignment`` and releases bookings.
"""

from __future__ import annotations

import random

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from scheduler import scripts
from scheduler.errors import NoCapacityError
from scheduler.keys import KeySchema
from scheduler.messages import Assignment, NodeInfo

_ROLE_LETTER = {"mixed": "m", "prefill": "p", "decode": "d"}


def choose_protocol(prefill: NodeInfo, decode: NodeInfo) -> str | None:
    """ipc when both are on one host (equal host ids, never addresses) and offer it; else the first
    protocol in the decode node's preference list (its --cache-transfer-protocol) that the prefill
    node also offers, ipc excluded.
    With the default preference "ipc,rdma,tcp" that is: ipc, else rdma, else tcp. None: no common one.
    """
    common = [p for p in decode.transfer_protocols if p in prefill.transfer_protocols]
    if "ipc" in common and prefill.host_id != "" and prefill.host_id == decode.host_id:
        return "ipc"
    for protocol in common:
        if protocol != "ipc":
            return protocol
    return None


class Dispatcher:
    """Runs the dispatch/release scripts for one topic."""

    def __init__(self, client: aioredis.Redis, keys: KeySchema, *, rng: random.Random | None = None) -> None:
        self._keys = keys
        self._rng = rng or random.Random()
        self._dispatch = client.register_script(scripts.DISPATCH)
        self._release = client.register_script(scripts.RELEASE)

    def _accounting_keys(self, req_id: str) -> list[str]:
        k = self._keys
        return [k.bookings, k.booked_prefill_tokens, k.booked_decode_requests, k.request(req_id)]

    async def pick(
        self,
        req_id: str,
        candidates: list[NodeInfo],
        *,
        prompt_tokens: int,
        frontend_id: str,
        attempt: int,
        now_ms: int,
        expire_at_ms: int,
        ttl_ms: int,
    ) -> Assignment | None:
        """Pick and book a pair among ``candidates`` (one compatibility group). None: nobody alive."""
        if not candidates:
            return None
        keys = self._accounting_keys(req_id) + [self._keys.heartbeat(n.node_id) for n in candidates]
        args: list[str | int] = [
            now_ms,
            expire_at_ms,
            req_id,
            prompt_tokens,
            self._rng.randrange(len(candidates)),
            frontend_id,
            attempt,
            ttl_ms,
        ]
        for node in candidates:
            args += [node.node_id, _ROLE_LETTER[node.role]]
        answer = await self._dispatch(keys=keys, args=args)
        if not answer:
            return None
        mode, p_id, p_inc, d_id, d_inc = (v.decode() for v in answer)
        by_id = {n.node_id: n for n in candidates}
        prefill, decode = by_id[p_id], by_id[d_id]
        if mode == "mixed":
            return Assignment(
                mode="mixed",
                prefill_node_id=p_id,
                decode_node_id=d_id,
                prefill_host=prefill.host,
                prefill_pd_comm_port=prefill.pd_comm_port,
                prefill_incarnation=p_inc,
                decode_incarnation=d_inc,
            )
        protocol = choose_protocol(prefill, decode)
        if protocol is None:
            await self.release_all(req_id, now_ms=now_ms)
            raise NoCapacityError(
                f"prefill {p_id} {prefill.transfer_protocols} and decode {d_id} {decode.transfer_protocols} "
                "share no transfer protocol (--cache-transfer-protocol)",
                req_id=req_id,
            )
        return Assignment(
            mode="disagg",
            prefill_node_id=p_id,
            decode_node_id=d_id,
            protocol=protocol,
            prefill_endpoint=prefill.transfer_endpoints.get(protocol, {}),
            decode_endpoint=decode.transfer_endpoints.get(protocol, {}),
            prefill_host=prefill.host,
            prefill_pd_comm_port=prefill.pd_comm_port,
            prefill_incarnation=p_inc,
            decode_incarnation=d_inc,
        )

    async def release(
        self, req_id: str, kind: str, *, node_id: str = "", state: str = "", now_ms: int
    ) -> int:
        """Release the request's ``pbook`` or ``dbook`` booking (idempotent). Returns the amount released."""
        return int(
            await self._release(keys=self._accounting_keys(req_id), args=[kind, node_id, state, now_ms])
        )

    async def queue_release(
        self, pipe: Pipeline, req_id: str, kind: str, *, node_id: str = "", state: str = "", now_ms: int
    ) -> None:
        """Queue the same release on a pipeline (its reply is the amount released)."""
        await self._release(
            keys=self._accounting_keys(req_id), args=[kind, node_id, state, now_ms], client=pipe
        )

    async def release_all(self, req_id: str, *, state: str = "", now_ms: int) -> None:
        await self.release(req_id, "pbook", state=state, now_ms=now_ms)
        await self.release(req_id, "dbook", now_ms=now_ms)
