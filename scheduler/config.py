"""Frozen, validated scheduler configuration and the reusable click options that build it.

Flag names follow FastDeploy (``--scheduler-name``, ``--scheduler-host``, ...) so operators can
carry their command lines over. Validation raises ``ValueError`` naming the flag.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import click

SCHEDULER_NAMES = ("splitwise", "local")


@dataclass(frozen=True)
class SchedulerConfig:
    scheduler_name: str = "splitwise"
    scheduler_host: str = "127.0.0.1"
    scheduler_port: int = 6379
    scheduler_db: int = 0
    scheduler_password: str | None = None
    scheduler_topic: str = "splitwise"
    scheduler_ttl_s: float = 900.0
    scheduler_tls: bool = False
    scheduler_tls_ca_certs: str | None = None
    # Redis deployment: one server (default), a Redis Cluster (any node as the seed), or Sentinels.
    scheduler_cluster: bool = False
    scheduler_sentinel: str | None = None  # "host:port,host:port"
    scheduler_sentinel_service: str = "mymaster"
    heartbeat_interval_s: float = 1.0
    dead_after_missed: int = 3
    max_redispatch: int = 2
    dead_letter_ttl_s: float = 86400.0
    # How long one blocking read waits before the loop re-checks for shutdown.
    block_ms: int = 1000
    # Result/ctl streams are capped (approximately) so an absent reader cannot grow them unbounded.
    stream_maxlen: int = 100_000
    # The request log ({t}:log) keeps about this many entries (each holds one or more requests).
    log_maxlen: int = 100_000
    # Conditional disaggregation (#15): the decode node prefills locally when the prompt's uncached
    # part is shorter than this many tokens (0: never), or when every prefill node's booked prompt
    # tokens exceed ``disagg_max_prefill_queue`` (0: never; then a group without a live prefill
    # node is also served by its decode nodes alone). The dataclass defaults are off; the CLI's
    # default for the first is DISAGG_MIN_PREFILL_TOKENS_DEFAULT (measured, docs/benchmarks.md).
    disagg_min_prefill_tokens: int = 0
    disagg_max_prefill_queue: int = 0
    # KV-aware routing (#15; scripts.DISPATCH documents the formula): how much a candidate's cached
    # prefix lowers its load score. 0: load only. The CLI's defaults are 1.0 (prefill), 2.0 (decode).
    kv_overlap_weight_prefill: float = 0.0
    kv_overlap_weight_decode: float = 0.0
    # Sticky by prefix: a prefill node holding the longest cached prefix wins while it is booked at
    # most this many tokens more than the least-booked one (0: the score alone decides). The CLI's
    # default is KV_PREFILL_BALANCE_TOKENS_DEFAULT.
    kv_prefill_balance_tokens: int = 0

    def __post_init__(self) -> None:
        if self.scheduler_name not in SCHEDULER_NAMES:
            raise ValueError(
                f"--scheduler-name: {self.scheduler_name!r} is not one of {list(SCHEDULER_NAMES)}"
            )
        if not 0 < self.scheduler_port < 65536:
            raise ValueError(f"--scheduler-port: {self.scheduler_port} is not a TCP port")
        if self.scheduler_db < 0:
            raise ValueError(f"--scheduler-db: must be >= 0, got {self.scheduler_db}")
        topic = self.scheduler_topic
        if not topic or any(c in topic for c in "{}: \t\n*?[]"):
            raise ValueError(
                f"--scheduler-topic: {topic!r} must be non-empty without braces, colons, spaces or glob chars"
            )
        # (flag, value, smallest allowed, strictly greater?)
        bounds: list[tuple[str, float, float, bool]] = [
            ("--scheduler-ttl", self.scheduler_ttl_s, 0, True),
            ("--scheduler-heartbeat-interval", self.heartbeat_interval_s, 0, True),
            ("--scheduler-dead-after-missed", self.dead_after_missed, 1, False),
            ("--max-redispatch", self.max_redispatch, 0, False),
            ("--scheduler-dead-letter-ttl", self.dead_letter_ttl_s, 0, True),
            ("block_ms", self.block_ms, 1, False),
            ("--disagg-min-prefill-tokens", self.disagg_min_prefill_tokens, 0, False),
            ("--disagg-max-prefill-queue", self.disagg_max_prefill_queue, 0, False),
            ("--kv-overlap-weight-prefill", self.kv_overlap_weight_prefill, 0, False),
            ("--kv-overlap-weight-decode", self.kv_overlap_weight_decode, 0, False),
            ("--kv-prefill-balance-tokens", self.kv_prefill_balance_tokens, 0, False),
        ]
        for flag, value, low, strict in bounds:
            if value < low or (strict and value == low):
                raise ValueError(f"{flag}: must be {'>' if strict else '>='} {low}, got {value}")
        if self.scheduler_tls_ca_certs and not self.scheduler_tls:
            raise ValueError("--scheduler-tls-ca-certs: needs --scheduler-tls")
        if self.scheduler_cluster and self.scheduler_sentinel:
            raise ValueError("--scheduler-cluster and --scheduler-sentinel: choose one")
        if self.scheduler_sentinel is not None:
            self.sentinel_addresses()  # validates

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """``--scheduler-sentinel host:port,host:port`` as a list; ValueError naming the flag."""
        out = []
        for part in (self.scheduler_sentinel or "").split(","):
            host, _, port = part.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"--scheduler-sentinel: {part!r} is not host:port")
            out.append((host, int(port)))
        return out

    @property
    def where(self) -> str:
        """Human-readable address for error messages."""
        if self.scheduler_sentinel:
            return f"sentinel {self.scheduler_sentinel} service {self.scheduler_sentinel_service}"
        kind = "cluster seed " if self.scheduler_cluster else ""
        return f"{kind}{self.scheduler_host}:{self.scheduler_port}"

    @property
    def ttl_ms(self) -> int:
        return int(self.scheduler_ttl_s * 1000)

    @property
    def dead_after_ms(self) -> int:
        """A node whose heartbeat key is older than this is dead (the key's PX expiry)."""
        return int(self.heartbeat_interval_s * self.dead_after_missed * 1000)

    @property
    def dead_letter_ttl_ms(self) -> int:
        return int(self.dead_letter_ttl_s * 1000)

    @classmethod
    def from_options(cls, options: dict[str, Any], **overrides: Any) -> SchedulerConfig:
        """Build from the keyword arguments click passes for ``@scheduler_options`` (others ignored)."""
        mapping = {
            "scheduler_name": "scheduler_name",
            "scheduler_host": "scheduler_host",
            "scheduler_port": "scheduler_port",
            "scheduler_db": "scheduler_db",
            "scheduler_password": "scheduler_password",
            "scheduler_topic": "scheduler_topic",
            "scheduler_ttl": "scheduler_ttl_s",
            "scheduler_tls": "scheduler_tls",
            "scheduler_tls_ca_certs": "scheduler_tls_ca_certs",
            "scheduler_heartbeat_interval": "heartbeat_interval_s",
            "scheduler_dead_after_missed": "dead_after_missed",
            "max_redispatch": "max_redispatch",
            "scheduler_cluster": "scheduler_cluster",
            "scheduler_sentinel": "scheduler_sentinel",
            "scheduler_sentinel_service": "scheduler_sentinel_service",
            "disagg_min_prefill_tokens": "disagg_min_prefill_tokens",
            "disagg_max_prefill_queue": "disagg_max_prefill_queue",
            "kv_overlap_weight_prefill": "kv_overlap_weight_prefill",
            "kv_overlap_weight_decode": "kv_overlap_weight_decode",
            "kv_prefill_balance_tokens": "kv_prefill_balance_tokens",
        }
        kwargs = {field: options[opt] for opt, field in mapping.items() if options.get(opt) is not None}
        if options.get("scheduler_password_file"):
            kwargs["scheduler_password"] = read_password_file(
                str(options["scheduler_password_file"]),
                also_given=options.get("scheduler_password") is not None,
            )
        if options.get("scheduler_url"):
            kwargs.update(parse_scheduler_url(str(options["scheduler_url"])))
        kwargs.update(overrides)
        return cls(**kwargs)


def parse_scheduler_url(url: str) -> dict[str, Any]:
    """``redis://[:pw@]host:port[/db]``, ``rediss://...`` (TLS), ``redis+cluster://host:port`` or
    ``redis+sentinel://[:pw@]h1:p1,h2:p2/service[/db]`` as SchedulerConfig fields."""
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in ("redis", "rediss", "redis+cluster", "redis+sentinel"):
        raise ValueError(
            f"--scheduler-url: {url!r} must start with redis://, rediss://, redis+cluster:// or redis+sentinel://"
        )
    out: dict[str, Any] = {"scheduler_tls": scheme == "rediss"}
    netloc = parts.netloc
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        password = unquote(auth.split(":", 1)[-1])
        if password:
            out["scheduler_password"] = password
    path = [p for p in parts.path.split("/") if p]
    if scheme == "redis+sentinel":
        if not path:
            raise ValueError(f"--scheduler-url: {url!r} names no sentinel service (…/mymaster)")
        out["scheduler_sentinel"] = netloc
        out["scheduler_sentinel_service"] = path.pop(0)
    else:
        host, _, port = netloc.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--scheduler-url: {url!r} has no host:port")
        out["scheduler_host"], out["scheduler_port"] = host.strip("[]"), int(port)
        out["scheduler_cluster"] = scheme == "redis+cluster"
    if path:
        if not path[0].isdigit():
            raise ValueError(f"--scheduler-url: database {path[0]!r} is not a number")
        out["scheduler_db"] = int(path[0])
    return out


F = TypeVar("F", bound=Callable[..., Any])

# Below this many uncached prompt tokens the P/D hand-off costs more than prefilling on D
# (measured on the development machine; docs/benchmarks.md, "Conditional disaggregation").
DISAGG_MIN_PREFILL_TOKENS_DEFAULT = 32
# A decode node holding the whole prefix is worth 2 booked requests: with 1, a D one request busier
# never won even with the prefix, and the multi-turn bench reused only 0.75 of the ideal on D
# (docs/benchmarks.md); one more request in a decode batch costs far less than shipping the prefix.
KV_OVERLAP_WEIGHT_DECODE_DEFAULT = 2.0
# One engine step's token budget (--max-num-batched-tokens' default): a prefill node at most this
# much busier than the least-booked one starts a request within about one step (docs/benchmarks.md).
KV_PREFILL_BALANCE_TOKENS_DEFAULT = 2048

# (flag, click kwargs). Defaults repeat the dataclass defaults so --help shows them.
_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    (
        "--scheduler-name",
        {
            "type": click.Choice(SCHEDULER_NAMES),
            "default": "splitwise",
            "help": "splitwise: Redis-coordinated P/D; local: in-process, one mixed instance.",
        },
    ),
    ("--scheduler-host", {"default": "127.0.0.1", "help": "Redis host."}),
    ("--scheduler-port", {"type": int, "default": 6379, "help": "Redis port."}),
    ("--scheduler-db", {"type": int, "default": 0, "help": "Redis database number."}),
    (
        "--scheduler-password",
        {
            "default": None,
            "envvar": "SPLITWISE_SCHEDULER_PASSWORD",
            "help": "Redis password. A flag is visible in the process list: prefer env "
            "SPLITWISE_SCHEDULER_PASSWORD or --scheduler-password-file.",
        },
    ),
    (
        "--scheduler-password-file",
        {
            "default": None,
            "envvar": "SPLITWISE_SCHEDULER_PASSWORD_FILE",
            "help": "Read the Redis password from this file (first line), e.g. a mounted secret.",
        },
    ),
    ("--scheduler-topic", {"default": "splitwise", "help": "Key prefix; one topic = one cluster."}),
    ("--scheduler-ttl", {"type": float, "default": 900.0, "help": "Request TTL and key expiry, seconds."}),
    ("--scheduler-tls/--no-scheduler-tls", {"default": False, "help": "Connect to Redis over TLS."}),
    ("--scheduler-tls-ca-certs", {"default": None, "help": "CA bundle for --scheduler-tls."}),
    (
        "--scheduler-url",
        {
            "default": None,
            "help": "redis://h:p/db, rediss://, redis+cluster://h:p or redis+sentinel://h:p,h:p/service "
            "(overrides host/port/db/cluster/sentinel).",
        },
    ),
    (
        "--scheduler-cluster/--no-scheduler-cluster",
        {"default": False, "help": "Redis Cluster: --scheduler-host/port is any node of it."},
    ),
    ("--scheduler-sentinel", {"default": None, "help": "Sentinels host:port,host:port (Redis Sentinel)."}),
    ("--scheduler-sentinel-service", {"default": "mymaster", "help": "Sentinel master name."}),
    (
        "--scheduler-heartbeat-interval",
        {"type": float, "default": 1.0, "help": "Heartbeat period of nodes and frontends, seconds."},
    ),
    (
        "--scheduler-dead-after-missed",
        {"type": int, "default": 3, "help": "Missed heartbeats before a lease lapses (node or frontend)."},
    ),
    ("--max-redispatch", {"type": int, "default": 2, "help": "Re-dispatches of a request after node loss."}),
    (
        "--disagg-min-prefill-tokens",
        {
            "type": int,
            "default": DISAGG_MIN_PREFILL_TOKENS_DEFAULT,
            "help": "Prefill on the decode node when fewer prompt tokens than this are uncached (0: never).",
        },
    ),
    (
        "--disagg-max-prefill-queue",
        {
            "type": int,
            "default": 0,
            "help": "Prefill on the decode node when every prefill node has more booked prompt tokens "
            "than this, or none is live (0: never).",
        },
    ),
    (
        "--kv-overlap-weight-prefill",
        {
            "type": float,
            "default": 1.0,
            "help": "KV-aware routing: prompt tokens a prefill node's cached prefix takes off its "
            "booked load, per cached token (0: load only).",
        },
    ),
    (
        "--kv-overlap-weight-decode",
        {
            "type": float,
            "default": KV_OVERLAP_WEIGHT_DECODE_DEFAULT,
            "help": "KV-aware routing: booked requests a decode node holding the whole prompt prefix "
            "is worth (scaled by the cached fraction; 0: load only).",
        },
    ),
    (
        "--kv-prefill-balance-tokens",
        {
            "type": int,
            "default": KV_PREFILL_BALANCE_TOKENS_DEFAULT,
            "help": "KV-aware routing: the prefill node holding the longest cached prefix wins while it "
            "is booked at most this many prompt tokens more than the least-booked one (0: the weighted "
            "score alone decides).",
        },
    ),
]


def read_password_file(path: str, *, also_given: bool) -> str:
    """The first line of ``path`` (a secret mounted as a file), for --scheduler-password-file."""
    if also_given:
        raise ValueError("--scheduler-password-file: give either it or --scheduler-password, not both")
    try:
        with open(path, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"--scheduler-password-file: cannot read {path}: {exc.strerror}") from None
    if not password:
        raise ValueError(f"--scheduler-password-file: {path} is empty")
    return password


def scheduler_options(func: F) -> F:
    """click decorator adding every scheduler flag (used by `splitwise inspect` and `splitwise serve`)."""
    for flag, kwargs in reversed(_OPTIONS):
        func = click.option(flag, show_default=True, **kwargs)(func)
    return func
