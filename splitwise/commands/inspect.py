"""`splitwise inspect`: what the Redis-coordinated scheduler sees — nodes with role, load and
heartbeat age, queue depths, frontends, dead letters; ``--request ID`` shows one request's lifecycle.

A frontend's "results backlog" is the entries its results stream still holds: each frontend
heartbeat trims exactly what the frontend has read (``XTRIM MINID``), so it counts entries not read
as of that frontend's last heartbeat. Poison (keys of the wrong type, non-numeric fields) is shown
as such (``poison:`` lines, ``problems`` in --json) instead of failing the report.

Read-only: it never writes to Redis. ``--json`` prints one JSON document (for scripts).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from datetime import datetime, timezone
from typing import Any

import click

from scheduler.config import SchedulerConfig, scheduler_options


def _iso(ts_ms: int | str | bytes) -> str:
    from scheduler.poison import parse_int

    try:
        return datetime.fromtimestamp(parse_int(ts_ms) / 1000, tz=timezone.utc).isoformat(
            timespec="milliseconds"
        )
    except (OverflowError, OSError, ValueError):
        return f"invalid time {ts_ms!r}"


async def _read(what: Any, default: Any) -> tuple[Any, str | None]:
    """One read of a key that may hold poison (a wrong type): (answer, None) or (default, reason)."""
    from redis.exceptions import ResponseError

    try:
        return await what, None
    except ResponseError as exc:
        return default, str(exc).split(".")[0]


async def _nodes(client: Any, keys: Any) -> list[dict[str, Any]]:
    from scheduler.errors import MessageDecodeError
    from scheduler.messages import LoadReport, NodeInfo, decode
    from scheduler.poison import parse_int
    from scheduler.registry import booked_load, split_member

    leases: dict[str, tuple[str, int]] = {}
    alive_members, _ = await _read(client.zrange(keys.alive, 0, -1, withscores=True), [])
    for member, score in alive_members:
        node_id, incarnation = split_member(member)
        if node_id not in leases or score > leases[node_id][1]:
            leases[node_id] = (incarnation, int(score))
    booked, _ = await _read(booked_load(client, keys), {})
    server_s, server_us = await client.time()
    now_ms = int(server_s) * 1000 + int(server_us) // 1000
    rows = []
    descriptions, error = await _read(client.hgetall(keys.nodes), {})
    if error is not None:
        rows.append({"node_id": "?", "role": "?", "alive": False, "error": f"{keys.nodes}: {error}"})
    for node_id_b, payload in sorted(descriptions.items()):
        node_id = node_id_b.decode()
        try:
            info = decode(payload, NodeInfo)
        except MessageDecodeError as exc:
            rows.append({"node_id": node_id, "role": "?", "alive": False, "error": str(exc)})
            continue
        incarnation, expiry = leases.get(node_id, ("", 0))
        raw_hb, hb_error = await _read(client.hgetall(keys.heartbeat(node_id)), {})
        hb = {k.decode(): v.decode("utf-8", "replace") for k, v in raw_hb.items()}
        load_fields = {name: str(parse_int(hb.get(name, 0))) for name in LoadReport.__dataclass_fields__}
        alive = incarnation == info.incarnation and expiry > now_ms
        load = booked.get(node_id, {"prefill_tokens": 0, "decode_requests": 0})
        ts_ms = parse_int(hb.get("ts_ms"), -1)
        depth, depth_error = await _read(client.xlen(keys.work(node_id)), 0)
        problems = [e for e in (hb_error, depth_error) if e] + (
            [f"heartbeat ts_ms {hb['ts_ms']!r} is not a number"] if "ts_ms" in hb and ts_ms < 0 else []
        )
        rows.append(
            {
                "node_id": node_id,
                "role": info.role,
                "alive": alive,
                "host": info.host,
                "http_port": info.http_port,
                "pd_comm_port": info.pd_comm_port,
                "model_id": info.model_id,
                "kv": dataclasses.asdict(info.kv),
                "tp_size": info.kv.tp_size,
                "ranks": rank_layout(info.kv),
                "protocols": info.transfer_protocols,
                "incarnation": info.incarnation,
                "heartbeat_age_s": round((now_ms - ts_ms) / 1000, 3) if alive and ts_ms >= 0 else None,
                "lease_left_s": round((expiry - now_ms) / 1000, 3) if alive else None,
                "load": LoadReport.from_fields(load_fields).to_fields(),
                "booked_prefill_tokens": load["prefill_tokens"],
                "booked_decode_requests": load["decode_requests"],
                "queue_depth": depth,
                # drain / role switch (scheduler.node_commands.NodeStatus): state, why, who asked
                "state": hb.get("state", "serving"),
                "state_reason": hb.get("state_reason", ""),
                "state_by": hb.get("state_by", ""),
                "state_target_role": hb.get("state_target_role", ""),
                "state_since": _iso(hb["state_since_ms"])
                if parse_int(hb.get("state_since_ms"), 0) > 0
                else None,
                "problems": problems,
            }
        )
    return rows


def rank_layout(kv: Any) -> list[dict[str, Any]]:
    """Each rank's slice of the node's KV buffer (physical heads; engine.parallel.layout)."""
    per_rank = kv.num_kv_heads // max(1, kv.tp_size)
    return [{"rank": r, "kv_heads": [r * per_rank, (r + 1) * per_rank]} for r in range(max(1, kv.tp_size))]


def pairing(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each live prefill node: the decode nodes it pairs with, or why it pairs with none
    (the scheduler pairs only equal models and KV compat keys)."""
    from splitwise.kv_geometry import KVGeometry

    live = [n for n in nodes if n.get("alive") and "kv" in n]
    decodes = [n for n in live if n["role"] == "decode"]
    rows = []
    for p in (n for n in live if n["role"] == "prefill"):
        p_kv = KVGeometry(**p["kv"])
        partners, reasons = [], []
        for d in decodes:
            why = (
                []
                if d["model_id"] == p["model_id"]
                else [f"model: ours {p['model_id']!r}, peer {d['model_id']!r}"]
            )
            why += p_kv.mismatches(KVGeometry(**d["kv"]))
            if why:
                reasons.append(f"{d['node_id']}: " + "; ".join(why))
            else:
                partners.append(d["node_id"])
        if not decodes:
            reasons.append("no live decode node")
        rows.append({"prefill": p["node_id"], "decode": partners, "why_not": [] if partners else reasons})
    return rows


async def _frontends(client: Any, keys: Any) -> list[dict[str, Any]]:
    server_s, server_us = await client.time()
    now_ms = int(server_s) * 1000 + int(server_us) // 1000
    rows = []
    members, _ = await _read(client.zrange(keys.frontends, 0, -1, withscores=True), [])
    for raw, expiry in members:
        frontend_id = raw.decode()
        backlog, _ = await _read(client.xlen(keys.results(frontend_id)), 0)
        rows.append(
            {
                "frontend_id": frontend_id,
                "alive": expiry > now_ms,
                "lease_left_s": round((expiry - now_ms) / 1000, 3),
                "results_backlog": backlog,
            }
        )
    return sorted(rows, key=lambda r: r["frontend_id"])


async def _dead_letters(client: Any, keys: Any, limit: int) -> dict[str, Any]:
    from scheduler.records import decode_fields

    entries, error = await _read(client.xrevrange(keys.dead_letters, count=limit), [])
    if error is not None:
        return {"count": 0, "recent": [], "error": f"{keys.dead_letters}: {error}"}
    recent = []
    for entry_id, fields in entries:
        payload = fields.get(b"payload", b"")
        text = decode_fields({k: v for k, v in fields.items() if k != b"payload"})
        recent.append(
            {
                "id": entry_id.decode(),
                "source": text.get("source", ""),
                "reason": text.get("reason", ""),
                "time": _iso(text.get("ts_ms", 0)),
                "payload_hex": payload[:48].hex(),
                "payload_bytes": len(payload),
            }
        )
    return {"count": await client.xlen(keys.dead_letters), "recent": recent}


async def _planner(client: Any, keys: Any, limit: int = 10) -> dict[str, Any]:
    """The planner's latest look (None when none runs) and its last decisions, newest first (#16)."""
    from splitwise.planner.record import parse_decisions, parse_state

    state, state_error = await _read(client.hgetall(keys.planner_state), {})
    entries, error = await _read(client.xrevrange(keys.planner, count=limit), [])
    report: dict[str, Any] = {"state": parse_state(state), "decisions": parse_decisions(entries)}
    for row in [report["state"] or {}, *report["decisions"]]:
        if "ts_ms" in row:
            row["time"] = _iso(row["ts_ms"])
    problems = [f"{key}: {e}" for key, e in ((keys.planner_state, state_error), (keys.planner, error)) if e]
    if problems:
        report["problems"] = problems
    return report


async def _request(client: Any, keys: Any, req_id: str) -> dict[str, Any] | None:
    from scheduler.records import find_request

    events = await find_request(client, keys, req_id)
    if not events:
        return None
    state: dict[str, str] = {"state": events[-1]["event"]}
    for event in events:
        event["time"] = _iso(event.get("ts_ms", 0))
        if event["event"] == "dispatched":
            state.update(dict(part.split("=", 1) for part in event["detail"].split() if "=" in part))
            state["prefill"], state["decode"] = state.pop("p", ""), state.pop("d", "")
            state["mode"] = event["detail"].split(" ", 1)[0]  # disagg | mixed | local(<why>)
        elif event["event"] == "decoding":
            state["prefilled_by"] = event.get("detail", "")  # remote prefill | local prefill (...)
    return {"req_id": req_id, "state": state, "events": events}


async def collect(config: SchedulerConfig, *, req_id: str | None, dead_letter_limit: int) -> dict[str, Any]:
    from scheduler.connection import check_server, make_client
    from scheduler.keys import KeySchema

    keys = KeySchema(config.scheduler_topic)
    client = make_client(config)
    try:
        version = await check_server(client, config)
        start = time.perf_counter()
        await client.ping()
        ping_ms = (time.perf_counter() - start) * 1000
        report: dict[str, Any] = {
            "topic": config.scheduler_topic,
            "redis": {
                "address": config.where,
                "version": version,
                "ping_ms": round(ping_ms, 3),
            },
        }
        if req_id is not None:
            report["request"] = await _request(client, keys, req_id)
            return report
        report["nodes"] = await _nodes(client, keys)
        report["pairing"] = pairing(report["nodes"])
        report["frontends"] = await _frontends(client, keys)
        report["dead_letters"] = await _dead_letters(client, keys, dead_letter_limit)
        report["planner"] = await _planner(client, keys)
        return report
    finally:
        await client.aclose()


def _print_text(report: dict[str, Any]) -> None:
    echo = click.echo
    echo(f"topic {report['topic']}  redis {report['redis']['address']}  ping {report['redis']['ping_ms']} ms")
    if "request" in report:
        _print_request(report["request"])
        return
    echo("\nNODES")
    header = (
        f"{'node':<16} {'role':<8} {'state':<9} {'tp':>2} {'alive':<5} {'hb_age_s':>8} {'queue':>5} {'lease_s':>7} "
        f"{'q_prefill_tok':>13} {'running':>7} {'free_blk':>8} {'waiting':>7} {'booked_p':>8} {'booked_d':>8}  model"
    )
    echo(header)
    for n in report["nodes"]:
        if "error" in n:
            echo(f"{n['node_id']:<16} undecodable: {n['error']}")
            continue
        load = n["load"]
        age = "-" if n["heartbeat_age_s"] is None else f"{n['heartbeat_age_s']:.2f}"
        echo(
            f"{n['node_id']:<16} {n['role']:<8} {n['state']:<9} {n['tp_size']:>2} {'yes' if n['alive'] else 'NO':<5} {age:>8} {n['queue_depth']:>5} "
            f"{n['lease_left_s'] or 0:>7} {load['queued_prefill_tokens']:>13} {load['running_requests']:>7} "
            f"{load['free_kv_blocks']:>8} {load['waiting_requests']:>7} {n['booked_prefill_tokens']:>8} "
            f"{n['booked_decode_requests']:>8}  {n['model_id']}"
        )
        if n["state"] != "serving":
            to = f" -> {n['state_target_role']}" if n["state_target_role"] else ""
            echo(
                f"{'':<16} {n['state']}{to} since {n['state_since']}: {n['state_reason']} (by {n['state_by']})"
            )
        for problem in n["problems"]:
            echo(f"{'':<16} poison: {problem}")
        if n["tp_size"] > 1:
            slices = "  ".join(
                f"rank {r['rank']}: KV heads {r['kv_heads'][0]}-{r['kv_heads'][1] - 1}" for r in n["ranks"]
            )
            echo(f"{'':<16} ranks  {slices}")
    echo("\nPAIRING")
    for row in report["pairing"]:
        if row["decode"]:
            echo(f"{row['prefill']:<16} -> {', '.join(row['decode'])}")
        else:
            echo(f"{row['prefill']:<16} -> none: {' | '.join(row['why_not'])}")
    echo("\nFRONTENDS")
    for f in report["frontends"]:
        alive = "alive" if f["alive"] else "LAPSED"
        echo(
            f"{f['frontend_id']:<24} {alive:<6} lease {f['lease_left_s']:>7} s  results backlog {f['results_backlog']}"
        )
    dead = report["dead_letters"]
    echo(f"\nDEAD LETTERS ({dead['count']}){'  ' + dead['error'] if 'error' in dead else ''}")
    for d in dead["recent"]:
        echo(f"{d['time']}  {d['source']:<28} {d['reason']}  ({d['payload_bytes']} bytes)")
    _print_planner(report["planner"])


def _print_planner(planner: dict[str, Any]) -> None:
    echo = click.echo
    state = planner["state"]
    echo("\nPLANNER" + ("" if state else "  (none running)"))
    for problem in planner.get("problems", []):
        echo(f"poison: {problem}")
    if state:
        echo(
            f"{state.get('planner_id', '?')} at {state.get('time', '?')}: {state.get('decision', '?')}, {state.get('reason', '')}"
        )
        echo(f"  signals  {_pairs(state['signals'])}")
    for d in planner["decisions"]:
        target = f" -> {d['target']}" if d.get("target") else ""
        echo(
            f"{d.get('time', '?')}  {d.get('kind', '?'):<14} {d.get('node', '') or '(new)'}{target}  {d.get('outcome', '')}"
        )
        echo(f"{'':<30}why: {d.get('reason', '')}")
        echo(f"{'':<30}signals: " + _pairs(d.get("signals")))


def _pairs(values: Any) -> str:
    return (
        "  ".join(f"{k}={v}" for k, v in sorted(values.items())) if isinstance(values, dict) else str(values)
    )


def _print_request(req: dict[str, Any] | None) -> None:
    if req is None:
        click.echo("no record of this request (never dispatched, or expired from Redis)")
        return
    click.echo(f"request {req['req_id']}")
    for key, value in sorted(req["state"].items()):
        click.echo(f"  {key:<14} {value}")
    click.echo("lifecycle:")
    for e in req["events"]:
        click.echo(f"  {e['time']}  {e.get('event', ''):<13} {e.get('node', ''):<20} {e.get('detail', '')}")


@click.command("inspect")
@scheduler_options
@click.option("--request", "req_id", default=None, help="Show one request's state and lifecycle.")
@click.option(
    "--dead-letters",
    "dead_letter_limit",
    type=int,
    default=20,
    show_default=True,
    help="How many recent dead letters to show.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")
def inspect_cmd(req_id: str | None, dead_letter_limit: int, as_json: bool, **options: Any) -> None:
    """Show the splitwise scheduler's nodes, queues and dead letters (read-only)."""
    try:
        config = SchedulerConfig.from_options(options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    report = asyncio.run(collect(config, req_id=req_id, dead_letter_limit=dead_letter_limit))
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_text(report)
    if req_id is not None and report.get("request") is None:
        raise SystemExit(1)
