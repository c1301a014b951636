"""vLLM's ``--goodput KEY:MS [KEY:MS ...]`` for `bench serve` / `bench compare`.

vLLM spells the SLOs as one flag followed by several ``key:milliseconds`` words
(``--goodput ttft:500 tpot:50``); click options take one value, so ``GoodputCommand`` turns the
words after ``--goodput`` into one ``--goodput`` each before click parses them.
"""

from __future__ import annotations

from collections.abc import Iterable

import click

GOODPUT_KEYS = {"ttft": "ttft_ms", "tpot": "tpot_ms", "e2el": "e2el_ms"}


def parse_goodput(values: Iterable[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft_ms": 500.0, "tpot_ms": 50.0}``; errors name the flag."""
    slo: dict[str, float] = {}
    for value in values:
        key, sep, number = value.partition(":")
        if not sep or key not in GOODPUT_KEYS:
            raise ValueError(
                f"--goodput: {value!r} must be KEY:MS with KEY one of {', '.join(GOODPUT_KEYS)} (e.g. ttft:500)"
            )
        try:
            ms = float(number)
        except ValueError:
            raise ValueError(f"--goodput: {value!r}: {number!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"--goodput: {value!r}: the objective must be > 0 ms")
        if GOODPUT_KEYS[key] in slo:
            raise ValueError(f"--goodput: {key} is given twice")
        slo[GOODPUT_KEYS[key]] = ms
    return slo


def split_goodput_words(args: list[str]) -> list[str]:
    """``--goodput a b --x`` -> ``--goodput a --goodput b --x``."""
    out: list[str] = []
    in_goodput = False
    for arg in args:
        if arg == "--goodput":
            in_goodput = True
            continue
        if in_goodput and not arg.startswith("-"):
            out += ["--goodput", arg]
            continue
        in_goodput = False
        out.append(arg)
    return out


class GoodputCommand(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, split_goodput_words(args))
