"""The node agent's own lifecycle steps besides start/close (a mixin of ``NodeAgent``, kept apart
for size): deregister while staying connected (an instance whose engine is lost), and the drain /
role-switch status (out of dispatch at once, and on every beat after; scheduler.node_commands).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from scheduler import scripts
from scheduler.config import SchedulerConfig
from scheduler.heartbeat import Heartbeater
from scheduler.keys import KeySchema
from scheduler.messages import NodeInfo
from scheduler.node_commands import NodeCommands, NodeStatus, apply_status, booked_prompt_tokens
from splitwise.logging import get_logger

log = get_logger("scheduler.node")


class NodeLifecycle:
    config: SchedulerConfig
    keys: KeySchema
    commands: NodeCommands
    _client: aioredis.Redis | None
    _info: NodeInfo | None
    _member: str
    _closed: bool
    _deregistered: bool
    _heartbeater: Heartbeater | None

    if TYPE_CHECKING:

        @property
        def node_id(self) -> str: ...
        def _candidates_key(self) -> str: ...

    async def deregister(self) -> None:
        """End the lease and leave the candidate sets now, but stay connected: no frontend dispatches
        here again, and this node can still publish the results of what it holds (an instance whose
        engine is lost deregisters, then fails its requests as retryable). Raises SchedulerError."""
        if self._closed or self._deregistered or self._client is None:
            return
        self._deregistered = True
        if self._heartbeater is not None:
            await self._heartbeater.stop()  # a beat would re-announce the lease
        await self._deregister_script()
        log.info("node_deregistered", node_id=self.node_id)

    async def _deregister_script(self) -> None:
        assert self._client is not None and self._info is not None
        await scripts.DEREGISTER.call(
            self._client,
            [self.keys.nodes, self.keys.alive, self._candidates_key(), self.keys.heartbeat(self.node_id)],
            [self.node_id, self._member, self._info.incarnation],
        )

    async def set_status(self, status: NodeStatus) -> None:
        """Draining or switching: out of the candidate set now (and every beat after); inspect shows it."""
        self.commands.status = status
        if self._client is not None and not status.is_candidate:
            await apply_status(
                self._client,
                self.keys,
                self.node_id,
                self._candidates_key(),
                self._member,
                self.config.ttl_ms,
            )

    async def booked_prompt_tokens(self) -> int:
        """Prompt tokens still booked on this incarnation (a draining prefill node waits for 0)."""
        return (
            0 if self._client is None else await booked_prompt_tokens(self._client, self.keys, self._member)
        )
