"""`splitwise inspect` through the real console script against a live simulated cluster."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from scheduler_support import REPO_ROOT, cluster, run

from scheduler.config import SchedulerConfig
from scheduler.messages import Finished, SubmitRequest

SPLITWISE = str(Path(sys.executable).with_name("splitwise"))


async def _inspect(config: SchedulerConfig, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        SPLITWISE,
        "inspect",
        "--scheduler-port",
        str(config.scheduler_port),
        "--scheduler-topic",
        config.scheduler_topic,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


def test_inspect_shows_nodes_queues_dead_letters_and_a_request(config: SchedulerConfig) -> None:
    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("p0", "prefill")
            await c.add_node("d0", "decode")
            await c.add_node("m-idle", "mixed", serve=False, model_id="other-model")
            fe = await c.add_frontend()
            msgs = await (
                await fe.submit(SubmitRequest(req_id="req-1", prompt_token_ids=[1, 2, 3]))
            ).collect()
            assert isinstance(msgs[-1], Finished)
            idle_fe = await c.add_frontend(model_id="other-model")
            await idle_fe.submit(SubmitRequest(req_id="queued-1", prompt_token_ids=[1] * 40))
            await fe._client.xadd(fe.keys.results(fe.frontend_id), {"m": b"\xffpoison"})
            await asyncio.sleep(0.3)  # let the frontend dead-letter it and every node heartbeat
            await fe.flush_records()

            code, out, err = await _inspect(config, "--json")
            assert code == 0, err
            report = json.loads(out)
            nodes = {n["node_id"]: n for n in report["nodes"]}
            assert {nid: n["role"] for nid, n in nodes.items()} == {
                "p0": "prefill",
                "d0": "decode",
                "m-idle": "mixed",
            }
            assert all(n["alive"] and n["heartbeat_age_s"] < 5 for n in nodes.values())
            assert nodes["m-idle"]["booked_prefill_tokens"] == 40  # booked until it ends
            assert nodes["d0"]["queue_depth"] == 0
            assert report["dead_letters"]["count"] == 1
            assert report["dead_letters"]["recent"][0]["source"].startswith("results:")
            assert {f["frontend_id"] for f in report["frontends"]} == {fe.frontend_id, idle_fe.frontend_id}

            code, out, err = await _inspect(config, "--request", "req-1", "--json")
            assert code == 0, err
            req = json.loads(out)["request"]
            events = [e["event"] for e in req["events"]]
            assert events[0] == "dispatched" and events[-1] == "finished"
            assert {"received", "prefilled", "transferred", "decoding"} <= set(events)
            assert req["state"]["prefill"] == "p0" and req["state"]["decode"] == "d0"

            code, out, _ = await _inspect(config)
            assert code == 0 and "NODES" in out and "m-idle" in out and "DEAD LETTERS (1)" in out
            code, out, _ = await _inspect(config, "--request", "req-1")
            assert code == 0 and "prefilled" in out and "lifecycle:" in out
            code, out, _ = await _inspect(config, "--request", "nope")
            assert code == 1 and "no record" in out

    run(body())


def test_inspect_reports_unreachable_redis_clearly(config: SchedulerConfig, redis_server) -> None:  # type: ignore[no-untyped-def]
    redis_server.stop()
    code, _out, err = run(_inspect(config, "--json"))
    assert code == 1 and "cannot reach Redis" in err and "--scheduler-host" in err


def test_results_backlog_counts_only_unread_entries(config: SchedulerConfig) -> None:
    """Entries the frontend already read are trimmed at its next heartbeat (exact MINID), so the
    backlog inspect shows drops to 0 once the results are consumed (issue #13, item 9)."""
    from splitwise.commands.inspect import collect

    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("m0", "mixed")
            fe = await c.add_frontend()
            for i in range(5):
                msgs = await (
                    await fe.submit(SubmitRequest(req_id=f"r{i}", prompt_token_ids=[1, 2]))
                ).collect()
                assert isinstance(msgs[-1], Finished)

            async def backlog() -> int:
                report = await collect(config, req_id=None, dead_letter_limit=1)
                [row] = [f for f in report["frontends"] if f["frontend_id"] == fe.frontend_id]
                return int(row["results_backlog"])

            deadline = asyncio.get_running_loop().time() + 10
            while await backlog() != 0:
                assert asyncio.get_running_loop().time() < deadline, await backlog()
                await asyncio.sleep(0.05)

    run(body())


def test_results_backlog_is_exact_between_heartbeats(config: SchedulerConfig) -> None:
    """inspect counts the entries a frontend has not handled as of the inspect itself, not as of
    its last heartbeat: the frontend's reader records the last entry it handled with every read,
    and entries up to it are not backlog even while the stream still holds them (the heartbeat
    trims them later)."""
    from splitwise.commands.inspect import collect

    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("m0", "mixed")
            fe = await c.add_frontend()
            for i in range(5):
                msgs = await (
                    await fe.submit(SubmitRequest(req_id=f"r{i}", prompt_token_ids=[1, 2]))
                ).collect()
                assert isinstance(msgs[-1], Finished)
            client, keys = fe._client, fe.keys

            async def backlogs() -> dict[str, int]:
                report = await collect(config, req_id=None, dead_letter_limit=1)
                return {f["frontend_id"]: int(f["results_backlog"]) for f in report["frontends"]}

            # A frontend whose reader is stuck: 3 entries in its stream, none handled, then 1.
            await client.zadd(keys.frontends, {"fe-stuck": 2**50})
            ids = [await client.xadd(keys.results("fe-stuck"), {"m0": b"x"}) for _ in range(3)]
            assert (await backlogs())["fe-stuck"] == 3  # no position recorded: all unread
            await client.set(keys.results_read("fe-stuck"), ids[0])
            assert (await backlogs())["fe-stuck"] == 2  # the handled, untrimmed entry is not counted
            # The live frontend's reader records where it stands with its next read.
            [(last_id, _)] = await client.xrevrange(keys.results(fe.frontend_id), count=1)
            deadline = asyncio.get_running_loop().time() + 10
            while _stream_id(await client.get(keys.results_read(fe.frontend_id))) < _stream_id(last_id):
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
            assert (await backlogs())[fe.frontend_id] == 0

    run(body())


def _stream_id(raw: bytes | None) -> tuple[int, int]:
    millis, _, seq = (raw or b"0-0").decode().partition("-")
    return int(millis), int(seq)
