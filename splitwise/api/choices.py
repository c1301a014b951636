"""The choices of one HTTP request: ``n`` per prompt, one or more prompts (``/v1/completions``
batches), each its own engine request, streamed as one sequence of ``ChoiceEvent``s.

    choice index = prompt index * n + j          engine req_id = "<req_id>-<index>" (alone: "<req_id>")

Prefix sharing: the first choice of each prompt is submitted at once and its siblings only after
it produced its first token, so the prompt's KV blocks are in the prefix cache by then and the
siblings (on the same node) reuse them instead of prefilling the prompt again.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

from splitwise.api.errors import ApiError
from splitwise.api.serving import Delta, Generation, ServingContext
from splitwise.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class ChoiceSpec:
    index: int
    group: int  # prompt index: choices of one group share a prompt
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class ChoiceEvent:
    index: int
    delta: Delta | None  # None: this choice finished (its Generation's finish_reason is set)


def expand(prompts: list[list[int]], params: list[SamplingParams], n: int) -> list[ChoiceSpec]:
    """n choices per prompt; sibling j gets seed + j so seeded siblings differ (vLLM does the same)."""
    specs = []
    for group, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        for j in range(n):
            seeded = p if p.seed is None or j == 0 else dataclasses.replace(p, seed=p.seed + j)
            specs.append(ChoiceSpec(index=group * n + j, group=group, prompt_token_ids=prompt, params=seeded))
    return specs


class ChoiceSet:
    """Owns the Generations of one HTTP request. ``start`` submits the first choice of each prompt
    (submission errors raise there, so they get their HTTP status); ``events`` drives them all."""

    def __init__(self, ctx: ServingContext, req_id: str, specs: list[ChoiceSpec]) -> None:
        self.ctx = ctx
        self.req_id = req_id
        self.specs = specs
        self.generations: dict[int, Generation] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._leads = {spec.group: spec.index for spec in reversed(specs)}
        self._lead_ready = {group: asyncio.Event() for group in self._leads}

    def _req_id(self, spec: ChoiceSpec) -> str:
        return self.req_id if len(self.specs) == 1 else f"{self.req_id}-{spec.index}"

    async def start(self) -> None:
        for spec in self.specs:
            if self._leads[spec.group] == spec.index:
                self.generations[spec.index] = await self.ctx.start(
                    req_id=self._req_id(spec), prompt_token_ids=spec.prompt_token_ids, params=spec.params
                )

    # -- what the endpoints read ----------------------------------------------------------------

    @property
    def finish_reason(self) -> str | None:
        first = self.generations.get(0)
        return first.finish_reason if first is not None else None

    @property
    def num_prompt_tokens(self) -> int:
        """Each prompt counted once, however many choices it has (as vLLM reports usage)."""
        return sum(len(s.prompt_token_ids) for s in self.specs if self._leads[s.group] == s.index)

    @property
    def num_completion_tokens(self) -> int:
        return sum(g.num_completion_tokens for g in self.generations.values())

    # -- driving --------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        """Every choice's deltas, interleaved as they come, then one ``delta=None`` per choice.
        Raises the first ApiError a choice ends with (the others are aborted)."""
        queue: asyncio.Queue[ChoiceEvent | BaseException] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._drive(spec, queue)) for spec in self.specs]
        remaining = len(self.specs)
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    await self.abort()  # the siblings too: nobody will read them
                    raise item
                if item.delta is None:
                    remaining -= 1
                yield item
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _drive(self, spec: ChoiceSpec, queue: asyncio.Queue[ChoiceEvent | BaseException]) -> None:
        is_lead = self._leads[spec.group] == spec.index
        try:
            if not is_lead:
                await self._lead_ready[spec.group].wait()
                self.generations[spec.index] = await self.ctx.start(
                    req_id=self._req_id(spec), prompt_token_ids=spec.prompt_token_ids, params=spec.params
                )
            generation = self.generations[spec.index]
            async for delta in generation.deltas():
                if is_lead:
                    self._lead_ready[spec.group].set()
                queue.put_nowait(ChoiceEvent(spec.index, delta))
            if is_lead:
                self._lead_ready[spec.group].set()
            queue.put_nowait(ChoiceEvent(spec.index, None))
        except ApiError as exc:
            queue.put_nowait(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: the events() caller's boundary reports it
            queue.put_nowait(exc)

    async def abort(self) -> None:
        """The client is gone (or a sibling failed): stop every choice on every node."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(g.abort() for g in self.generations.values()), return_exceptions=True)
