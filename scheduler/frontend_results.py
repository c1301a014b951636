"""The frontend's results loop: [pending log records + XREAD BLOCK] in one round trip, then each
message of each entry to its request: de-duplicated tokens to the client's ResultStream, node
events into the request's record, a retryable error or a token gap to a re-dispatch, a terminal to
``finish``."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from scheduler.errors import MessageDecodeError
from scheduler.frontend_record import FrontendRecord
from scheduler.messages import (
    RESULTS_STREAM_TYPES,
    Failed,
    Finished,
    Migrated,
    NodeEvent,
    ResultMessage,
    TokenChunk,
    decode,
)
from scheduler.scripting import Batch
from scheduler.states import FrontendState
from splitwise.logging import get_logger

if TYPE_CHECKING:
    from scheduler.frontend import FrontendScheduler

log = get_logger("scheduler.frontend_results")


class ResultsReader:
    def __init__(self, fe: FrontendScheduler) -> None:
        self._fe = fe
        self.last_id = b"0-0"

    async def once(self) -> None:
        fe = self._fe
        client: Any = fe.client
        batch = Batch(client)
        fe.take_records(batch)
        key = fe.keys.results(fe.frontend_id)
        last_id = self.last_id
        batch.add(lambda pipe: pipe.xread({key: last_id}, count=512, block=fe.config.block_ms))
        answer = (await batch.execute())[-1]
        cleanup = Batch(client)
        for _stream, entries in answer or []:
            for entry_id, fields in entries:
                self.last_id = bytes(entry_id)
                for payload in fields.values():
                    await self._on_result(payload, cleanup)
        if len(cleanup):
            await cleanup.execute()

    async def _on_result(self, payload: bytes, batch: Batch) -> None:
        fe = self._fe
        try:
            msg: ResultMessage | NodeEvent = decode(payload, RESULTS_STREAM_TYPES)
        except MessageDecodeError as exc:
            if payload.isdigit():  # the stream's creation marker
                return
            await fe.dead_letter("results:" + fe.frontend_id, str(exc), payload)
            return
        fl = fe.inflight.get(msg.req_id)
        if fl is None or msg.attempt != fl.attempt:
            fe.stats.inc("stale_results")  # finished/cancelled already, or from an abandoned attempt
            return
        if isinstance(msg, NodeEvent):
            fl.note(msg.ts_ms, msg.event, msg.node, msg.detail)
        elif isinstance(msg, Migrated):
            self._migrated(fl, msg)
        elif isinstance(msg, TokenChunk) and msg.index > len(fl.delivered):
            # Tokens went missing (a failover lost writes): resume from what the client has.
            fe.stats.inc("token_gaps")
            log.error("token_gap", req_id=msg.req_id, expected_index=len(fl.delivered), got_index=msg.index)
            await fe.redispatch(fl, reason=f"token gap at {len(fl.delivered)}")
        elif isinstance(msg, TokenChunk):
            self._deliver_tokens(fl, msg)
        elif isinstance(msg, Finished) and msg.completion_tokens > len(fl.delivered):
            # The last tokens went missing (a failover lost them) but the terminal came: never a
            # success with a gap, resume from what the client has.
            fe.stats.inc("token_gaps")
            log.error(
                "token_gap_at_end",
                req_id=msg.req_id,
                delivered=len(fl.delivered),
                total=msg.completion_tokens,
            )
            await fe.redispatch(
                fl, reason=f"token gap at {len(fl.delivered)} (finished at {msg.completion_tokens})"
            )
        elif isinstance(msg, Failed) and msg.retryable:
            await fe.redispatch(fl, reason=f"node error {msg.code}: {msg.message}")
        else:
            await fe.finish(fl, msg, notify_nodes=None, batch=batch)

    def _migrated(self, fl: FrontendRecord, msg: Migrated) -> None:
        """A live migration moved this attempt: from now on its node is ``msg.decode_node_id`` (the
        monitor watches that lease, cancels go there). The source released the bookings; the work
        item is no longer queued anywhere. Tokens go on with the same attempt and index."""
        if fl.assignment is None:
            return
        fl.assignment = dataclasses.replace(
            fl.assignment,
            decode_node_id=msg.decode_node_id,
            decode_incarnation=msg.decode_incarnation,
            bookings=[],
        )
        fl.entry_id = None
        self._fe.stats.inc("migrations_seen")
        fl.note(
            self._fe._clock.time_ms(),
            "migrated",
            self._fe.frontend_id,
            f"from={msg.from_node_id} to={msg.decode_node_id} reason={msg.reason} at_token={len(fl.delivered)}",
        )

    def _deliver_tokens(self, fl: FrontendRecord, chunk: TokenChunk) -> None:
        """Forward only tokens the client has not seen (a re-dispatched node resumes, never repeats)."""
        if fl.state is FrontendState.QUEUED:
            fl.move(FrontendState.RUNNING, self._fe.stats, why="first token")
        skip = len(fl.delivered) - chunk.index  # >= 0: gaps were re-dispatched by the caller
        new_ids = chunk.token_ids[skip:]
        if not new_ids:
            self._fe.stats.inc("duplicate_tokens")
            return
        logprobs = chunk.logprobs[skip:] if chunk.logprobs is not None else None
        fl.stream.put(
            TokenChunk(
                req_id=chunk.req_id,
                attempt=chunk.attempt,
                index=len(fl.delivered),
                token_ids=new_ids,
                logprobs=logprobs,
                top_token_ids=chunk.top_token_ids[skip:] if chunk.top_token_ids is not None else None,
                top_logprobs=chunk.top_logprobs[skip:] if chunk.top_logprobs is not None else None,
                prompt_logprobs=chunk.prompt_logprobs if skip == 0 else None,
                prompt_top_token_ids=chunk.prompt_top_token_ids if skip == 0 else None,
                prompt_top_logprobs=chunk.prompt_top_logprobs if skip == 0 else None,
            )
        )
        fl.delivered.extend(new_ids)
