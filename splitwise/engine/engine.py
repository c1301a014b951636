"""LLMEngine: the step loop that ties scheduler, model runner, sampler and text together.

One step reads as a sentence::

    schedule -> run the model -> sample -> postprocess (advance, stop) -> text -> outputs

The engine is single-threaded: exactly one thread (the instance's engine loop) calls its
methods. It raises ``EngineError`` subclasses for bad input; a request the engine cannot serve
(e.g. larger than the whole KV pool) ends with an output whose ``error`` is set.

Disaggregation API (public, used by splitwise/instance):

- prefill side: ``add_request(..., prefill_only=True)`` runs only the prefill; the request's last
  output has ``finish_reason=PREFILL_DONE``, the first token, its logprob and ``block_ids``; the
  blocks stay held until ``release_prefill(req_id)`` (after the transfer is acknowledged).
  ``set_layer_callback(cb)``: ``cb(layer, chunks, ready)`` fires once a layer's KV of a batch is issued; ``ready``
  (engine.layer_ready) completes when those writes ran (CUDA event; CPU: already complete).
- decode side: ``reserve(req_id, num_tokens)`` returns block ids for a transport to fill;
  ``release_reservation(req_id)`` gives them back; ``add_prefilled_request(...)`` admits the request
  with its first token once every layer has landed, and decoding continues from there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from splitwise.engine.block_manager import BlockManager
from splitwise.engine.config import EngineConfig, ModelConfig
from splitwise.engine.errors import InvalidRequestError, UnknownRequestError
from splitwise.engine.guided import GrammarCompiler, GrammarMatcher, bitmask_to_bool
from splitwise.engine.kv_cache import KVCache
from splitwise.engine.logits_processing import RowHistory, TokenHistory
from splitwise.engine.model_runner import LayerCallback, ModelRunner, ScheduledChunk, build_kv_cache
from splitwise.engine.outputs import GenerationResult, RequestOutput
from splitwise.engine.prompt_logprobs import PromptLogprob, PromptLogprobs, wants_prompt_logprobs
from splitwise.engine.sampler import Sampler
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.scheduler import Scheduler, SchedulerOutput
from splitwise.engine.sequence import FinishReason, Sequence
from splitwise.engine.stop_checker import StopChecker
from splitwise.engine.text_stream import TextDelta, TextStream
from splitwise.engine.tokenizer import Tokenizer
from splitwise.logging import get_logger

log = get_logger(__name__)


@dataclass
class EngineStats:
    """Monotonic counters, read by the metrics exporter."""

    num_steps: int = 0
    num_prompt_tokens: int = 0  # prompt tokens of admitted requests
    num_cached_prompt_tokens: int = 0  # of which served by the prefix cache
    num_computed_tokens: int = 0  # tokens run through the model
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_finished: int = 0
    num_failed: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig, *, kv_cache: KVCache | None = None) -> None:
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        self.max_model_len = _resolve_max_model_len(config, self.model_config)
        self.tokenizer = Tokenizer.from_dir(config.model)
        self.runner: ModelRunner
        if config.tensor_parallel_size > 1:  # #14: ranks in their own processes (engine.parallel)
            from splitwise.engine.parallel.runner import TPModelRunner

            if kv_cache is not None:
                raise ValueError("--tensor-parallel-size > 1: the engine allocates its own KV buffer")
            self.runner = TPModelRunner(self.model_config, config)
            self.kv_cache = self.runner.kv_cache
        else:
            self.kv_cache = kv_cache if kv_cache is not None else build_kv_cache(self.model_config, config)
            self.runner = ModelRunner(self.model_config, config, self.kv_cache)
        self.block_manager = BlockManager(
            self.kv_cache.geometry.num_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        eos = set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids)
        self.stop_checker = StopChecker(eos_token_ids=eos, max_model_len=self.max_model_len)
        self.scheduler = Scheduler(
            self.block_manager,
            self.stop_checker,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
        )
        self.sampler = Sampler(seed=config.seed, stop_token_ids=frozenset(eos))
        self._grammar_compiler: GrammarCompiler | None = None  # built on the first constrained request
        self._matchers: dict[str, GrammarMatcher] = {}
        self._histories: dict[str, TokenHistory] = {}  # requests with penalties / min_tokens
        self._prompt_logprobs = PromptLogprobs()
        self._tops: dict[str, list[tuple[int, float]]] = {}  # this step's top logprobs per request
        self.stats = EngineStats()
        self._layer_callback: LayerCallback | None = None
        self._texts: dict[str, TextStream] = {}
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (aborts)
        log.info(
            "engine ready",
            model=config.model,
            family=self.model_config.family,
            dtype=config.dtype,
            device=config.device,
            num_kv_blocks=self.kv_cache.geometry.num_blocks,
            block_size=config.block_size,
            max_model_len=self.max_model_len,
        )

    # -- requests -----------------------------------------------------------------------------

    def add_request(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams, *, prefill_only: bool = False
    ) -> None:
        """Queue a request. Raises InvalidRequestError for bad input (nothing is queued then)."""
        self.validate_prompt(prompt_token_ids, req_id=req_id)
        seq = Sequence(
            req_id=req_id, prompt_token_ids=list(prompt_token_ids), params=params, prefill_only=prefill_only
        )
        matcher = self._new_matcher(params, req_id=req_id)
        self.scheduler.add(seq)
        if matcher is not None:
            self._matchers[req_id] = matcher
        if self._wants_text(params):
            self._texts[req_id] = TextStream(self.tokenizer, seq.prompt_token_ids, params)
        self.stats.num_prompt_tokens += seq.num_prompt_tokens

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        if self._grammar_compiler is None:
            self._grammar_compiler = GrammarCompiler(
                self.tokenizer, self.model_config.vocab_size, sorted(self.stop_checker.eos_token_ids)
            )
        return self._grammar_compiler

    def _new_matcher(
        self, params: SamplingParams, *, req_id: str, accepted: list[int] | None = None
    ) -> GrammarMatcher | None:
        if not params.structured_kind:
            return None
        try:
            return self.grammar_compiler.matcher(
                params.structured_kind, params.structured_spec, accepted=accepted or ()
            )
        except InvalidRequestError as exc:
            raise InvalidRequestError(str(exc), req_id=req_id) from None

    def _wants_text(self, params: SamplingParams) -> bool:
        return self.config.detokenize or bool(params.stop)

    def validate_prompt(self, prompt_token_ids: list[int], *, req_id: str | None = None) -> None:
        if not prompt_token_ids:
            raise InvalidRequestError("prompt is empty", req_id=req_id)
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(prompt_token_ids)} tokens; this model's context is {self.max_model_len} tokens "
                f"(max_model_len), which leaves no room to generate",
                req_id=req_id,
            )
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})", req_id=req_id
            )

    def abort(self, req_id: str) -> None:
        """Cancel a request at any stage (queued, prefilling, decoding, held for transfer, or a
        bare reservation). Frees its blocks. The request's final output (ABORT) comes from the
        next ``step()``. Unknown ids raise UnknownRequestError."""
        if self.block_manager.has_reservation(req_id) and self.scheduler.get(req_id) is None:
            self.block_manager.release(req_id)
            return
        seq = self.scheduler.abort(req_id)
        self._texts.pop(req_id, None)
        self._forget(req_id)
        self._pending.append(_final(seq, FinishReason.ABORT))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def num_queued_prefill_tokens(self) -> int:
        return self.scheduler.num_queued_prefill_tokens

    def set_layer_callback(self, callback: LayerCallback | None) -> None:
        self._layer_callback = callback

    # -- disaggregation -----------------------------------------------------------------------

    def release_prefill(self, req_id: str) -> None:
        """Free the blocks of a PREFILL_DONE request (its KV transfer was acknowledged)."""
        self.scheduler.release_prefilled(req_id)

    def can_reserve(self, num_tokens: int) -> bool:
        return self.block_manager.can_reserve(num_tokens)

    def reserve(self, req_id: str, num_tokens: int) -> list[int]:
        """Reserve blocks for ``num_tokens`` of incoming KV. Raises OutOfBlocksError when full."""
        return self.block_manager.reserve(req_id, num_tokens)

    def reserve_reusing(
        self, req_id: str, prompt_token_ids: list[int], num_tokens: int
    ) -> tuple[list[int], int]:
        """``reserve``, starting with the cached blocks of the prompt's prefix (decode-side reuse):
        returns (block ids, how many leading ones are cached and need no KV from outside)."""
        prefix = self.block_manager.cached_prefix(prompt_token_ids)
        return self.block_manager.reserve(req_id, num_tokens, prefix), prefix.num_blocks

    def release_reservation(self, req_id: str) -> None:
        self.block_manager.release(req_id)

    def add_prefilled_request(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        first_token_id: int,
        first_logprob: float,
        first_top_logprobs: list[tuple[int, float]] | None = None,
        prompt_logprobs: list[PromptLogprob] | None = None,
        reservation_id: str | None = None,
    ) -> RequestOutput:
        """Admit a request whose prompt KV was written into its reservation from outside (made
        under ``reservation_id``, default ``req_id``: D reserves per hand-off attempt).

        Returns the output for the first token (it may already be the last: eos, max_tokens=1,
        a stop string; then the reservation is released at once). A structured-output request's
        grammar matcher is re-created here and advanced by the first token.
        """
        self.validate_prompt(prompt_token_ids, req_id=req_id)
        matcher = self._new_matcher(params, req_id=req_id, accepted=[first_token_id])
        tops = [list(first_top_logprobs or [])]
        reservation_id = req_id if reservation_id is None else reservation_id
        if not self.block_manager.has_reservation(reservation_id):
            raise UnknownRequestError(f"no KV reservation {reservation_id!r}", req_id=req_id)
        seq = Sequence(req_id=req_id, prompt_token_ids=list(prompt_token_ids), params=params)
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.output_token_ids.append(first_token_id)
        seq.output_logprobs.append(first_logprob)
        text = TextStream(self.tokenizer, seq.prompt_token_ids, params) if self._wants_text(params) else None
        delta = text.push(first_token_id, self.stop_checker) if text is not None else TextDelta("")
        reason = FinishReason.STOP if delta.stop is not None else self.stop_checker.check_token(seq)
        self.stats.num_prompt_tokens += seq.num_prompt_tokens
        self.stats.num_generated_tokens += 1
        if reason is not None:
            self.block_manager.release(reservation_id)
            seq.finish_reason = reason
            seq.stop_text = delta.stop
            tail = "" if delta.stop is not None or text is None else text.finish()
            self.stats.num_finished += 1
            return _output(
                seq, [first_token_id], [first_logprob], delta.text + tail, reason, tops, prompt_logprobs
            )
        self.scheduler.add_prefilled(seq, reservation_id)
        if text is not None:
            self._texts[req_id] = text
        if matcher is not None:
            self._matchers[req_id] = matcher
        return _output(seq, [first_token_id], [first_logprob], delta.text, None, tops, prompt_logprobs)

    # -- the step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns every request's delta (and every request that ended)."""
        outputs, self._pending = self._pending, []
        scheduled = self.scheduler.schedule()
        outputs.extend(self._report_failed(scheduled))
        self.stats.num_preemptions += len(scheduled.preempted)
        if scheduled.is_empty:
            return outputs
        self.stats.num_steps += 1
        self.stats.num_computed_tokens += scheduled.num_batched_tokens
        for chunk in scheduled.chunks:
            if chunk.seq.num_computed_tokens == chunk.seq.num_cached_tokens and chunk.seq.num_cached_tokens:
                self.stats.num_cached_prompt_tokens += chunk.seq.num_cached_tokens
        logits = self._run_model(scheduled)
        sampled = self._sample(scheduled, logits)
        result = self.scheduler.postprocess(scheduled, sampled)
        finished = {seq.req_id for seq in result.finished}
        for seq in result.sampled:
            outputs.append(self._emit(seq, seq.req_id in finished))
        return outputs

    def _run_model(self, scheduled: SchedulerOutput) -> torch.Tensor:
        """Last-token logits of each chunk; every token's when a chunk needs prompt logprobs."""
        if not any(wants_prompt_logprobs(chunk) for chunk in scheduled.chunks):
            return self.runner.execute(scheduled.chunks, self._layer_callback)
        all_logits = self.runner.forward(
            scheduled.chunks, layer_callback=self._layer_callback, all_tokens=True
        )
        self._prompt_logprobs.collect(scheduled.chunks, all_logits)
        counts = torch.tensor([chunk.num_new_tokens for chunk in scheduled.chunks], dtype=torch.int64)
        return all_logits[(torch.cumsum(counts, 0) - 1).to(all_logits.device)]

    def _sample(self, scheduled: SchedulerOutput, logits: torch.Tensor) -> dict[str, tuple[int, float]]:
        rows = [i for i, chunk in enumerate(scheduled.chunks) if _reaches_end(chunk)]
        if not rows:
            return {}
        seqs = [scheduled.chunks[i].seq for i in rows]
        params = [s.params for s in seqs]
        needs_history = any(p.has_penalties or p.min_tokens for p in params)
        histories = (
            [RowHistory(s.prompt_token_ids, s.output_token_ids) for s in seqs] if needs_history else None
        )
        out = self.sampler.sample(
            logits[torch.tensor(rows, device=logits.device)],
            params,
            [s.num_output_tokens for s in seqs],
            histories=histories,
            allowed=self._grammar_mask(seqs, logits.shape[-1], logits.device),
        )
        self.stats.num_generated_tokens += len(seqs)
        for seq, token_id, top in zip(seqs, out.token_ids, out.top_logprobs, strict=True):
            matcher = self._matchers.get(seq.req_id)
            if matcher is not None and not matcher.accept(token_id):
                log.warning("grammar rejected a sampled token", req_id=seq.req_id, token_id=token_id)
            if top:
                self._tops[seq.req_id] = top
        return {s.req_id: (t, lp) for s, t, lp in zip(seqs, out.token_ids, out.logprobs, strict=False)}

    def _history(self, seq: Sequence) -> RowHistory:
        history = self._histories.get(seq.req_id)
        if history is None:
            history = self._histories[seq.req_id] = TokenHistory(seq.prompt_token_ids)
        return history.sync(seq.output_token_ids)

    def _forget(self, req_id: str) -> None:
        """Drop the per-request sampling state (grammar matcher, token history)."""
        self._matchers.pop(req_id, None)
        self._histories.pop(req_id, None)
        self._tops.pop(req_id, None)
        self._prompt_logprobs.forget(req_id)

    def _grammar_mask(
        self, seqs: list[Sequence], vocab_size: int, device: torch.device
    ) -> torch.Tensor | None:
        """Bool [rows, vocab] of what each row's grammar allows (all True for rows without one)."""
        guided = [(i, self._matchers[s.req_id]) for i, s in enumerate(seqs) if s.req_id in self._matchers]
        if not guided:
            return None
        bitmask = self.grammar_compiler.allocate_bitmask(len(seqs))  # all bits set: everything allowed
        for row, matcher in guided:
            matcher.fill_mask(bitmask, row)
        allowed = bitmask_to_bool(bitmask, self.grammar_compiler.vocab_size)
        if vocab_size > allowed.shape[1]:  # logits padded past the tokenizer's vocabulary
            pad = torch.zeros(len(seqs), vocab_size - allowed.shape[1], dtype=torch.bool)
            allowed = torch.cat([allowed, pad], dim=1)
        return allowed[:, :vocab_size].to(device)

    def _emit(self, seq: Sequence, finished: bool) -> RequestOutput:
        token_id, logprob = seq.output_token_ids[-1], seq.output_logprobs[-1]
        tops = [self._tops.pop(seq.req_id, [])]
        prompt_lps = self._prompt_logprobs.take(seq.req_id) if seq.num_output_tokens == 1 else None
        text = self._texts.get(seq.req_id)
        delta = text.push(token_id, self.stop_checker) if text is not None else TextDelta("")
        if delta.stop is not None and not finished:
            self.scheduler.finish(seq.req_id, FinishReason.STOP, stop_text=delta.stop)
            finished = True
        if not finished:
            return _output(seq, [token_id], [logprob], delta.text, None, tops, prompt_lps)
        reason = seq.finish_reason
        assert reason is not None
        new_text = delta.text if delta.stop is not None or text is None else delta.text + text.finish()
        self._texts.pop(seq.req_id, None)  # (PREFILL_DONE: the decode node detokenizes from here on)
        self._forget(seq.req_id)
        self.stats.num_finished += 1
        return _output(seq, [token_id], [logprob], new_text, reason, tops, prompt_lps)

    def _report_failed(self, scheduled: SchedulerOutput) -> list[RequestOutput]:
        failed = []
        for seq in scheduled.failed:
            self._texts.pop(seq.req_id, None)
            self._forget(seq.req_id)
            self.stats.num_failed += 1
            need = self.block_manager.num_blocks_for(seq.num_tokens)
            error = (
                f"request needs {need} KV blocks but the whole cache has {self.block_manager.num_blocks}; "
                f"raise --num-kv-blocks / KV cache memory or shorten the request"
            )
            log.warning("request cannot fit the KV cache", req_id=seq.req_id, blocks_needed=need)
            failed.append(_final(seq, FinishReason.ABORT, error=error))
        return failed

    # -- offline convenience ------------------------------------------------------------------

    def generate(
        self, prompts: Iterable[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[GenerationResult]:
        """Run prompts (token ids) to completion; results in input order."""
        prompt_list = list(prompts)
        param_list = params if isinstance(params, list) else [params] * len(prompt_list)
        if len(param_list) != len(prompt_list):
            raise InvalidRequestError(f"{len(prompt_list)} prompts but {len(param_list)} sampling params")
        ids = [f"offline-{id(self)}-{i}" for i in range(len(prompt_list))]
        for req_id, prompt, p in zip(ids, prompt_list, param_list, strict=False):
            self.add_request(req_id, prompt, p)
        acc: dict[str, dict[str, list[Any]]] = {i: {"tokens": [], "logprobs": [], "text": []} for i in ids}
        done: dict[str, RequestOutput] = {}
        cached: dict[str, int] = {}
        while len(done) < len(ids):
            for out in self.step():
                bucket = acc[out.req_id]
                bucket["tokens"] += out.new_token_ids
                bucket["logprobs"] += out.new_logprobs
                bucket["text"].append(out.new_text)
                cached[out.req_id] = max(cached.get(out.req_id, 0), out.num_cached_tokens)
                if out.finished:
                    done[out.req_id] = out
        return [
            GenerationResult(
                req_id=i,
                prompt_token_ids=prompt,
                token_ids=acc[i]["tokens"],
                logprobs=acc[i]["logprobs"],
                text="".join(acc[i]["text"]),
                finish_reason=done[i].finish_reason or FinishReason.ABORT,
                num_cached_tokens=cached.get(i, 0),
                error=done[i].error,
            )
            for i, prompt in zip(ids, prompt_list, strict=False)
        ]

    def close(self) -> None:
        closer = getattr(self.runner, "close", None)  # the TP runner stops its ranks, frees the buffer
        if closer is not None:
            closer()
            return
        self.kv_cache.close()


def _resolve_max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    limit = model_config.max_position_embeddings
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ValueError(
            f"--max-model-len: {config.max_model_len} exceeds the model's max_position_embeddings ({limit})"
        )
    return config.max_model_len


def _reaches_end(chunk: ScheduledChunk) -> bool:
    return chunk.seq.num_computed_tokens + chunk.num_new_tokens == chunk.seq.num_tokens


def _output(
    seq: Sequence,
    token_ids: list[int],
    logprobs: list[float],
    text: str,
    reason: FinishReason | None,
    top_logprobs: list[list[tuple[int, float]]] | None = None,
    prompt_logprobs: list[PromptLogprob] | None = None,
) -> RequestOutput:
    return RequestOutput(
        prompt_logprobs=prompt_logprobs,
        req_id=seq.req_id,
        new_token_ids=token_ids,
        new_logprobs=logprobs,
        new_top_logprobs=top_logprobs or [[] for _ in token_ids],
        new_text=text,
        finish_reason=reason,
        num_prompt_tokens=seq.num_prompt_tokens,
        num_output_tokens=seq.num_output_tokens,
        num_cached_tokens=seq.num_cached_tokens,
        stop_text=seq.stop_text,
        block_ids=tuple(seq.block_table) if reason is FinishReason.PREFILL_DONE else (),
    )


def _final(seq: Sequence, reason: FinishReason, *, error: str | None = None) -> RequestOutput:
    return RequestOutput(
        req_id=seq.req_id,
        finish_reason=reason,
        num_prompt_tokens=seq.num_prompt_tokens,
        num_output_tokens=seq.num_output_tokens,
        num_cached_tokens=seq.num_cached_tokens,
        error=error,
    )
