"""Tokenizer, chat templates and IncrementalDetokenizer, checked against transformers' AutoTokenizer."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import transformers

from splitwise.engine.errors import InvalidRequestError, ModelLoadError
from splitwise.engine.tiny_model import make_tiny_model
from splitwise.engine.tokenizer import (
    BrokenChatTemplateError,
    ChatTemplateError,
    IncrementalDetokenizer,
    NoChatTemplateError,
    Tokenizer,
    TokenizerLoadError,
)

TEXTS = [
    "hello world",
    "  leading and trailing spaces  ",
    "Ünïcödé café naïve Å",  # Å: NFC-normalised by the tokenizer
    "emoji 🎉🚀 and a family 👨‍👩‍👧 in one string",
    "中文字符和日本語のテキスト",
    "tabs\tand\nnewlines\r\n\n",
    "numbers 1234567890 and 3.14159",
    "<|im_start|>user\nspecial tokens in text<|im_end|>",
    "",
    "x" * 100,
    "def f(a, b):\n    return a ** 2 // b  # comment",
    "don't won't it's THEY'LL",
]

CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime. 🎉"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another?"},
    ],
    [{"role": "user", "content": ""}],
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # qwen2 matters separately: transformers builds Qwen2Tokenizer for it instead of reading tokenizer.json.
    return make_tiny_model(tmp_path_factory.mktemp(request.param), request.param, "tiny", seed=0)


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


def copy_model(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    return dest


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_hf(tok: Tokenizer, hf: Any, add_special_tokens: bool) -> None:
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens) == hf.encode(
            text, add_special_tokens=add_special_tokens
        ), text


def test_encode_adds_bos_like_hf(tok: Tokenizer) -> None:
    assert tok.encode("hi")[0] == tok.bos_token_id == 0
    assert tok.encode("hi", add_special_tokens=False)[0] != 0


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_hf(tok: Tokenizer, hf: Any, skip_special_tokens: bool) -> None:
    for text in TEXTS:
        ids = hf.encode(text)
        expected = hf.decode(ids, skip_special_tokens=skip_special_tokens)
        assert tok.decode(ids, skip_special_tokens=skip_special_tokens) == expected, text
    assert tok.decode(tok.encode("emoji 🎉 ok")) == "emoji 🎉 ok"


def test_vocab_and_special_ids(tok: Tokenizer, hf: Any) -> None:
    assert tok.vocab_size == len(hf) == 1024
    # tokenizer_config's eos (<|im_end|>) first, then generation_config's extra <|endoftext|>.
    assert tok.eos_token_ids == (2, 0)
    assert tok.eos_token_id == hf.eos_token_id == 2
    assert tok.pad_token_id == hf.pad_token_id == 0


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(tok: Tokenizer, hf: Any, add_generation_prompt: bool) -> None:
    for chat in CHATS:
        expected = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_is_chatml(tok: Tokenizer) -> None:
    rendered = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert (
        rendered == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )
    # The markers are single special tokens, not spelled out in bytes.
    assert tok.encode(rendered, add_special_tokens=False)[:1] == [1]


# Exercises the parts of HF's Jinja environment a template may rely on: tojson without HTML
# escaping, loop controls, {% generation %}, namespace(), bos_token, trim/lstrip of blocks.
RICH_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(n=0) %}
{%- for message in messages %}
    {%- if message.role == 'system' %}{% continue %}{% endif %}
    {%- set ns.n = ns.n + 1 %}
    <{{ message.role }}>{{ message.content | tojson }}
    {%- if message.role == 'assistant' %}{% generation %}[{{ message.content }}]{% endgeneration %}{% endif %}
{% endfor %}
{%- if tools %}tools={{ tools | tojson(indent=2) }}{% endif %}
{%- if add_generation_prompt %}count={{ ns.n }}{{ eos_token }}{% endif %}"""


def test_rich_template_from_chat_template_jinja_matches_hf(model_dir: Path, tmp_path: Path) -> None:
    model = copy_model(model_dir, tmp_path / "m")
    (model / "chat_template.jinja").write_text(RICH_TEMPLATE)  # wins over tokenizer_config's template
    chat: list[dict[str, Any]] = [
        {"role": "system", "content": "hidden"},
        {"role": "user", "content": 'a <b> & "c"'},
        {"role": "assistant", "content": "ok", "tool_calls": None},
    ]
    expected = transformers.AutoTokenizer.from_pretrained(model).apply_chat_template(chat, tokenize=False)
    rendered = Tokenizer.from_dir(model).apply_chat_template(chat, add_generation_prompt=False)
    assert rendered == expected
    assert '"a <b> & \\"c\\""' in rendered  # not HTML-escaped
    assert "hidden" not in rendered and rendered.startswith("<|endoftext|>")


def test_template_kwargs_reach_the_template(model_dir: Path, tmp_path: Path) -> None:
    model = copy_model(model_dir, tmp_path / "m")
    (model / "chat_template.jinja").write_text(RICH_TEMPLATE)
    tools: list[Any] = [{"name": "f", "parameters": {}}]
    chat: list[dict[str, Any]] = [{"role": "user", "content": "x"}]
    expected = transformers.AutoTokenizer.from_pretrained(model).apply_chat_template(
        chat, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert Tokenizer.from_dir(model).apply_chat_template(chat, tools=tools) == expected
    assert "count=1<|im_end|>" in expected


def test_template_rejections_are_invalid_request_errors(tok: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="unknown role robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    with pytest.raises(ChatTemplateError, match="content must be a string"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    with pytest.raises(InvalidRequestError, match="non-empty list"):
        tok.apply_chat_template([])
    with pytest.raises(InvalidRequestError, match=r"messages\[0\].role"):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(InvalidRequestError, match="not a JSON value"):
        tok.apply_chat_template([{"role": "user", "content": object()}])
    assert issubclass(ChatTemplateError, InvalidRequestError)


def test_model_without_chat_template(model_dir: Path, tmp_path: Path) -> None:
    model = copy_model(model_dir, tmp_path / "m")
    edit_json(model / "tokenizer_config.json", chat_template=...)
    tok = Tokenizer.from_dir(model)
    assert not tok.has_chat_template
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.encode("still works") == Tokenizer.from_dir(model_dir).encode("still works")


def test_broken_template_is_a_model_load_error_on_first_use(model_dir: Path, tmp_path: Path) -> None:
    model = copy_model(model_dir, tmp_path / "m")
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    tok = Tokenizer.from_dir(model)  # completions must still work with a broken chat template
    with pytest.raises(BrokenChatTemplateError, match="invalid Jinja") as info:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert isinstance(info.value, ModelLoadError)


def test_named_template_list_picks_default(model_dir: Path, tmp_path: Path) -> None:
    model = copy_model(model_dir, tmp_path / "m")
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    edit_json(model / "tokenizer_config.json", chat_template=named)
    assert Tokenizer.from_dir(model).apply_chat_template([{"role": "user", "content": "x"}]) == "DEFAULT"


def test_missing_or_corrupt_files_raise_tokenizer_load_error(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    model = copy_model(model_dir, tmp_path / "m")
    (model / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError, match="tokenizer_config.json: invalid JSON"):
        Tokenizer.from_dir(model)
    (model / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(TokenizerLoadError, match="tokenizer.json: cannot load"):
        Tokenizer.from_dir(model)
    assert issubclass(TokenizerLoadError, ModelLoadError)


def test_generation_config_eos_forms(model_dir: Path, tmp_path: Path) -> None:
    model = copy_model(model_dir, tmp_path / "m")
    edit_json(model / "generation_config.json", eos_token_id=5)
    assert Tokenizer.from_dir(model).eos_token_ids == (2, 5)
    edit_json(model / "generation_config.json", eos_token_id=[2, 7, 7])
    assert Tokenizer.from_dir(model).eos_token_ids == (2, 7)
    (model / "generation_config.json").unlink()
    assert Tokenizer.from_dir(model).eos_token_ids == (2,)
    (model / "generation_config.json").write_text('{"eos_token_id": "2"}')
    with pytest.raises(TokenizerLoadError, match="eos_token_id"):
        Tokenizer.from_dir(model)


def test_add_bos_token_applies_when_tokenizer_json_has_no_post_processor(
    model_dir: Path, tmp_path: Path
) -> None:
    model = copy_model(model_dir, tmp_path / "m")
    edit_json(model / "tokenizer.json", post_processor=None)
    body = Tokenizer.from_dir(model_dir).encode("abc", add_special_tokens=False)
    assert Tokenizer.from_dir(model).encode("abc") == [0, *body]  # add_bos_token: true in the config
    edit_json(model / "tokenizer_config.json", add_bos_token=False)
    assert Tokenizer.from_dir(model).encode("abc") == body


def test_bad_encode_and_decode_input(tok: Tokenizer, hf: Any) -> None:
    with pytest.raises(InvalidRequestError, match="must be a string"):
        tok.encode(["not", "a", "string"])  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="negative"):
        tok.decode([5, -1])
    with pytest.raises(InvalidRequestError, match="integers"):
        tok.decode([5, 1.5])  # type: ignore[list-item]
    with pytest.raises(InvalidRequestError, match="integers"):
        tok.decode([True])
    # Ids past the tokenizer (models may pad their embedding) decode to nothing, as in HF.
    assert tok.decode([100_000, 74]) == hf.decode([100_000, 74]) == tok.decode([74])


def stream(tok: Tokenizer, ids: list[int], prompt_ids: list[int] | None = None, **kwargs: Any) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids or [], **kwargs)
    deltas = [detok.add_token(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


def test_incremental_detokenization_equals_full_decode(tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        deltas = stream(tok, ids, prompt_ids=tok.encode("Prompt:"))
        assert "".join(deltas) == tok.decode(ids), text
        assert not any("\ufffd" in d for d in deltas), (text, deltas)


def test_multibyte_characters_are_held_back_until_complete(tok: Tokenizer) -> None:
    ids = tok.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1 and tok.decode(ids[:1]).endswith("\ufffd")  # the emoji really is split
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add_token(i) for i in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🎉" and detok.text == "🎉"


def test_flush_releases_a_dangling_partial_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🎉", add_special_tokens=False)[:-1]  # cut inside the emoji
    detok = IncrementalDetokenizer(tok)
    emitted = "".join(detok.add_token(i) for i in ids)
    assert emitted.startswith("ok") and "\ufffd" not in emitted
    assert detok.flush() == tok.decode(ids)[len(emitted) :]
    assert detok.text == tok.decode(ids) and detok.text.endswith("\ufffd")


def test_special_tokens_in_the_stream(tok: Tokenizer) -> None:
    ids = tok.encode("a<|im_end|>b", add_special_tokens=False)
    assert 2 in ids
    assert "".join(stream(tok, ids)) == "ab"
    assert "".join(stream(tok, ids, skip_special_tokens=False)) == "a<|im_end|>b"


def test_random_token_streams_equal_full_decode(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(3, tok.vocab_size) for _ in range(rng.randrange(1, 60))]
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(0, 8))]
        assert "".join(stream(tok, ids, prompt_ids=prompt)) == tok.decode(ids)


def test_detokenizer_rejects_bad_ids(tok: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError, match="negative"):
        IncrementalDetokenizer(tok).add_token(-3)


def test_reasoning_fields_are_aliased_like_hf(model_dir: Path, tmp_path: Path) -> None:
    model = copy_model(model_dir, tmp_path / "m")
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.reasoning_content }}|{{ m.thinking }}|{{ m.content }};{% endfor %}"
    )
    chat = [{"role": "assistant", "content": "x", "reasoning": "why"}]
    expected = transformers.AutoTokenizer.from_pretrained(model).apply_chat_template(chat, tokenize=False)
    assert (
        Tokenizer.from_dir(model).apply_chat_template(chat, add_generation_prompt=False)
        == expected
        == "why|why|x;"
    )
