"""Switching a drained instance's role in place: prefill <-> decode <-> mixed.

    stop_role   node runtime -> prefix index -> node agent (deregisters: lease, candidate set,
                description; the prefix index is cleared) -> P/D flow -> control channel -> transports
    flip        InstanceConfig.role (validated again: P/D roles need the splitwise scheduler)
    start_role  transports for the new side (decode: targets, prefill: initiators, mixed: none) ->
                control channel + the new P/D flow -> node agent (a new incarnation, the new role)
                -> node runtime -> prefix index

The engine (its weights, KV cache and worker thread), the scheduler frontend and the HTTP server
are kept: nothing is loaded again (``engine_loads`` stays 1). Called only once the node drained
(splitwise/instance/drain.py), so no request is held by the parts being replaced.

A decode node's KV cache lives in shared memory when it started as a decode node with ipc on CPU;
a node that started as prefill or mixed has no shared-memory cache, so as a decode node it offers
its other protocols (ipc is skipped, logged and counted ``transports_unavailable``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from splitwise.codes import Role
from splitwise.errors import SplitwiseError
from splitwise.logging import get_logger

if TYPE_CHECKING:
    from splitwise.instance.instance import Instance

log = get_logger(__name__)


class RoleSwitchError(SplitwiseError):
    """The new role could not be started (its transports, channel or registration failed)."""


async def switch_role(instance: Instance, role: Role) -> None:
    """Stop the old role's parts and start the new role's; raises RoleSwitchError."""
    old = instance.config.role
    if instance.config.scheduler.scheduler_name == "local":
        raise RoleSwitchError(
            "role switching needs --scheduler-name splitwise (the local scheduler is mixed only)"
        )
    try:
        config = dataclasses.replace(instance.config, role=role.value)
    except ValueError as exc:
        raise RoleSwitchError(str(exc)) from None
    engine_id = id(instance.engine)
    await instance.stop_role()
    instance.config = config
    try:
        await instance.start_role()
    except (SplitwiseError, ValueError, OSError) as exc:
        raise RoleSwitchError(f"starting the {role} role failed: {exc}") from exc
    assert id(instance.engine) == engine_id, "a role switch never replaces the engine"
    log.info(
        "role switched",
        node_id=instance.node_id,
        old_role=old,
        role=role.value,
        engine_id=hex(engine_id),
        pd_comm_port=instance.ports.pd_comm,
        transfer=list(instance.targets or instance.initiators),
    )
