"""The DecodeStream-based IncrementalDetokenizer on a sentencepiece-style tokenizer (Metaspace,
byte fallback, a decoder that strips the first space: Llama 2 / Mistral), built in memory; the
byte-level tokenizer of the tiny models is covered by test_tokenizer.py."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.stop_checker import StopChecker
from splitwise.engine.text_stream import TextStream
from splitwise.engine.tokenizer import IncrementalDetokenizer, Tokenizer

CORPUS = [
    "Hello world, this is a test of a sentencepiece style tokenizer.",
    "Emoji 🎉 and 你好 and héllo wörld, with byte fallback.",
    "  double  spaces and\nnewlines\tand tabs",
]


@pytest.fixture(scope="module")
def sp_tok() -> Tokenizer:
    backend = Backend(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    backend.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=320, special_tokens=specials))
    return Tokenizer(backend, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})


def _stream(tok: Tokenizer, ids: list[int], prompt: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.add_token(i) for i in ids] + [detok.flush()]
    assert detok.text == "".join(deltas)
    return deltas


def test_without_context_the_stream_is_the_full_decode(sp_tok: Tokenizer) -> None:
    for text in CORPUS:
        ids = sp_tok.encode(text, add_special_tokens=False)
        deltas = _stream(sp_tok, ids, [])
        assert "".join(deltas) == sp_tok.decode(ids), text
        assert not any("\ufffd" in d for d in deltas)
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(3, sp_tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        assert "".join(_stream(sp_tok, ids, [])) == sp_tok.decode(ids)


def test_with_a_prompt_the_stream_continues_it(sp_tok: Tokenizer) -> None:
    # After a prompt, "▁Hello" is " Hello": the text the prompt's decode gains, not a fresh decode.
    prompt = sp_tok.encode("Prompt:", add_special_tokens=False)
    for text in CORPUS:
        ids = sp_tok.encode(text, add_special_tokens=False)
        whole, before = sp_tok.decode(prompt + ids), sp_tok.decode(prompt)
        assert "".join(_stream(sp_tok, ids, prompt)) == whole[len(before) :], text


def test_a_prompt_ending_inside_a_character_is_not_echoed(sp_tok: Tokenizer) -> None:
    emoji = sp_tok.encode("🎉", add_special_tokens=False)
    assert len(emoji) > 1  # byte-fallback pieces
    prompt = sp_tok.encode("Prompt", add_special_tokens=False) + emoji[:1]  # ends mid-character
    ids = sp_tok.encode(" done", add_special_tokens=False)
    whole = sp_tok.decode(prompt[:-1] + ids)
    out = "".join(_stream(sp_tok, ids, prompt))
    assert out == whole[len(sp_tok.decode(prompt[:-1])) :] and "\ufffd" not in out


def test_stop_strings_cut_the_same_through_text_stream(sp_tok: Tokenizer) -> None:
    ids = sp_tok.encode("Hello world, this is a test", add_special_tokens=False)
    stream = TextStream(sp_tok, [], SamplingParams(stop=("is a",)))
    checker = StopChecker(eos_token_ids=set(), max_model_len=1000)
    text, stop = "", None
    for token in ids:
        delta = stream.push(token, checker)
        text += delta.text
        if delta.stop is not None:
            stop = delta.stop
            break
    assert stop == "is a" and text == "Hello world, this "
