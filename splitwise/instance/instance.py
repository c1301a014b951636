"""One serving instance: assembles engine, scheduler sides, transports, control channel, HTTP.

    start: load engine -> engine worker -> role parts -> scheduler frontend -> HTTP server
           role parts: transports (+ endpoints) -> control channel + P/D flow -> node agent
                       (register) -> node runtime -> prefix-index publisher
    stop:  HTTP -> node runtime -> agent (deregister) -> frontend -> channel -> transports -> engine

A role switch (splitwise/instance/role_switch.py) drains, stops the role parts, and starts them
again for the new role: the engine, its weights and the frontend stay. Drains, SIGTERM and node
commands are run by ``InstanceControl`` (splitwise/instance/drain_control.py).

``Instance.run()`` is the process's error boundary for start-up: a bad flag or an unusable Redis
raises a SplitwiseError/ValueError with a clear message before anything is served.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from scheduler.frontend import FrontendScheduler
from scheduler.keys import KeySchema
from scheduler.local import LocalScheduler
from scheduler.messages import LoadReport, NodeInfo
from scheduler.node import NodeAgent
from splitwise.api.metrics import ApiMetrics
from splitwise.codes import Protocol, Role
from splitwise.counters import Counters
from splitwise.endpoint import Endpoint
from splitwise.engine.engine import LLMEngine
from splitwise.engine.kv_cache import default_shm_name
from splitwise.instance.cluster_token import explicit_token, keep_published, token_from_redis
from splitwise.instance.config import InstanceConfig
from splitwise.instance.decode_flow import DecodeFlow
from splitwise.instance.engine_worker import EngineWorker
from splitwise.instance.host_identity import advertised, host_id
from splitwise.instance.node_runtime import NodeRuntime
from splitwise.instance.pd_channel import PDChannel
from splitwise.instance.prefill_flow import PrefillFlow
from splitwise.instance.request_stats import RequestStats
from splitwise.instance.transfer_metrics import TransferMetrics
from splitwise.logging import get_logger
from splitwise.planner.latency import RollingLatency
from splitwise.transfer.base import TransportInitiator, TransportOptions, TransportTarget
from splitwise.transfer.control_connection import ControlConnection
from splitwise.transfer.errors import UnknownProtocolError
from splitwise.transfer.messages import CallMessage, Compatibility
from splitwise.transfer.registry import create_initiator, create_target

log = get_logger(__name__)

_CLOSE_STEP_S = 3.0


@dataclass
class Ports:
    http: int = 0
    pd_comm: int = 0
    metrics: int | None = None
    transfer: dict[Protocol, Endpoint] = field(default_factory=dict)


class Instance:
    def __init__(self, config: InstanceConfig) -> None:
        self.config = config
        self.node_id = config.node_id or f"{config.role}-{uuid.uuid4().hex[:8]}"
        self.ports = Ports()
        self.counters = Counters()  # transfers_ok/failures/fallbacks, reserve waits, ...
        # One Prometheus registry per instance, served on /metrics.
        self.metrics = ApiMetrics(model_name=config.model_id)
        self.engine: LLMEngine | None = None
        self.worker: EngineWorker | None = None
        self.frontend: Any = None
        self.node: Any = None
        self.runtime: NodeRuntime | None = None
        self.latency = RollingLatency()  # the node runtime's TTFT / ITL, in the LoadReport (#16)
        self.channel: PDChannel | None = None
        self.decode_flow: DecodeFlow | None = None
        self.prefill_flow: PrefillFlow | None = None
        self.targets: dict[str, TransportTarget] = {}
        self.initiators: dict[str, TransportInitiator] = {}
        self.registered = False
        self._http_server: Any = None
        self._http_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self.fatal_reason: str | None = None  # set when the engine was lost: exit non-zero
        self._background: set[asyncio.Task[None]] = set()  # abort_peer calls after a lost D
        self._token_keeper: tuple[asyncio.Task[None], Any] | None = None  # re-publishes the Redis token
        self.prefix_index: Any = None  # PrefixIndexLoop on prefill/decode nodes (KV-aware routing)
        self._index_client: Any = None
        self._usable_protocols: list[str] = ["tcp"]  # this role's transports (NodeInfo)
        self._token = ""  # the cluster token (a role switch builds transports with it again)
        from splitwise.instance.drain_control import InstanceControl

        self.control = InstanceControl(self)  # drain, SIGTERM, role switch

    # -- start --------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        engine_cfg = cfg.engine
        wants_shm = (
            cfg.role == "decode" and "ipc" in cfg.cache_transfer_protocols and engine_cfg.device == "cpu"
        )
        if wants_shm and engine_cfg.kv_cache_shm_name is None:
            cfg = cfg.with_engine(kv_cache_shm_name=default_shm_name())
        log.info("loading model", model=cfg.engine.model, role=cfg.role)
        self.engine = await loop.run_in_executor(None, LLMEngine, cfg.engine)
        self.worker = EngineWorker(self.engine, loop)
        self.worker.request_stats = RequestStats(self.metrics)
        self.worker.on_fatal = self._on_engine_fatal
        self.worker.start()
        self.counters.inc("engine_loads")  # a role switch keeps the engine: this stays 1
        self._token = await self._cluster_token()
        self._http_sock = bind_socket(cfg.host, cfg.port)  # bound early: NodeInfo carries the real port
        self.ports.http = int(self._http_sock.getsockname()[1])
        if cfg.scheduler.scheduler_name == "local":
            local = LocalScheduler(cfg.scheduler, model_id=cfg.model_id)
            self.frontend, self.node = local.frontend, local.node
        else:
            kv = self.engine.kv_cache.geometry  # the one KVGeometry; peers pair on its compat_key
            self.frontend = FrontendScheduler(cfg.scheduler, model_id=cfg.model_id, kv=kv)
        await self.start_role()
        await self.frontend.start()
        self.registered = True
        await self._start_http()
        log.info(
            "instance ready",
            node_id=self.node_id,
            role=cfg.role,
            http=f"http://{cfg.advertised_host}:{self.ports.http}",
            pd_comm_port=self.ports.pd_comm,
            transfer=list(self.targets or self.initiators),
            scheduler=cfg.scheduler.scheduler_name,
        )

    async def start_role(self) -> None:
        """What the role needs: transports (after the token: the rdma side channel authenticates
        with it), control channel and P/D flow, node agent (registers), node runtime, prefix index."""
        assert self.worker is not None
        self._start_transports(self._token)
        await self._start_channel(self._token)
        await self._start_node()
        self.runtime = NodeRuntime(self.node, self.worker, decoder=self.decode_flow, latency=self.latency)
        await self.runtime.start()

    async def stop_role(self) -> None:
        """Undo ``start_role`` (a role switch, once drained): deregister, close flows and transports."""
        if self.runtime is not None:
            await self.runtime.close()
        if self.prefix_index is not None:
            await _bounded(self.prefix_index.close(), "prefix index close")
            await _bounded(self._index_client.aclose(), "prefix index client close")
            self.prefix_index = self._index_client = None
        if self.node is not None:
            await _bounded(self.node.close(), "node agent close")
        if self.decode_flow is not None:
            await self.decode_flow.close()
        if self.prefill_flow is not None and self.worker is not None:
            self.worker.set_layer_callback(None)
        if self.channel is not None:
            await self.channel.close()
        for target in self.targets.values():
            target.close()
        for initiator in self.initiators.values():
            initiator.close()
        self.runtime = self.node = self.channel = self.decode_flow = self.prefill_flow = None
        self.targets, self.initiators, self._usable_protocols = {}, {}, ["tcp"]
        self.ports.transfer, self.ports.pd_comm = {}, 0

    def _start_transports(self, token: str) -> None:
        assert self.engine is not None
        cfg = self.config
        if cfg.role == "mixed":
            return
        usable: list[str] = []
        reasons: list[str] = []
        for index, protocol in enumerate(cfg.cache_transfer_protocols):
            port = cfg.kv_transfer_port if protocol == "tcp" else 0
            if protocol == "rdma" and cfg.rdma_comm_ports:
                port = cfg.rdma_comm_ports[0]
            options = TransportOptions(
                host=cfg.host,
                port=port,
                extra=cfg.transport_extra(),
                node_id=self.node_id,
                cluster_token=token,
            )
            try:
                if cfg.role == "decode":
                    target = create_target(protocol, options)
                    target.register(self.engine.kv_cache)
                    self.targets[protocol] = target
                    # The registry record carries the typed endpoint, advertised address in it.
                    self.ports.transfer[Protocol(protocol)] = advertised(
                        target.endpoint(), cfg.advertised_host
                    )
                else:
                    initiator = create_initiator(protocol, options)
                    initiator.register(self.engine.kv_cache)
                    self.initiators[protocol] = initiator
                usable.append(protocol)
            except (UnknownProtocolError, OSError, ValueError) as exc:
                reasons.append(f"{protocol}: {exc}")
                self.counters.inc("transports_unavailable")
                log.warning(
                    "transfer protocol unavailable on this node; skipping it",
                    protocol=protocol,
                    error=str(exc),
                    preference=index,
                )
            except Exception as exc:  # noqa: BLE001 - e.g. pyverbs errors: a protocol we cannot use
                reasons.append(f"{protocol}: {exc}")
                self.counters.inc("transports_unavailable")
                log.warning(
                    "transfer protocol failed to start; skipping it", protocol=protocol, error=str(exc)
                )
        if not usable:
            raise ValueError(
                f"--cache-transfer-protocol: none of {list(cfg.cache_transfer_protocols)} can be used on this node "
                f"({'; '.join(reasons)})"
            )
        self._usable_protocols = usable

    async def _cluster_token(self) -> str:
        token = explicit_token(self.config.cluster_token)
        if token is not None:
            return token
        if self.config.scheduler.scheduler_name == "local":
            return secrets.token_hex(32)  # no peers to authenticate
        from scheduler.connection import make_client

        client = make_client(self.config.scheduler, max_connections=2)
        keys = KeySchema(self.config.scheduler.scheduler_topic)
        try:
            token = await token_from_redis(client, keys)
        except BaseException:
            await client.aclose()
            raise
        interval_s = self.config.scheduler.heartbeat_interval_s
        keeper = keep_published(client, keys, token, interval_s=interval_s, counters=self.counters)
        self._token_keeper = (asyncio.get_running_loop().create_task(keeper, name="cluster-token"), client)
        return token

    def _compat(self) -> Compatibility:
        assert self.engine is not None
        return Compatibility(self.config.model_id, self.engine.kv_cache.geometry)

    async def _start_channel(self, token: str) -> None:
        assert self.worker is not None
        cfg = self.config
        if cfg.role == "mixed":
            return
        self.channel = await PDChannel(
            node_id=self.node_id,
            token=token,
            compat=self._compat(),
            on_message=self._on_control_message,
            on_disconnect=self._on_peer_lost,
        ).start(cfg.host, cfg.pd_comm_port)
        self.ports.pd_comm = self.channel.port
        if cfg.role == "decode":
            self.decode_flow = DecodeFlow(
                cfg,
                self.worker,
                self.channel,
                self.targets,
                self.counters,
                transfer_metrics=self._transfer_metrics(),
            )
        else:
            self.prefill_flow = PrefillFlow(
                self.worker,
                self.channel,
                self.initiators,
                self.counters,
                release_booking=self._release_prefill_booking,
                transfer_timeout_s=cfg.transfer_timeout_s,
                pipelined=cfg.pipelined_transfer,
                transfer_metrics=self._transfer_metrics(),
            )

    def _transfer_metrics(self) -> TransferMetrics:
        assert self.engine is not None
        return TransferMetrics(self.metrics, self.engine.kv_cache.geometry)

    async def _start_node(self) -> None:
        """Register this node (its role, ports and endpoints) and, on P/D nodes, publish its prefix index."""
        assert self.engine is not None
        cfg = self.config
        if cfg.scheduler.scheduler_name != "local":
            self.node = NodeAgent(cfg.scheduler, load_provider=self._load_report)
            self.node.commands.set_handler(self.control.on_command)
        info = NodeInfo(
            node_id=self.node_id,
            role=Role(cfg.role),
            host=cfg.advertised_host,
            host_id=host_id(),
            http_port=self.ports.http,
            pd_comm_port=self.ports.pd_comm,
            model_id=cfg.model_id,
            kv=self.engine.kv_cache.geometry,
            transfer_protocols=[Protocol(p) for p in self._usable_protocols],
            transfer_endpoints=dict(self.ports.transfer),
        )
        await self.node.start(info)
        if cfg.scheduler.scheduler_name != "local" and cfg.role != "mixed":
            self._start_prefix_index()

    def _start_prefix_index(self) -> None:
        """KV-aware routing: mirror this node's prefix cache into the Redis prefix index."""
        from scheduler.connection import make_client
        from scheduler.prefix_index import PrefixIndexPublisher
        from splitwise.instance.prefix_publisher import PUBLISH_INTERVAL_S, PrefixIndexLoop

        assert self.worker is not None
        sched = self.config.scheduler
        self._index_client = make_client(sched)
        publisher = PrefixIndexPublisher(
            self._index_client, KeySchema(sched.scheduler_topic), self.node_id, ttl_ms=sched.ttl_ms
        )
        self.prefix_index = PrefixIndexLoop(
            self.worker,
            publisher,
            self.counters,
            interval_s=min(PUBLISH_INTERVAL_S, sched.heartbeat_interval_s),
        )
        self.prefix_index.start()

    def _load_report(self) -> LoadReport:
        assert self.worker is not None
        load = self.worker.load
        waiting_blocks = self.decode_flow.num_waiting_for_blocks if self.decode_flow is not None else 0
        latency = self.latency.report()
        return LoadReport(
            queued_prefill_tokens=load.queued_prefill_tokens,
            running_requests=load.running_requests,
            free_kv_blocks=load.free_kv_blocks,
            waiting_requests=load.waiting_requests + waiting_blocks,
            ttft_p90_ms=latency.ttft_p90_ms,
            itl_p90_ms=latency.itl_p90_ms,
            latency_samples=latency.samples,
        )

    async def _start_http(self) -> None:
        from splitwise.instance.http import start_http_server

        self._http_server, self._http_task, self.ports.metrics = await start_http_server(
            self, self._http_sock
        )

    # -- control channel plumbing -------------------------------------------------------------

    def _on_control_message(self, conn: ControlConnection, message: CallMessage) -> Awaitable[None] | None:
        if self.decode_flow is not None:
            self.decode_flow.on_message(conn, message)
        if self.prefill_flow is not None:
            return self.prefill_flow.handle(conn, message)  # a cancel's fence: Ack once it resolved
        return None

    def _on_peer_lost(self, peer_id: str) -> None:
        if self.decode_flow is not None:
            self.decode_flow.on_peer_lost(peer_id)
        if self.prefill_flow is not None:  # #11: P stops writing to a D it lost
            task = asyncio.get_running_loop().create_task(self.prefill_flow.on_peer_lost(peer_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _release_prefill_booking(self, req_id: str) -> None:
        if hasattr(self.node, "release_prefill"):
            await self.node.release_prefill(req_id)

    # -- readiness and shutdown ---------------------------------------------------------------

    def _on_engine_fatal(self, reason: str) -> None:
        """The engine cannot serve (a tensor-parallel rank died): stop; the process exits 1."""
        log.error("stopping the instance: its engine is lost", reason=reason)
        self.fatal_reason = reason
        self.request_stop()

    def is_ready(self) -> bool:
        """Ready for new HTTP requests: started, not stopping, not draining or switching (/health)."""
        return (
            self.engine is not None
            and self.registered
            and not self._stopped.is_set()
            and self.control.is_serving
        )

    @property
    def http_server(self) -> Any:
        return self._http_server

    def health_state(self) -> str:
        """/health's status word: ok, starting, draining, switching, stopping."""
        if self._stopped.is_set():
            return "stopping"
        if not self.control.is_serving:
            return self.control.status.activity.value
        return "ok" if self.is_ready() else "starting"

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def request_stop(self) -> None:
        self._stopped.set()

    async def close(self) -> None:
        self._stopped.set()
        if self._http_server is not None:
            self._http_server.should_exit = True
            if self._http_task is not None:
                await asyncio.gather(self._http_task, return_exceptions=True)
        if self.runtime is not None:
            await self.runtime.close()
        if self.prefix_index is not None:
            await _bounded(self.prefix_index.close(), "prefix index close")
            await _bounded(self._index_client.aclose(), "prefix index client close")
        for side in (self.node, self.frontend):
            if side is not None:
                try:
                    # Bounded: with Redis gone, deregistering cannot succeed; heartbeats expire anyway.
                    await asyncio.wait_for(side.close(), _CLOSE_STEP_S)
                except (Exception, asyncio.TimeoutError) as exc:  # noqa: BLE001 - best effort at shutdown
                    log.warning("scheduler close failed", error=str(exc) or type(exc).__name__)
        if self._token_keeper is not None:
            self._token_keeper[0].cancel()
            await asyncio.gather(self._token_keeper[0], return_exceptions=True)
            await self._token_keeper[1].aclose()
        if self.decode_flow is not None:
            await self.decode_flow.close()
        if self.channel is not None:
            await self.channel.close()
        for target in self.targets.values():
            target.close()
        for initiator in self.initiators.values():
            initiator.close()
        if self.worker is not None:
            self.worker.stop()
        if self.engine is not None:
            self.engine.close()
        log.info("instance stopped", node_id=self.node_id)


async def _bounded(step: Awaitable[object], what: str) -> None:
    """One best-effort shutdown step, bounded (with Redis gone it cannot succeed)."""
    try:
        await asyncio.wait_for(step, _CLOSE_STEP_S)
    except (Exception, asyncio.TimeoutError) as exc:  # noqa: BLE001 - best effort at shutdown
        log.warning(f"{what} failed", error=str(exc) or type(exc).__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0 = a free port), for uvicorn's ``sockets=``."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock
