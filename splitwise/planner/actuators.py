"""How the planner's decisions are carried out.

- ``RoleSwitcher`` (`splitwise planner`): role switches only, through the role command's
  ``request_role_change`` (the node drains, flips its role and re-registers in the same process).
- ``ClusterActuator`` (`splitwise up --planner`): role switches too, and it starts and stops
  instances of its ``LocalCluster`` (within the policy's --min/--max bounds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis

from scheduler.keys import KeySchema
from splitwise.codes import Role
from splitwise.planner import PlannerError

if TYPE_CHECKING:
    from splitwise.cluster import LocalCluster


class RoleSwitcher:
    def __init__(self, client: redis.Redis, keys: KeySchema, *, grace_s: float) -> None:
        self.client, self.keys, self.grace_s = client, keys, grace_s

    def switch(self, node_id: str, role: Role, *, reason: str) -> None:
        from splitwise.commands.role import request_role_change

        request_role_change(self.client, self.keys, node_id, role, reason=reason, grace_s=self.grace_s)

    def add(self, role: Role, *, reason: str) -> str:
        raise PlannerError("starting instances needs `splitwise up --planner`")

    def remove(self, node_id: str, *, reason: str) -> None:
        raise PlannerError("stopping instances needs `splitwise up --planner`")


class ClusterActuator(RoleSwitcher):
    def __init__(
        self, client: redis.Redis, keys: KeySchema, cluster: LocalCluster, *, grace_s: float
    ) -> None:
        super().__init__(client, keys, grace_s=grace_s)
        self.cluster = cluster

    def switch(self, node_id: str, role: Role, *, reason: str) -> None:
        super().switch(node_id, role, reason=reason)
        self.cluster.set_role(node_id, role.value)

    def add(self, role: Role, *, reason: str) -> str:
        return self.cluster.add_instance(role.value).name

    def remove(self, node_id: str, *, reason: str) -> None:
        self.cluster.retire_instance(node_id)
