"""Starting an instance's KV transports for its role (at start-up and after a role switch).

A decode node gets a transport target per protocol (its endpoint goes into the registry record)
and an initiator for live migration; a prefill node gets initiators; a mixed node none. A protocol
that cannot start on this node is skipped, logged and counted (``transports_unavailable``); none
usable is a ValueError naming --cache-transfer-protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from splitwise.codes import Protocol
from splitwise.engine.parallel.layout import RdmaPorts
from splitwise.instance.host_identity import advertised
from splitwise.logging import get_logger
from splitwise.transfer.base import TransportOptions
from splitwise.transfer.errors import UnknownProtocolError
from splitwise.transfer.registry import create_initiator, create_target

if TYPE_CHECKING:
    from splitwise.instance.instance import Instance

log = get_logger(__name__)


def start_transports(inst: Instance, token: str) -> None:
    """This role's KV transports: a decode node's targets (plus initiators for live migration),
    a prefill node's initiators, none on a mixed node; the usable ones go into ``inst``."""
    assert inst.engine is not None
    cfg = inst.config
    if cfg.role == "mixed":
        return
    usable: list[str] = []
    reasons: list[str] = []
    rdma_ports = RdmaPorts.of(cfg.rdma_comm_ports, cfg.engine.tensor_parallel_size)
    if rdma_ports.unused_ports and "rdma" in cfg.cache_transfer_protocols:
        log.info(
            "rdma: the tensor-parallel ranks share one KV buffer, served on the first port",
            port=rdma_ports.serve_port,
            unused_ports=list(rdma_ports.unused_ports),
        )
    for index, protocol in enumerate(cfg.cache_transfer_protocols):
        port = cfg.kv_transfer_port if protocol == "tcp" else 0
        if protocol == "rdma":
            port = rdma_ports.serve_port
        options = TransportOptions(
            host=cfg.host,
            port=port,
            extra=cfg.transport_extra(),
            node_id=inst.node_id,
            cluster_token=token,
        )
        try:
            if cfg.role == "decode":
                target = create_target(protocol, options)
                target.register(inst.engine.kv_cache)
                inst.targets[protocol] = target
                _start_migration_initiator(inst, protocol, options)
                # The registry record carries the typed endpoint, advertised address in it.
                inst.ports.transfer[Protocol(protocol)] = advertised(target.endpoint(), cfg.advertised_host)
            else:
                initiator = create_initiator(protocol, options)
                initiator.register(inst.engine.kv_cache)
                inst.initiators[protocol] = initiator
            usable.append(protocol)
        except (UnknownProtocolError, OSError, ValueError) as exc:
            reasons.append(f"{protocol}: {exc}")
            inst.counters.inc("transports_unavailable")
            log.warning(
                "transfer protocol unavailable on this node; skipping it",
                protocol=protocol,
                error=str(exc),
                preference=index,
            )
        except Exception as exc:  # noqa: BLE001 - e.g. pyverbs errors: a protocol we cannot use
            reasons.append(f"{protocol}: {exc}")
            inst.counters.inc("transports_unavailable")
            log.warning("transfer protocol failed to start; skipping it", protocol=protocol, error=str(exc))
    if not usable:
        raise ValueError(
            f"--cache-transfer-protocol: none of {list(cfg.cache_transfer_protocols)} can be used on this node "
            f"({'; '.join(reasons)})"
        )
    inst._usable_protocols = usable


def _start_migration_initiator(inst: Instance, protocol: str, options: TransportOptions) -> None:
    """A decode node also sends KV: live migration to another decode node (#16)."""
    assert inst.engine is not None
    try:
        initiator = create_initiator(protocol, options)
        initiator.register(inst.engine.kv_cache)
    except Exception as exc:  # noqa: BLE001 - migration over this protocol is then unavailable
        inst.counters.inc("migration_initiators_unavailable")
        log.warning("cannot migrate out over this protocol", protocol=protocol, error=str(exc))
        return
    inst.initiators[protocol] = initiator
