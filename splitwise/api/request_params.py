"""From an OpenAI/vLLM request body to what ``SamplingParams`` needs, with every refusal a 400 that
names the field.

    unsupported fields -> 400 | unknown fields -> one warning per name | structured output spec
    (response_format / guided_* / structured_outputs, at most one) compiled once here, so a schema
    that does not compile is a 400 before anything is queued | logit_bias keys checked
"""

from __future__ import annotations

import json
import threading
from typing import Any

from splitwise.api.errors import BadRequestError
from splitwise.api.protocol import SamplingRequest
from splitwise.engine.errors import InvalidRequestError
from splitwise.engine.guided import GrammarCompiler
from splitwise.engine.tokenizer import Tokenizer
from splitwise.logging import get_logger

log = get_logger("splitwise.api")

# Fields vLLM or OpenAI define that splitwise cannot honour: a 400 when given a non-default value.
UNSUPPORTED_FIELDS: dict[str, Any] = {
    "use_beam_search": False,
    "length_penalty": 1.0,
    "bad_words": [],
    "truncate_prompt_tokens": None,
    "prompt_logprobs": None,
    "functions": None,
    "function_call": None,
    "audio": None,
    "modalities": None,
    "prediction": None,
    "spaces_between_special_tokens": True,
    "skip_special_tokens": True,
    "suffix": None,
    "guided_whitespace_pattern": None,
    "logits_processors": None,
}
# Known fields that change nothing here (vLLM accepts them too): silently fine.
_ACCEPTED_EXTRAS = frozenset(
    {
        "guided_decoding_backend",
        "priority",
        "request_id",
        "cache_salt",
        "kv_transfer_params",
        "metadata",
        "store",
        "service_tier",
        "reasoning_effort",
        "vllm_xargs",
        "return_tokens_as_token_ids",
    }
)
_warned: set[str] = set()
_warned_lock = threading.Lock()


def check_fields(body: SamplingRequest) -> None:
    """400 for unsupported values; one warning log per unknown field name (per process)."""
    given = {**(body.model_extra or {}), **{k: getattr(body, k) for k in body.model_fields_set}}
    for name, default in UNSUPPORTED_FIELDS.items():
        if name in given and given[name] != default and given[name] is not None:
            raise BadRequestError(f"{name} is not supported by this server", param=name)
    if body.best_of is not None and body.best_of != body.n:
        raise BadRequestError(
            f"best_of ({body.best_of}) other than n ({body.n}) is not supported", param="best_of"
        )
    if body.stream_options is not None and not body.stream:
        raise BadRequestError("stream_options is only allowed when stream is true", param="stream_options")
    for name in sorted((body.model_extra or {}).keys() - UNSUPPORTED_FIELDS.keys() - _ACCEPTED_EXTRAS):
        with _warned_lock:
            first = name not in _warned
            _warned.add(name)
        if first:
            log.warning("request field ignored (not a field this server knows)", field=name)


def structured_spec(body: SamplingRequest) -> tuple[str, str, str] | None:
    """``(kind, spec, param)`` of the request's one structured-output constraint, or None."""
    found: list[tuple[str, str, str]] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("json_object", "", "response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise BadRequestError(
                "response_format json_schema needs json_schema.schema", param="response_format.json_schema"
            )
        found.append(("json", json.dumps(fmt.json_schema.json_schema), "response_format.json_schema.schema"))
    elif fmt is not None and fmt.type == "structural_tag":
        raise BadRequestError("response_format structural_tag is not supported", param="response_format")
    if body.guided_json is not None:
        found.append(("json", _schema_text(body.guided_json, "guided_json"), "guided_json"))
    if body.guided_regex is not None:
        found.append(("regex", body.guided_regex, "guided_regex"))
    if body.guided_choice is not None:
        found.append(("choice", json.dumps(body.guided_choice), "guided_choice"))
    if body.guided_grammar is not None:
        found.append(("grammar", body.guided_grammar, "guided_grammar"))
    so = body.structured_outputs
    if so is not None:
        if so.json_ is not None:
            found.append(
                ("json", _schema_text(so.json_, "structured_outputs.json"), "structured_outputs.json")
            )
        if so.regex is not None:
            found.append(("regex", so.regex, "structured_outputs.regex"))
        if so.choice is not None:
            found.append(("choice", json.dumps(so.choice), "structured_outputs.choice"))
        if so.grammar is not None:
            found.append(("grammar", so.grammar, "structured_outputs.grammar"))
        if so.json_object:
            found.append(("json_object", "", "structured_outputs.json_object"))
    if len(found) > 1:
        names = ", ".join(param for _, _, param in found)
        raise BadRequestError(
            f"only one structured output constraint per request, got {names}", param=found[1][2]
        )
    return found[0] if found else None


def _schema_text(schema: dict[str, Any] | str, param: str) -> str:
    if isinstance(schema, str):
        try:
            json.loads(schema)
        except ValueError as exc:
            raise BadRequestError(f"{param} is not valid JSON: {exc}", param=param) from None
        return schema
    return json.dumps(schema)


def logit_bias_pairs(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    pairs = []
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise BadRequestError(f"logit_bias key {key!r} is not a token id", param="logit_bias") from None
        if not 0 <= token_id < vocab_size:
            raise BadRequestError(
                f"logit_bias token id {token_id} is outside the vocabulary (0..{vocab_size - 1})",
                param="logit_bias",
            )
        if not -100 <= value <= 100:
            raise BadRequestError(
                f"logit_bias values must be in [-100, 100], got {value}", param="logit_bias"
            )
        pairs.append((token_id, float(value)))
    return tuple(pairs)


class GrammarCheck:
    """Compiles structured-output specs in the API process so a bad one is a 400 naming the field
    (the engine compiles again on the node, from its own cache). Built on first use."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    def check(self, kind: str, spec: str, param: str) -> None:
        with self._lock:
            if self._compiler is None:
                t = self._tokenizer
                self._compiler = GrammarCompiler(t, t.vocab_size, t.eos_token_ids)
            compiler = self._compiler
        try:
            compiler.compile(kind, spec)
        except InvalidRequestError as exc:
            raise BadRequestError(f"{param}: {exc}", param=param) from None
