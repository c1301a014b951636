"""The frontend side's request record: one per accepted request, changed only through ``move``."""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.messages import Assignment, SubmitRequest, WorkItem
from scheduler.metrics import Counters
from scheduler.states import FRONTEND_TRANSITIONS, FrontendState, is_live, transition
from scheduler.streams import ResultStream


@dataclass
class FrontendRecord:
    """What the frontend remembers about one accepted request."""

    request: SubmitRequest
    model_id: str
    stream: ResultStream
    created_ms: int
    deadline_ms: int
    state: FrontendState = FrontendState.DISPATCHING
    attempt: int = 0
    assignment: Assignment | None = None
    entry_id: bytes | None = None  # the WorkItem's id in the decode node's work stream
    delivered: list[int] = field(default_factory=list)
    pending_since_ms: int | None = None  # waiting for capacity to re-dispatch
    # (ts_ms, event, node, detail): written to {t}:log when the request ends or is re-dispatched
    events: list[tuple[int, str, str, str]] = field(default_factory=list)

    @property
    def req_id(self) -> str:
        return self.request.req_id

    @property
    def tokens(self) -> list[int]:
        """The prompt and the tokens its client already has (what a re-dispatch prefills)."""
        return [*self.request.prompt_token_ids, *self.delivered]

    def work_item(self, frontend_id: str, assignment: Assignment) -> WorkItem:
        """This attempt's work for the decode (or mixed) node of ``assignment``."""
        return WorkItem(
            req_id=self.req_id,
            prompt_token_ids=list(self.request.prompt_token_ids),
            sampling_params=self.request.sampling_params,
            frontend_id=frontend_id,
            created_ms=self.created_ms,
            deadline_ms=self.deadline_ms,
            attempt=self.attempt,
            resume_token_ids=list(self.delivered),
            assignment=assignment,
        )

    @property
    def is_live(self) -> bool:
        return is_live(self.state)

    @property
    def first_token_seen(self) -> bool:
        """This attempt has produced a token: prefill (and transfer) are done."""
        return self.state is FrontendState.RUNNING

    def move(self, new: FrontendState, stats: Counters, *, why: str) -> bool:
        return transition(self, new, FRONTEND_TRANSITIONS, stats, why=why)

    def note(self, ts_ms: int, event: str, node: str, detail: str = "") -> None:
        self.events.append((ts_ms, event, node, detail))

    def is_received(self) -> bool:
        """The node of the current attempt has read its work item (its ``received`` event came)."""
        for _ts, event, _node, _detail in reversed(self.events):
            if event == "received":
                return True
            if event == "dispatched":
                return False
        return False

    def take_events(self) -> list[tuple[int, str, str, str]]:
        events, self.events = self.events, []
        return events
