"""The Redis prefix index on a real 1P1D cluster: after a request, both nodes' index sets hold the
prompt's block hashes as the frontend computes them (``prompt_block_hashes``), with a TTL, and the
next dispatch of a longer prompt records the cached prefix it found on P and D."""

from __future__ import annotations

import asyncio

import httpx
import redis
import redis.asyncio as aioredis

from scheduler.keys import KeySchema
from scheduler.prefix_index import prompt_block_hashes
from tests.instance.helpers import complete
from tests.instance.pd_helpers import make_prompt, wait_until


def test_nodes_publish_their_cached_prefixes(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(
        num_prefill=1, num_decode=1, transfer="ipc", extra=["--scheduler-heartbeat-interval", "0.3"]
    )
    host, port = cluster.scheduler_address
    client = redis.Redis(host=host, port=port)
    keys = KeySchema(cluster.spec.topic)
    prompt = make_prompt(41, seed=5)
    want = {h.encode() for h in prompt_block_hashes(prompt, 4)}  # ENGINE_ARGS: block size 4
    assert len(want) == 10
    try:
        complete(cluster.entry.base_url, prompt, max_tokens=4)
        for node in ("prefill-0", "decode-0"):
            key = keys.prefix_index(node)
            assert wait_until(lambda key=key: want <= client.smembers(key), 30), (
                node,
                cluster.log_tail(cluster.children[0]),
            )
            assert client.pttl(key) > 0
        follow_up = prompt + make_prompt(30, seed=6)
        body = {"prompt": follow_up, "max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
        resp = httpx.post(
            f"{cluster.entry.base_url}/completions", json=body, headers={"X-Request-Id": "fu"}, timeout=60
        )
        assert resp.status_code == 200, resp.text
        # The record is written with the frontend's next results read: wait for it.
        assert wait_until(lambda: bool(asyncio.run(_events(host, port, keys, "cmpl-fu"))), 30)
        events = asyncio.run(_events(host, port, keys, "cmpl-fu"))
        [detail] = [e["detail"] for e in events if e["event"] == "dispatched"]
        assert "kv_blocks=10/10/17" in detail, detail  # 71 tokens: 17 hashed blocks, 10 cached on each
    finally:
        client.close()


async def _events(host: str, port: int, keys: KeySchema, req_id: str) -> list[dict[str, str]]:
    from scheduler.records import find_request

    client = aioredis.Redis(host=host, port=port)
    try:
        return await find_request(client, keys, req_id)
    finally:
        await client.aclose()
