"""Text <-> token ids for a local Hugging Face checkpoint, without importing transformers.

Reads the files a HF model directory ships:

| file                    | what we take from it                                              |
|-------------------------|-------------------------------------------------------------------|
| tokenizer.json          | the whole tokenizer (``tokenizers`` library): model, pre/post-processors, decoder |
| tokenizer_config.json   | bos/eos/pad/... token strings, add_bos_token, chat_template         |
| special_tokens_map.json | (legacy) token strings missing from tokenizer_config.json           |
| chat_template.jinja     | the chat template; wins over tokenizer_config's, as in transformers |
| chat_template.json      | (processor-style) the chat template when neither of the above has one |
| generation_config.json  | eos_token_id (int or list): extra ids that end generation           |

Chat templates are rendered exactly the way ``transformers`` does it (same Jinja environment and
variables), because the prompt text decides the tokens and therefore the output.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers.decoders import DecodeStream

from splitwise.engine.errors import InvalidRequestError, ModelLoadError


class TokenizerLoadError(ModelLoadError):
    """tokenizer.json or one of the config files next to it is missing or unreadable."""


class BrokenChatTemplateError(ModelLoadError):
    """The checkpoint's chat template is not valid Jinja (found on first use, so completions still work)."""


class NoChatTemplateError(InvalidRequestError):
    """A chat request for a model that ships no chat template."""


class ChatTemplateError(InvalidRequestError):
    """The chat template rejected the messages (its raise_exception, or a failure while rendering them)."""


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or {} when the file does not exist (all but tokenizer.json are optional)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerLoadError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config writes it: a string, or a serialised AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        content: str | None = value["content"]
        return content
    return None


def _special_tokens(config: dict[str, Any], legacy_map: dict[str, Any]) -> dict[str, str]:
    """Every ``*_token`` entry as a plain string: the named ones plus model-specific ones (HF v5 does the same)."""
    tokens: dict[str, str] = {}
    for source in (legacy_map, config):  # tokenizer_config.json wins over the legacy file
        for key, value in source.items():
            token = _token_str(value)
            if key.endswith("_token") and token is not None:
                tokens[key] = token
    return tokens


def _chat_template_source(model_dir: Path, config: dict[str, Any]) -> str | None:
    """The default chat template text, or None when the checkpoint has none."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = _read_json(model_dir / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerLoadError(
            f"{model_dir}: chat_template must be a string, got {type(template).__name__}"
        )
    return template


def _eos_ids(
    backend: tokenizers.Tokenizer, eos_token: str | None, generation_config: dict[str, Any]
) -> tuple[int, ...]:
    """tokenizer_config's eos first, then generation_config's (Llama-3 and Qwen list several), deduplicated."""
    ids: list[int] = []
    if eos_token is not None and (eos_id := backend.token_to_id(eos_token)) is not None:
        ids.append(eos_id)
    extra = generation_config.get("eos_token_id")
    extra_ids = extra if isinstance(extra, list) else ([] if extra is None else [extra])
    for value in extra_ids:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TokenizerLoadError(
                f"generation_config.json: eos_token_id {extra!r} must be an int or a list of ints"
            )
        if value not in ids:
            ids.append(value)
    return tuple(ids)


class Tokenizer:
    """A checkpoint's tokenizer: encode, decode, eos ids and the chat template. Immutable after load."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str],
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
        name: str = "<memory>",
    ) -> None:
        self._backend = backend
        self._special_tokens = dict(special_tokens)
        self._name = name
        self.bos_token_id = self._id_of("bos_token")
        self.pad_token_id = self._id_of("pad_token")
        self.eos_token_ids = tuple(eos_token_ids)
        # tokenizer.json's post-processor is authoritative when present (HF v5 ignores add_bos_token
        # then); config flags only matter for checkpoints whose tokenizer.json has no post-processor.
        has_post_processor = backend.post_processor is not None
        self._prepend_bos = add_bos_token and not has_post_processor and self.bos_token_id is not None
        eos_id = self._id_of("eos_token")
        self._append_eos_id = eos_id if (add_eos_token and not has_post_processor) else None
        self._chat_template = ChatTemplate(chat_template) if chat_template is not None else None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load from a local HF model directory. Raises TokenizerLoadError naming the missing/bad file."""
        root = Path(model_dir)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerLoadError(
                f"--model: {root} has no tokenizer.json (only fast/`tokenizers` checkpoints are supported)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises plain Exception with its parse error
            raise TokenizerLoadError(f"{tokenizer_file}: cannot load ({exc})") from None
        config = _read_json(root / "tokenizer_config.json")
        special = _special_tokens(config, _read_json(root / "special_tokens_map.json"))
        return cls(
            backend,
            special_tokens=special,
            add_bos_token=bool(config.get("add_bos_token", False)),
            add_eos_token=bool(config.get("add_eos_token", False)),
            eos_token_ids=_eos_ids(
                backend, special.get("eos_token"), _read_json(root / "generation_config.json")
            ),
            chat_template=_chat_template_source(root, config),
            name=str(root),
        )

    def _id_of(self, key: str) -> int | None:
        token = self._special_tokens.get(key)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The ``tokenizers`` object (for ``DecodeStream``, which steps through its decoder)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids decode() knows, added tokens included (HF's ``len(tokenizer)``)."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    @property
    def eos_token_id(self) -> int | None:
        """The primary eos id (tokenizer_config's eos_token), or None."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def special_tokens(self) -> dict[str, str]:
        """``{"bos_token": "<s>", ...}`` as the chat template sees them."""
        return dict(self._special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def vocab(self) -> dict[str, int]:
        """Token string -> id, added tokens included (grammar libraries build their token tables from it)."""
        return dict(self._backend.get_vocab(with_added_tokens=True))

    def backend_json(self) -> str:
        """The tokenizer.json this tokenizer was loaded from (its decoder tells a vocabulary's encoding)."""
        return str(self._backend.to_str())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the checkpoint's bos (and eos) are added like HF."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"prompt must be a string, got {type(text).__name__}")
        ids: list[int] = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos:
            ids.insert(0, self.bos_token_id)  # type: ignore[arg-type]  # checked in __init__
        if add_special_tokens and self._append_eos_id is not None:
            ids.append(self._append_eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Ids past the vocabulary decode to nothing, as in HF (models may pad their vocab)."""
        checked = _check_ids(ids)
        return str(self._backend.decode(checked, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> str:
        """The prompt text for a chat, rendered like HF ``apply_chat_template(..., tokenize=False)``.

        Encode the result with ``add_special_tokens=False``: the template writes its own bos if it
        wants one. Raises ``NoChatTemplateError`` for a model without a template and
        ``ChatTemplateError`` when the template rejects the messages.
        """
        if self._chat_template is None:
            raise NoChatTemplateError(
                f"model {self._name} has no chat template; use a completion prompt instead"
            )
        variables = {**self._special_tokens, **template_kwargs}  # caller's kwargs win, as in HF
        return self._chat_template.render(
            messages, add_generation_prompt=add_generation_prompt, variables=variables
        )


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (HF's assistant-mask marker): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # HF replaces Jinja's tojson, which HTML-escapes '<', '>' and '&' and would change the prompt.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _plain(value: Any, where: str) -> Any:
    """A copy built from JSON types only: the template sees nothing with methods it could abuse or mutate."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise InvalidRequestError(f"{where}: {type(value).__name__} is not a JSON value")


# Names a message's reasoning may come under; templates read `reasoning_content` (gpt-oss: `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalise_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate and copy the messages the way HF prepares them (None-valued keys dropped, reasoning aliased)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError(
            "messages must be a non-empty list of {'role': ..., 'content': ...} objects"
        )
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"messages[{i}] must be an object, got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"messages[{i}].role must be a string")
        # OpenAI clients send content=None / tool_calls=None; templates handle a missing key better.
        plain = {k: v for k, v in _plain(dict(message), f"messages[{i}]").items() if v is not None}
        reasoning = next((plain[k] for k in _REASONING_FIELDS if k in plain), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        chat.append(plain)
    return chat


class ChatTemplate:
    """A checkpoint's Jinja chat template in HF's environment (sandboxed; trim_blocks, lstrip_blocks)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._compiled: jinja2.Template | None = None

    def _template(self) -> jinja2.Template:
        if self._compiled is None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            try:
                self._compiled = env.from_string(self.source)
            except jinja2.TemplateSyntaxError as exc:
                raise BrokenChatTemplateError(f"the model's chat template is invalid Jinja: {exc}") from None
        return self._compiled

    def render(self, messages: Any, *, add_generation_prompt: bool, variables: Mapping[str, Any]) -> str:
        chat = _normalise_messages(messages)
        context = {"tools": None, "documents": None, **_plain(dict(variables), "chat template variables")}
        context.update(messages=chat, add_generation_prompt=add_generation_prompt)
        template = self._template()
        try:
            return template.render(**context)
        except jinja2.TemplateError as exc:  # raise_exception(), undefined names, sandbox violations
            raise ChatTemplateError(f"chat template error: {exc}") from None
        # Python errors from inside the template, e.g. str + list when content is a list of parts.
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise ChatTemplateError(
                f"chat template failed on these messages: {type(exc).__name__}: {exc}"
            ) from None


def _check_ids(ids: Sequence[int]) -> list[int]:
    out = []
    for token_id in ids:
        # bool is an int subclass but never a token id; numpy/torch ints are accepted via __index__
        if isinstance(token_id, bool) or not hasattr(token_id, "__index__"):
            raise InvalidRequestError(f"token ids must be integers, got {token_id!r}")
        value = token_id.__index__()
        if value < 0:
            raise InvalidRequestError(f"token id {value} is negative")
        out.append(value)
    return out


class IncrementalDetokenizer:
    """Turns one request's generated ids into text deltas as they arrive (streaming).

    Decoding one token at a time is wrong twice over: a character may span several byte-level
    tokens (emoji, CJK), and some decoders drop or add a leading space depending on context.
    ``tokenizers``' own ``DecodeStream`` (what vLLM's engine uses) handles both inside the Rust
    decoder: it is primed with the last prompt tokens as context and returns None while the new
    ids do not yet end a whole character. We keep the ids since the last emitted text, so that
    ``flush`` can release a dangling partial character at the end of a request (as U+FFFD, which
    is what a full decode shows too).

        ids:   [ prompt context | ... emitted ... | pending (no text yet) ]
                                                  ^ _pending_from
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # A few prompt tokens give the first generated token its left context (leading-space rules).
        context = self._whole_characters(_check_ids(prompt_ids[-_CONTEXT_TOKENS:]))
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = list(context)
        self._pending_from = len(context)  # ids from here on have produced no text yet
        self._text = ""

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of every delta)."""
        return self._text

    def add_token(self, token_id: int) -> str:
        """Feed one generated id; return the text that became final (possibly "")."""
        [checked] = _check_ids([token_id])
        self._ids.append(checked)
        try:
            delta = self._stream.step(self._tokenizer.backend, checked)
        except Exception as exc:  # the Rust side raises plain Exception
            if "Invalid prefix" not in str(exc):
                raise
            # The decoder's text for the window changed its start (a context-dependent space rule):
            # restart the stream on the recent ids, as vLLM does, and take this token again.
            self._stream = DecodeStream(
                ids=self._ids[-1 - _CONTEXT_TOKENS : -1], skip_special_tokens=self._skip_special_tokens
            )
            delta = self._stream.step(self._tokenizer.backend, checked)
        if not delta:
            return ""
        self._pending_from = len(self._ids)
        self._text += delta
        return delta

    def flush(self) -> str:
        """At the end of a request: emit whatever was held back (e.g. a dangling partial character)."""
        if self._pending_from == len(self._ids):
            return ""
        # The held-back ids decoded after their left context, minus the context's own text.
        start = max(0, self._pending_from - _CONTEXT_TOKENS)
        context = self._decode(start, self._pending_from)
        full = self._decode(start, len(self._ids))
        delta = full[len(context) :] if full.startswith(context) else ""
        self._pending_from = len(self._ids)
        self._text += delta
        return delta

    def _whole_characters(self, context: list[int]) -> list[int]:
        """The context without trailing ids that end inside a character (a token-id prompt may):
        primed with those, DecodeStream would emit the prompt's own partial character as output."""
        while context and self._tokenizer.decode(context, self._skip_special_tokens).endswith("\ufffd"):
            context = context[:-1]
        return context

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special_tokens)


_CONTEXT_TOKENS = 5  # vLLM uses 5 prompt tokens of context (INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)
