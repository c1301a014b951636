"""`splitwise bench serve --dataset-name multiturn`: multi-turn conversations on 2P2D clusters.

Each conversation's turn t prompt is turn t-1's prompt + its answer + a new user message (token
ids: an answer of --random-output-len random tokens, a message of --random-input-len), so turns
share a growing prefix. Conversations run in parallel, each turn 0.5 s (a user's think time) after
the previous one ended.

Configurations, in one run (the built-in `small` model unless --tokenizer names another dir):

  cluster A (decode-side reuse on): router `load-only` (overlap weights 0) and router `kv-aware`
      (the default weights), each with its own conversations, all running at the same time (interleaved);
  cluster B (--no-decode-prefix-reuse): the same two routers and load, after cluster A.

Every request is handed off (``--disagg-min-prefill-tokens 0``) so the figures isolate routing and
reuse. Per request the scheduler's record in Redis gives: P's cached prefix blocks at dispatch (the
prefix index), D's reused blocks and the blocks transferred (D's ``transferred`` event). ``ideal``:
the blocks a node that served the previous turn holds (the previous prompt's full blocks).
"""

from __future__ import annotations

import asyncio
import random
import re
import statistics
import time
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


@dataclass(frozen=True)
class MultiturnSpec:
    model: str
    conversations: int = 8  # per router
    turns: int = 6
    user_tokens: int = 48
    answer_tokens: int = 16
    seed: int = 0
    threads: int = 1
    think_s: float = 0.5  # a user's pause between an answer and the next turn


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


def ideal_blocks(prompts: list[list[int]], turn: int, block_size: int) -> int:
    """Blocks of turn ``turn`` a node that served the previous turn holds (capped as dispatch is)."""
    if turn == 0:
        return 0
    shared = len(prompts[turn - 1]) // block_size
    return min(shared, (len(prompts[turn]) - 1) // block_size, MAX_PREFIX_BLOCKS)


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
) -> None:
    for t, prompt in enumerate(prompts):
        turn = Turn(name, index, t, len(prompt), ideal_blocks(prompts, t, block_size))
        try:
            turn.ttft_s = await _ttft(client, base_url, prompt, _req_tag(name, index, t), spec.answer_tokens)
        except (httpx.HTTPError, RuntimeError) as exc:
            turn.error = str(exc)
        out.append(turn)
        await asyncio.sleep(spec.think_s)


def _req_tag(name: str, index: int, turn: int) -> str:
    return f"mt-{re.sub(r'[^A-Za-z0-9]', '', name)}-{index}-{turn}"


async def _fill_from_records(
    client: aioredis.Redis, keys: KeySchema, turns: list[Turn], block_size: int
) -> None:
    for turn in turns:
        events = await find_request(
            client, keys, "cmpl-" + _req_tag(turn.config, turn.conversation, turn.turn)
        )
        for event in events:
            detail = event.get("detail", "")
            if event["event"] == "dispatched" and (m := re.search(r"kv_blocks=(\d+)/(\d+)/(\d+)", detail)):
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


async def _phase(
    cluster: LocalCluster, routers: dict[str, str], spec: MultiturnSpec, seed: int
) -> tuple[list[Turn], int]:
    host, port = cluster.scheduler_address
    keys = KeySchema(cluster.spec.topic)
    rclient = aioredis.Redis(host=host, port=port)
    try:
        block_size, block_bytes = await _geometry(rclient, keys)
        rng = random.Random(seed)
        turns: list[Turn] = []
        async with httpx.AsyncClient(timeout=600) as client:
            jobs = [
                _run_conversation(client, url, name, i, conversation(rng, spec), spec, block_size, turns)
                for i in range(spec.conversations)
                for name, url in routers.items()
            ]
            await asyncio.gather(*jobs)
        await asyncio.sleep(2.0)  # records are written with each frontend's next results read
        await _fill_from_records(rclient, keys, turns, block_size)
        return turns, block_bytes
    finally:
        await rclient.aclose()


def _cluster(spec: MultiturnSpec, extra: list[str]) -> LocalCluster:
    return LocalCluster(
        ClusterSpec(
            model=spec.model,
            num_prefill=2,
            num_decode=2,
            transfer="ipc",
            threads_per_instance=spec.threads,
            extra_args=extra,
            scheduler_args=ALWAYS_DISAGG,
        )
    )


def _start(cluster: LocalCluster, routers: dict[str, list[str]]) -> dict[str, str]:
    cluster.start()
    children = {
        name: cluster.spawn_router(f"router-{i}", extra=args)
        for i, (name, args) in enumerate(routers.items())
    }
    cluster.children += list(children.values())
    cluster.wait_ready(timeout_s=900)
    return {name: child.base_url for name, child in children.items()}


def run_multiturn(spec: MultiturnSpec) -> tuple[list[Turn], int]:
    """Both clusters, one after the other; every turn of every configuration."""
    turns: list[Turn] = []
    block_bytes = 0
    setups: list[tuple[list[str], dict[str, list[str]]]] = [
        ([], {"load-only": LOAD_ONLY, "kv-aware": []}),
        (["--no-decode-prefix-reuse"], {"load-only, no reuse": LOAD_ONLY, "kv-aware, no reuse": []}),
    ]
    for extra, routers in setups:
        cluster = _cluster(spec, extra)
        try:
            urls = _start(cluster, routers)
            got, block_bytes = asyncio.run(_phase(cluster, urls, spec, spec.seed))
            turns += got
        finally:
            cluster.stop()
    return turns, block_bytes


def format_table(turns: list[Turn], block_bytes: int) -> str:
    lines = [
        f"{'config':<20} {'reqs':>5} {'P hit':>6} {'ideal':>6} {'P/ideal':>8} {'D reuse/ideal':>14} "
        f"{'KV KiB/req t>=5':>16} {'TTFT ms mean':>13} {'TTFT t>=2':>10}"
    ]
    for config in dict.fromkeys(t.config for t in turns):
        rows = [t for t in turns if t.config == config and not t.error]
        hashed = sum(t.hashed_blocks for t in rows) or 1
        ideal = sum(t.ideal_blocks for t in rows) or 1
        late = [t for t in rows if t.turn >= 4] or rows
        later = [t for t in rows if t.turn >= 1] or rows
        lines.append(
            f"{config:<20} {len(rows):>5} {sum(t.p_cached_blocks for t in rows) / hashed:6.2f} "
            f"{ideal / hashed:6.2f} {sum(t.p_cached_blocks for t in rows) / ideal:8.2f} "
            f"{sum(t.d_reused_blocks for t in rows) / ideal:14.2f} "
            f"{statistics.mean(t.kv_blocks for t in late) * block_bytes / 1024:16.1f} "
            f"{statistics.mean(t.ttft_s for t in rows) * 1000:13.1f} "
            f"{statistics.mean(t.ttft_s for t in later) * 1000:10.1f}"
        )
    failed = sum(1 for t in turns if t.error)
    if failed:
        lines.append(f"{failed} requests failed: {next(t.error for t in turns if t.error)}")
    return "\n".join(lines)


def run_from_options(opts: dict[str, Any], echo: Any) -> None:
    """The `bench serve --dataset-name multiturn` entry: --num-prompts conversations per router,
    --turns, --random-input-len user tokens and --random-output-len answer tokens per turn."""
    from splitwise.commands.options import resolve_model

    spec = MultiturnSpec(
        model=str(resolve_model(opts.get("tokenizer"), default_size="small")),
        conversations=opts["num_prompts"],
        turns=opts["turns"],
        user_tokens=opts["random_input_len"],
        answer_tokens=opts["random_output_len"],
        seed=opts["seed"],
    )
    turns, block_bytes = run_multiturn(spec)
    echo(
        f"multiturn on 2P2D, model {Path(spec.model).name}: {spec.conversations} conversations x "
        f"{spec.turns} turns per router, {spec.user_tokens} user + {spec.answer_tokens} answer tokens per turn"
    )
    echo(format_table(turns, block_bytes))
