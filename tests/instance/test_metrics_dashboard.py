"""The shipped Grafana dashboard against Grafana's dashboard schema and against the /metrics of a
real 1P1D cluster; and the vLLM-named metrics a request leaves on the prefill and decode node."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard
from prometheus_client.parser import text_string_to_metric_families

from splitwise.cluster import Child, LocalCluster
from tests.instance.helpers import complete, start_cluster

DASHBOARD = Path(__file__).resolve().parents[2] / "docker" / "grafana" / "dashboards" / "splitwise.json"

# What Grafana needs to load and draw a dashboard (its schema, dashboard.cue, marks almost every
# field optional; these are the ones without which a panel is dropped or shows "No data"): a title
# and schemaVersion; panels with a unique id, a type and a grid position; every query panel with
# a Prometheus target whose refId is unique in the panel and whose expr is not empty.
_GRID = {
    "type": "object",
    "required": ["h", "w", "x", "y"],
    "properties": {k: {"type": "integer", "minimum": 0} for k in ("h", "w", "x", "y")},
}
_TARGET = {
    "type": "object",
    "required": ["refId", "expr", "datasource"],
    "properties": {"refId": {"type": "string", "minLength": 1}, "expr": {"type": "string", "minLength": 1}},
}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "minLength": 1, "maxLength": 40},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "panels": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "type", "title", "gridPos"],
                "properties": {"id": {"type": "integer"}, "gridPos": _GRID},
                "if": {"properties": {"type": {"const": "row"}}},
                "then": {"required": ["panels"]},
                "else": {
                    "required": ["datasource", "targets"],
                    "properties": {"targets": {"type": "array", "minItems": 1, "items": _TARGET}},
                },
            },
        },
    },
}

_METRIC = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)")


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target and of every query variable."""
    found = [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            found.append((f"${var['name']}", var["query"]["query"]))
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (every selector here carries braces)."""
    return set(_METRIC.findall(expr)) | set(_LABEL_VALUES.findall(expr))


def test_metric_names_parse_out_of_promql() -> None:
    expr = 'sum(rate(vllm:a_total{x="1"}[5m])) / sum(rate(splitwise_b_bucket {y=~"$v"}[1m]))'
    assert metric_names(expr) == {"vllm:a_total", "splitwise_b_bucket"}
    assert metric_names("label_values(vllm:num_requests_running, role)") == {"vllm:num_requests_running"}


def test_dashboard_passes_grafanas_schema() -> None:
    dash = _dashboard()
    jsonschema.validate(dash, SCHEMA)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    # Grafana's own schema types (grafana-foundation-sdk, generated from Grafana's dashboard
    # schema) keep exactly the fields Grafana knows: a field that does not survive the round trip
    # is misspelt or not part of the schema.
    decoded = json.loads(JSONEncoder(sort_keys=True).encode(Dashboard.from_json(dash)))
    assert _missing(dash, decoded) == []


def test_schema_check_rejects_a_broken_dashboard() -> None:
    dash = _dashboard()
    del dash["panels"][1]["targets"][0]["expr"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dash, SCHEMA)
    dash = _dashboard()
    dash["panels"][1]["gridPoss"] = dash["panels"][1]["gridPos"]
    decoded = json.loads(JSONEncoder(sort_keys=True).encode(Dashboard.from_json(dash)))
    assert _missing(dash, decoded) == ["/panels[1]/gridPoss"]


def _missing(written: Any, decoded: Any, path: str = "") -> list[str]:
    if isinstance(written, dict):
        missing = []
        for key, value in written.items():
            if key not in decoded:
                missing.append(f"{path}/{key}")
            else:
                missing += _missing(value, decoded[key], f"{path}/{key}")
        return missing
    if isinstance(written, list):
        return [
            m
            for i, (a, b) in enumerate(zip(written, decoded, strict=True))
            for m in _missing(a, b, f"{path}[{i}]")
        ]
    return [] if written == decoded else [f"{path} ({written!r} != {decoded!r})"]


def test_compose_monitoring_profile_scrapes_the_instances() -> None:
    docker = DASHBOARD.parents[2]
    compose = yaml.safe_load((docker / "compose.yaml").read_text())["services"]
    for name in ("prometheus", "grafana"):
        assert compose[name]["profiles"] == ["monitoring"]
    assert "profiles" not in compose["prefill"] and "profiles" not in compose["decode"]
    scrape = yaml.safe_load((docker / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    targets = {t: c["labels"]["role"] for job in scrape for c in job["static_configs"] for t in c["targets"]}
    for role in ("prefill", "decode"):
        command = compose[role]["command"]
        port = command[command.index("--port") + 1]
        assert targets[f"{role}:{port}"] == role
    mounts = compose["grafana"]["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
    provider = yaml.safe_load(
        (docker / "grafana" / "provisioning" / "dashboards" / "splitwise.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


# --- against a real 1P1D cluster -------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tiny_model: Path) -> Iterator[LocalCluster]:
    c = start_cluster(tiny_model, num_prefill=1, num_decode=1, transfer="ipc")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def scraped(cluster: LocalCluster) -> dict[str, list[Any]]:
    """One request through P/D, then every instance's metric families by role."""
    complete(cluster.entry.base_url, "metrics for the dashboard " * 4, max_tokens=5)
    return {child.role: _families(child) for child in cluster.children}


def _families(child: Child) -> list[Any]:
    text = httpx.get(child.base_url.removesuffix("/v1") + "/metrics", timeout=20).text
    assert "_created" not in text
    return list(text_string_to_metric_families(text))


def _exposed_names(families: list[Any]) -> set[str]:
    """Sample names a family can have, also for labelled families with no sample yet."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    return {f.name + s for f in families for s in suffixes.get(f.type, [""])}


def _value(families: list[Any], name: str, **labels: str) -> float:
    return sum(
        s.value
        for f in families
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_every_dashboard_query_names_an_exposed_metric(scraped: dict[str, list[Any]]) -> None:
    exposed = set().union(*(_exposed_names(fams) for fams in scraped.values()))
    for title, expr in _queries(_dashboard()):
        names = metric_names(expr)
        assert names, f"{title}: no metric name in {expr!r}"
        assert names <= exposed, f"{title}: {sorted(names - exposed)} not on /metrics"


def test_vllm_names_carry_model_name(scraped: dict[str, list[Any]]) -> None:
    for role, families in scraped.items():
        for family in families:
            if family.name.startswith("vllm:"):
                assert all("model_name" in s.labels for s in family.samples), (role, family.name)


def test_one_request_lands_in_the_vllm_metrics(scraped: dict[str, list[Any]]) -> None:
    p, d = scraped["prefill"], scraped["decode"]
    # P ran the prefill (queue + prefill phases, its steps); D decoded and finished the request.
    assert _value(p, "vllm:request_prefill_time_seconds_count") >= 1
    assert _value(p, "vllm:request_queue_time_seconds_count") >= 1
    assert _value(p, "vllm:iteration_tokens_total_count") >= 1
    assert _value(p, "vllm:request_success_total") == 0  # D counts the request, not P
    assert _value(d, "vllm:request_success_total", finished_reason="length") >= 1
    assert _value(d, "vllm:request_decode_time_seconds_count") >= 1
    assert _value(d, "vllm:request_prefill_time_seconds_count") == 0  # prefilled on P
    assert _value(p, "splitwise_kv_transfer_latency_seconds_count", protocol="ipc") >= 1
    assert _value(d, "vllm:cache_config_info", enable_prefix_caching="True") == 1
    assert sum(_value(f, "vllm:time_to_first_token_seconds_count") for f in scraped.values()) == 1
