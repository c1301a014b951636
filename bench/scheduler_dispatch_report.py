"""The tables bench/scheduler_dispatch.py prints (medians over its rounds)."""

from __future__ import annotations

import statistics

COLUMNS = (
    ("dispatch p50 ms", "dispatch_p50", ".3f"),
    ("p99", "dispatch_p99", ".3f"),
    ("1-token RTT p50 ms", "rtt_p50", ".3f"),
    ("p99", "rtt_p99", ".3f"),
    ("dispatches/s", "dispatch_s", ".0f"),
    ("cmds/req 1 in flight: all", "cmds_req_1", ".1f"),
    ("requests only", "req_cmds_1", ".1f"),
    ("cmds/req loaded: all", "cmds_req_n", ".1f"),
    ("requests only", "req_cmds_n", ".1f"),
    ("background cmds/s", "background_cmds_s", ".0f"),
    ("Redis us per script call", "script_us", ".1f"),
    ("Redis CPU ms/req (1)", "cpu_ms_req_1", ".3f"),
    ("(loaded)", "cpu_ms_req_n", ".3f"),
    ("frontend CPU ms/req (loaded)", "fe_cpu_ms_req_n", ".3f"),
    ("node hosts CPU ms/req (loaded)", "nodes_cpu_ms_req_n", ".3f"),
    ("load avg", "load_avg", ".1f"),
)


def print_table(results: dict[tuple[str, int], list[dict[str, float]]], sizes: list[int]) -> None:
    """Medians over the rounds: first the done-when table of issue #12, then the details. 'requests
    only' subtracts the background command rate (heartbeats, idle blocking reads) measured in a 2 s
    window without requests, times the phase's duration."""

    def med(name: str, n: int, key: str) -> float:
        runs = results.get((name, n), [])
        return statistics.median(r[key] for r in runs) if runs else float("nan")

    base = sizes[0]
    print(
        f"\n| nodes | load avg | dispatches/s old | new | new/old | dispatch p50 ms old | new "
        f"| new p50 / new p50 @{base} | cmds/req old | new | new, background included |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        old_s, new_s = med("old", n, "dispatch_s"), med("new", n, "dispatch_s")
        load = statistics.median(r["load_avg"] for name in ("old", "new") for r in results.get((name, n), []))
        print(
            f"| {n} | {load:.1f} | {old_s:.0f} | {new_s:.0f} | x{new_s / old_s:.2f} "
            f"| {med('old', n, 'dispatch_p50'):.3f} | {med('new', n, 'dispatch_p50'):.3f} "
            f"| {med('new', n, 'dispatch_p50') / med('new', base, 'dispatch_p50'):.2f} "
            f"| {med('old', n, 'req_cmds_n'):.1f} | {med('new', n, 'req_cmds_n'):.1f} "
            f"| {med('new', n, 'cmds_req_n'):.1f} |"
        )
    print(
        "\n(cmds/req: every command Redis ran in the loaded phase (script internals included) per "
        "request, less the idle background rate (heartbeats, idle reads) times the phase's length; "
        "'background included': without that subtraction; load avg: the machine's 1-minute load "
        "average during the cases)"
    )
    print("\n| nodes | impl | " + " | ".join(title for title, _k, _f in COLUMNS) + " |")
    print("|---:|---|" + "---:|" * len(COLUMNS))
    for n in sizes:
        for name in ("old", "new"):
            if (name, n) in results:
                cells = " | ".join(format(med(name, n, key), fmt) for _t, key, fmt in COLUMNS)
                print(f"| {n} | {name} | {cells} |")
