"""The planner (#16): watches queue, KV and latency signals in Redis and moves capacity between
prefill and decode (role switches; with `splitwise up`, also starting and stopping instances).

    policy.py   signals snapshot + clock -> one decision with its reason (pure)
    latency.py  rolling TTFT / ITL p90 of one node, reported in its LoadReport
    signals.py  the snapshot read from Redis (node records, load reports, booked load)
    record.py   the decision stream and status hash in Redis (docs/redis-keys.md), read by inspect
    loop.py     read -> decide -> act -> record, once per interval
"""

from __future__ import annotations

from splitwise.errors import SplitwiseError


class PlannerError(SplitwiseError):
    """Root of the planner's errors."""
