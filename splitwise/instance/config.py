"""Frozen, validated configuration of one instance (`splitwise serve`). Errors name the flag."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from scheduler.config import SchedulerConfig
from splitwise.codes import PROTOCOLS as TRANSFER_PROTOCOLS
from splitwise.codes import ROLES
from splitwise.engine.config import EngineConfig
from splitwise.instance.host_identity import is_wildcard

PD_FALLBACKS = ("local", "fail")


def parse_ports(value: str | None, flag: str) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        ports = tuple(int(p) for p in value.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"{flag}: {value!r} is not a comma list of port numbers") from None
    bad = [p for p in ports if not 0 <= p < 65536]
    if bad:
        raise ValueError(f"{flag}: {bad} are not TCP ports")
    return ports


@dataclass(frozen=True)
class InstanceConfig:
    engine: EngineConfig
    scheduler: SchedulerConfig
    role: str = "mixed"
    host: str = "127.0.0.1"  # bind address of every listener
    # What peers are told to connect to (NodeInfo, transport endpoints). None: ``host``, which must
    # then not be a wildcard (`splitwise serve` fills it in with a routable address).
    advertise_host: str | None = None
    port: int = 0  # HTTP; 0 = a free port, reported at start
    metrics_port: int | None = None  # None: /metrics on the HTTP port only
    pd_comm_port: int = 0
    cache_transfer_protocols: tuple[str, ...] = ("ipc", "tcp")
    rdma_comm_ports: tuple[int, ...] = ()
    kv_transfer_port: int = 0  # the tcp transport's listener on a decode node
    cluster_token: str | None = None
    api_key: str | None = None
    max_request_bytes: int = 8 * 1024 * 1024  # HTTP bodies above this are a 413 before parsing
    tool_call_parser: str | None = None  # "auto" tool choice: hermes | llama3_json (splitwise/api/tools.py)
    served_model_name: str | None = None
    pd_fallback: str = "local"  # P lost / transfer failed: "local" prefill on D, or "fail" the request
    transfer_timeout_s: float = 60.0
    # SIGTERM drains: running work may finish for this long, then it is handed back (a second
    # SIGTERM stops at once). See splitwise/instance/drain.py.
    drain_grace_period_s: float = 30.0
    max_waiting_for_blocks: int = 256  # decode: bounded queue of requests waiting for KV blocks
    decode_headroom_tokens: int = 16  # decode: reserve prompt + this many tokens of KV up front
    # decode: start a reservation with the prompt's blocks already in D's prefix cache, so P ships
    # only the rest (--decode-prefix-reuse; the CLI's default is on, the dataclass's off).
    decode_prefix_reuse: bool = False
    # Hidden benchmark knob (prefill side): ship all layers only after the prefill finished instead
    # of layer by layer (bench/pd_ttft.py measures what pipelining hides).
    pipelined_transfer: bool = True
    node_id: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    # rdma QP addressing (None: the env names in rdma.resources.ENV_FALLBACKS, then defaults).
    rdma_gid_index: int | None = None
    rdma_traffic_class: int | None = None
    rdma_service_level: int | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"--splitwise-role: {self.role!r} is not one of {list(ROLES)}")
        if self.role != "mixed" and self.scheduler.scheduler_name != "splitwise":
            raise ValueError(
                f"--splitwise-role {self.role} needs --scheduler-name splitwise (the local scheduler serves one mixed instance)"
            )
        for flag, port in (
            ("--port", self.port),
            ("--pd-comm-port", self.pd_comm_port),
            ("--kv-transfer-port", self.kv_transfer_port),
        ):
            if not 0 <= port < 65536:
                raise ValueError(f"{flag}: {port} is not a TCP port")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"--metrics-port: {self.metrics_port} is not a TCP port")
        if is_wildcard(self.advertised_host):
            raise ValueError(
                f"--advertise-host: {self.advertised_host!r} is not an address peers can connect to "
                f"(--host {self.host} binds every interface; advertise this node's routable address)"
            )
        bad = [p for p in self.cache_transfer_protocols if p not in TRANSFER_PROTOCOLS]
        if bad or not self.cache_transfer_protocols:
            raise ValueError(
                f"--cache-transfer-protocol: {list(self.cache_transfer_protocols)} must be some of {list(TRANSFER_PROTOCOLS)}"
            )
        if self.pd_fallback not in PD_FALLBACKS:
            raise ValueError(f"--pd-fallback: {self.pd_fallback!r} is not one of {list(PD_FALLBACKS)}")
        if self.transfer_timeout_s <= 0:
            raise ValueError(f"--transfer-timeout: {self.transfer_timeout_s} must be > 0 seconds")
        if self.drain_grace_period_s < 0:
            raise ValueError(f"--drain-grace-period: {self.drain_grace_period_s} must be >= 0 seconds")
        if self.max_request_bytes < 1:
            raise ValueError(f"--max-request-bytes: {self.max_request_bytes} must be >= 1")
        if self.max_waiting_for_blocks < 1:
            raise ValueError(f"--max-waiting-for-blocks: {self.max_waiting_for_blocks} must be >= 1")
        for flag, value, high in (
            ("--rdma-gid-index", self.rdma_gid_index, 255),
            ("--rdma-traffic-class", self.rdma_traffic_class, 255),
            ("--rdma-service-level", self.rdma_service_level, 15),
        ):
            if value is not None and not 0 <= value <= high:
                raise ValueError(f"{flag}: {value} is not in 0..{high}")
        if self.decode_headroom_tokens < 0:
            raise ValueError(f"--decode-headroom-tokens: {self.decode_headroom_tokens} must be >= 0")

    def transport_extra(self) -> dict[str, str]:
        """``TransportOptions.extra``: ``extra`` plus the rdma flags that were given."""
        out = dict(self.extra)
        for key, value in (
            ("rdma_gid_index", self.rdma_gid_index),
            ("rdma_traffic_class", self.rdma_traffic_class),
            ("rdma_service_level", self.rdma_service_level),
        ):
            if value is not None:
                out[key] = str(value)
        return out

    @property
    def advertised_host(self) -> str:
        return self.advertise_host if self.advertise_host is not None else self.host

    @property
    def model_id(self) -> str:
        return self.served_model_name or os.path.basename(os.path.normpath(self.engine.model))

    def with_engine(self, **changes: object) -> InstanceConfig:
        return dataclasses.replace(self, engine=dataclasses.replace(self.engine, **changes))  # type: ignore[arg-type]
