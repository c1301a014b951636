"""`splitwise bench serve --dataset-name multiturn`: multi-turn conversations on 2P2D clusters.

Each conversation's turn t prompt is turn t-1's prompt + its answer + a new user message (token
ids: an answer of --random-output-len random tokens, a message of --random-input-len), so turns
share a growing prefix. A round runs --num-prompts conversations in parallel, each turn 0.5 s (a
user's think time) after the previous one ended.

Five arms, interleaved in one run (the built-in `small` model unless --tokenizer names another dir):

  cluster A (decode-side reuse on):       `kv-aware` (default weights), `load-only` (weights 0) and
                                          `kv-aware, balance 0` (--kv-prefill-balance-tokens 0)
  cluster B (--no-decode-prefix-reuse):   `kv-aware, no reuse` and `load-only, no reuse`

Both clusters stay up; each round runs every arm once, alone on its cluster (fresh conversations,
the arms' order rotated from round to round), so arms see the same machine, one at a time, and the
per-round ratios against `load-only` cancel most of a shared machine's drift.

Every request is handed off (``--disagg-min-prefill-tokens 0``) so the figures isolate routing and
reuse. Per request the scheduler's record in Redis gives: the P and D picked and P's cached prefix
blocks at dispatch (the prefix index), D's reused blocks and so the blocks transferred (D's
``transferred`` event). ``ideal``: the blocks a node that served the previous turn holds (the
previous prompt's full blocks, capped as dispatch caps the hashes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from scheduler.keys import KeySchema
from scheduler.messages import NodeInfo, decode
from scheduler.prefix_index import MAX_PREFIX_BLOCKS
from scheduler.records import find_request
from splitwise.cluster import ClusterSpec, LocalCluster
from splitwise.kv_geometry import ITEMSIZE

ALWAYS_DISAGG = ["--disagg-min-prefill-tokens", "0"]
LOAD_ONLY = ["--kv-overlap-weight-prefill", "0", "--kv-overlap-weight-decode", "0"]
# arm -> (cluster: decode-side reuse on?, the router's flags)
ARMS: dict[str, tuple[bool, list[str]]] = {
    "kv-aware": (True, []),
    "load-only": (True, LOAD_ONLY),
    # The weighted score alone (no sticky bound): shows what --kv-prefill-balance-tokens adds.
    "kv-aware, balance 0": (True, ["--kv-prefill-balance-tokens", "0"]),
    "kv-aware, no reuse": (False, []),
    "load-only, no reuse": (False, LOAD_ONLY),
}
REFERENCE_ARM = "load-only"
# Per instance: holds every conversation of a round (3 arms x 4 x ~2k tokens over 2 nodes) with
# room to spare, and keeps 8 instances within a shared machine's memory (256 MiB each, `small`).
KV_BLOCKS = ["--num-kv-blocks", "1024"]  # the TTFT ratios are against it, round by round


@dataclass(frozen=True)
class MultiturnSpec:
    model: str
    conversations: int = 4  # per arm and round
    turns: int = 6
    user_tokens: int = 48
    answer_tokens: int = 16
    seed: int = 0
    threads: int = 1
    think_s: float = 0.5  # a user's pause between an answer and the next turn
    rounds: int = 1
    # Every arm of a cluster at once (they contend for its P nodes: routing under another router's
    # load), instead of one arm at a time.
    arms_together: bool = False


@dataclass
class Turn:
    config: str
    conversation: int
    turn: int
    prompt_tokens: int
    ideal_blocks: int
    ttft_s: float = 0.0
    hashed_blocks: int = 0
    p_cached_blocks: int = 0
    d_reused_blocks: int = 0
    kv_blocks: int = 0
    error: str = ""
    round: int = 0
    p_node: str = ""
    d_node: str = ""
    full_ideal_blocks: int = -1  # the ideal uncapped (D reuses beyond the dispatch's hashes); -1: as ideal

    def __post_init__(self) -> None:
        if self.full_ideal_blocks < 0:
            self.full_ideal_blocks = self.ideal_blocks


@dataclass
class Summary:
    rows: dict[str, dict[str, float]] = field(default_factory=dict)


def conversation(rng: random.Random, spec: MultiturnSpec) -> list[list[int]]:
    prompts: list[list[int]] = []
    history: list[int] = []
    for _ in range(spec.turns):
        history = history + [rng.randint(3, 1000) for _ in range(spec.user_tokens)]
        prompts.append(list(history))
        history = history + [rng.randint(3, 1000) for _ in range(spec.answer_tokens)]
    return prompts


def ideal_blocks(
    prompts: list[list[int]], turn: int, block_size: int, max_blocks: int = MAX_PREFIX_BLOCKS
) -> int:
    """Blocks of turn ``turn`` a node that served the previous turn holds (capped as dispatch
    caps the prompt's hashes, unless ``max_blocks`` says otherwise)."""
    if turn == 0:
        return 0
    shared = len(prompts[turn - 1]) // block_size
    return min(shared, (len(prompts[turn]) - 1) // block_size, max_blocks)


async def _ttft(client: httpx.AsyncClient, base_url: str, prompt: list[int], req_id: str, n: int) -> float:
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0.0, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    ttft = 0.0
    async with client.stream(
        "POST", f"{base_url}/completions", json=body, headers={"X-Request-Id": req_id}
    ) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if not ttft and line.startswith("data:") and '"text":"' in line.replace(" ", ""):
                ttft = time.perf_counter() - start
    return ttft


async def _run_conversation(
    client: httpx.AsyncClient,
    base_url: str,
    name: str,
    index: int,
    prompts: list[list[int]],
    spec: MultiturnSpec,
    block_size: int,
    out: list[Turn],
    round_: int,
) -> None:
    for t, prompt in enumerate(prompts):
        turn = Turn(name, index, t, len(prompt), ideal_blocks(prompts, t, block_size), round=round_)
        turn.full_ideal_blocks = ideal_blocks(prompts, t, block_size, max_blocks=len(prompt))
        try:
            tag = _req_tag(name, round_, index, t)
            turn.ttft_s = await _ttft(client, base_url, prompt, tag, spec.answer_tokens)
        except (httpx.HTTPError, RuntimeError) as exc:
            turn.error = str(exc)
        out.append(turn)
        await asyncio.sleep(spec.think_s)


def _req_tag(name: str, round_: int, index: int, turn: int) -> str:
    return f"mt-{re.sub(r'[^A-Za-z0-9]', '', name)}-{round_}-{index}-{turn}"


async def _fill_from_records(
    client: aioredis.Redis, keys: KeySchema, turns: list[Turn], block_size: int
) -> None:
    for turn in turns:
        tag = _req_tag(turn.config, turn.round, turn.conversation, turn.turn)
        for event in await find_request(client, keys, "cmpl-" + tag):
            detail = event.get("detail", "")
            if event["event"] == "dispatched":
                if m := re.search(r"p=(\S+) d=(\S+)", detail):
                    turn.p_node, turn.d_node = m.group(1), m.group(2)
                if m := re.search(r"kv_blocks=(\d+)/(\d+)/(\d+)", detail):
                    turn.p_cached_blocks, turn.hashed_blocks = int(m.group(1)), int(m.group(3))
            if event["event"] == "transferred" and (m := re.search(r"blocks=(\d+) reused=(\d+)", detail)):
                turn.d_reused_blocks = int(m.group(2))
        turn.kv_blocks = -(-turn.prompt_tokens // block_size) - turn.d_reused_blocks


async def _geometry(client: aioredis.Redis, keys: KeySchema) -> tuple[int, int]:
    """(block size, bytes of one block over every layer, K and V) from the node registry."""
    raw: dict[Any, Any] = await client.hgetall(keys.nodes)
    info = decode(next(iter(raw.values())), NodeInfo)
    kv = info.kv
    return kv.block_size, 2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * kv.block_size * ITEMSIZE[
        kv.dtype
    ]


async def _arm_round(
    cluster: LocalCluster, name: str, url: str, spec: MultiturnSpec, round_: int
) -> tuple[list[Turn], int, int]:
    """One arm's conversations of one round, in parallel, then their records; and the block
    size and bytes."""
    host, port = cluster.scheduler_address
    keys = KeySchema(cluster.spec.topic)
    rclient = aioredis.Redis(host=host, port=port)
    try:
        block_size, block_bytes = await _geometry(rclient, keys)
        # Conversations of equal shape for every arm, with token ids of their own (per arm and
        # round): no arm may find another's prefix cached.
        rng = random.Random(f"{spec.seed}/{round_}/{name}")
        turns: list[Turn] = []
        async with httpx.AsyncClient(timeout=600) as client:
            jobs = [
                _run_conversation(
                    client, url, name, i, conversation(rng, spec), spec, block_size, turns, round_
                )
                for i in range(spec.conversations)
            ]
            await asyncio.gather(*jobs)
        await asyncio.sleep(2.0)  # records are written with each frontend's next results read
        await _fill_from_records(rclient, keys, turns, block_size)
        return turns, block_size, block_bytes
    finally:
        await rclient.aclose()


def _cluster(spec: MultiturnSpec, reuse: bool) -> LocalCluster:
    return LocalCluster(
        ClusterSpec(
            model=spec.model,
            num_prefill=2,
            num_decode=2,
            transfer="ipc",
            threads_per_instance=spec.threads,
            extra_args=KV_BLOCKS + ([] if reuse else ["--no-decode-prefix-reuse"]),
            scheduler_args=ALWAYS_DISAGG,
        )
    )


def arm_order(round_: int) -> list[str]:
    """The arms of round ``round_``, rotated by one each round (no arm always first)."""
    names = list(ARMS)
    shift = round_ % len(names)
    return names[shift:] + names[:shift]


def round_groups(round_: int, *, together: bool) -> list[list[str]]:
    """The arms of a round in the order they run: one at a time, or (``together``) every arm of a
    cluster at once, one cluster after the other (the order rotated each round)."""
    order = arm_order(round_)
    if not together:
        return [[name] for name in order]
    groups = [[n for n in order if ARMS[n][0] == reuse] for reuse in (True, False)]
    return groups if round_ % 2 == 0 else groups[::-1]


async def _together(
    clusters: dict[bool, LocalCluster],
    urls: dict[str, str],
    group: list[str],
    spec: MultiturnSpec,
    round_: int,
) -> list[tuple[list[Turn], int, int]]:
    return list(
        await asyncio.gather(
            *(_arm_round(clusters[ARMS[name][0]], name, urls[name], spec, round_) for name in group)
        )
    )


def run_multiturn(spec: MultiturnSpec) -> tuple[list[Turn], int, int]:
    """Both clusters up at once; ``spec.rounds`` rounds of every arm, one arm at a time. Returns
    every turn, the block size and a block's bytes."""
    clusters = {reuse: _cluster(spec, reuse) for reuse in (True, False)}
    turns: list[Turn] = []
    block_size = block_bytes = 0
    try:
        urls: dict[str, str] = {}
        for cluster in clusters.values():
            cluster.start()
        for i, (reuse, args) in enumerate(ARMS.values()):
            child = clusters[reuse].spawn_router(f"router-{i}", extra=args)
            clusters[reuse].children.append(child)
        for cluster in clusters.values():
            cluster.wait_ready(timeout_s=900)
        for i, (name, (reuse, _args)) in enumerate(ARMS.items()):
            [child] = [c for c in clusters[reuse].children if c.name == f"router-{i}"]
            urls[name] = child.base_url
        for round_ in range(spec.rounds):
            for group in round_groups(round_, together=spec.arms_together):
                results = asyncio.run(_together(clusters, urls, group, spec, round_))
                for got, size, nbytes in results:
                    turns, block_size, block_bytes = turns + got, size, nbytes
    finally:
        for cluster in clusters.values():
            cluster.stop()
    return turns, block_size, block_bytes


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def balance(turns: list[Turn], block_size: int) -> tuple[float, float]:
    """(requests, prefill tokens computed) on the busiest P over the mean of the P nodes (1.0:
    even). Computed tokens: the prompt less P's cached prefix at dispatch."""
    nodes = sorted({t.p_node for t in turns if t.p_node})
    if len(nodes) < 2:
        return (float(len(nodes)), float(len(nodes)))
    reqs: Counter[str] = Counter(t.p_node for t in turns if t.p_node)
    work: Counter[str] = Counter()
    for t in turns:
        if t.p_node:
            work[t.p_node] += t.prompt_tokens - t.p_cached_blocks * block_size
    mean_reqs = sum(reqs.values()) / len(nodes)
    mean_work = sum(work.values()) / len(nodes) or 1
    return max(reqs.values()) / mean_reqs, max(work.values()) / mean_work


def _late_ttfts(rows: list[Turn]) -> list[float]:
    """TTFTs of the turns where a prefix can be reused (turn 2 on, one-based)."""
    return [t.ttft_s for t in rows if t.turn >= 1]


def ttft_ratios(turns: list[Turn], arm: str, reference: str = REFERENCE_ARM) -> list[float]:
    """Per round: the arm's TTFT p50 (turns 2+) over the reference arm's in that round."""
    out: list[float] = []
    for round_ in sorted({t.round for t in turns}):
        mine = _late_ttfts([t for t in turns if t.config == arm and t.round == round_ and not t.error])
        ref = _late_ttfts([t for t in turns if t.config == reference and t.round == round_ and not t.error])
        if mine and ref and percentile(ref, 0.5) > 0:
            out.append(percentile(mine, 0.5) / percentile(ref, 0.5))
    return out


def format_table(turns: list[Turn], block_bytes: int, block_size: int = 16) -> str:
    lines = [
        f"{'arm':<20} {'reqs':>5} {'P hit':>6} {'ideal':>6} {'P/ideal':>8} {'P moved':>8} "
        f"{'D reuse/ideal':>14} {'KV KiB/req t>=5':>16} {'P reqs max/mean':>16} {'P work max/mean':>16} "
        f"{'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'p50/load-only':>14}"
    ]
    for config in [a for a in ARMS if any(t.config == a for t in turns)] + sorted(
        {t.config for t in turns} - set(ARMS)
    ):
        rows = [t for t in turns if t.config == config and not t.error]
        hashed = sum(t.hashed_blocks for t in rows) or 1
        ideal = sum(t.ideal_blocks for t in rows) or 1
        full_ideal = sum(t.full_ideal_blocks for t in rows) or 1
        late = [t for t in rows if t.turn >= 4] or rows
        moved = [t for t in rows if t.p_node and _previous_p(rows, t) not in ("", t.p_node)]
        reqs_balance, work_balance = balance(rows, block_size)
        ttfts = _late_ttfts(rows) or [t.ttft_s for t in rows]
        ratios = ttft_ratios(turns, config)
        ratio = f"{statistics.median(ratios):.2f}" if ratios and config != REFERENCE_ARM else "-"
        lines.append(
            f"{config:<20} {len(rows):>5} {sum(t.p_cached_blocks for t in rows) / hashed:6.2f} "
            f"{ideal / hashed:6.2f} {sum(t.p_cached_blocks for t in rows) / ideal:8.2f} {len(moved):>8} "
            f"{sum(t.d_reused_blocks for t in rows) / full_ideal:14.2f} "
            f"{statistics.mean(t.kv_blocks for t in late) * block_bytes / 1024:16.1f} "
            f"{reqs_balance:16.2f} {work_balance:16.2f} "
            f"{percentile(ttfts, 0.5) * 1000:12.1f} {percentile(ttfts, 0.9) * 1000:12.1f} {ratio:>14}"
        )
    failed = sum(1 for t in turns if t.error)
    if failed:
        lines.append(f"{failed} requests failed: {next(t.error for t in turns if t.error)}")
    return "\n".join(lines)


def format_rounds(turns: list[Turn]) -> str:
    """Each arm's TTFT p50 ratio against load-only, round by round (the noise between rounds)."""
    out = []
    for arm in ARMS:
        ratios = ttft_ratios(turns, arm)
        if arm != REFERENCE_ARM and ratios:
            out.append(f"TTFT p50 {arm} / {REFERENCE_ARM} per round: " + " ".join(f"{r:.2f}" for r in ratios))
    return "\n".join(out)


def _previous_p(rows: list[Turn], turn: Turn) -> str:
    for t in rows:
        if (t.round, t.conversation, t.turn) == (turn.round, turn.conversation, turn.turn - 1):
            return t.p_node
    return ""


def run_from_options(opts: dict[str, Any], echo: Any) -> None:
    """The `bench serve --dataset-name multiturn` entry: --num-prompts conversations per arm and
    round, --turns, --random-input-len user tokens and --random-output-len answer tokens per turn,
    --rounds."""
    from splitwise.commands.options import resolve_model

    spec = MultiturnSpec(
        model=str(resolve_model(opts.get("tokenizer"), default_size="small")),
        conversations=opts["num_prompts"],
        turns=opts["turns"],
        user_tokens=opts["random_input_len"],
        answer_tokens=opts["random_output_len"],
        seed=opts["seed"],
        rounds=opts.get("rounds", 1),
        arms_together=opts.get("arms_together", False),
    )
    turns, block_size, block_bytes = run_multiturn(spec)
    echo(
        f"multiturn on 2P2D, model {Path(spec.model).name}: {spec.rounds} rounds x {spec.conversations} "
        f"conversations x {spec.turns} turns per arm, {spec.user_tokens} user + {spec.answer_tokens} "
        "answer tokens per turn, "
        + ("a cluster's arms at once" if spec.arms_together else "one arm at a time")
    )
    echo(format_table(turns, block_bytes, block_size))
    echo(format_rounds(turns))
    if opts.get("result_file"):
        Path(opts["result_file"]).write_text(
            json.dumps({"spec": dataclasses.asdict(spec), "turns": [dataclasses.asdict(t) for t in turns]})
        )
