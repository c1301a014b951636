"""Which rank holds what (torch-free: the scheduler and the transports use it too).

Megatron-style sharding over ``tp`` ranks, for a model with Hq query heads, Hkv KV heads, an
MLP of width I and a vocabulary of V tokens::

    what                    rank r holds                                      combined by
    q heads                 [r * Hq/tp, (r+1) * Hq/tp)                         -
    KV heads (tp <= Hkv)    [r * Hkv/tp, (r+1) * Hkv/tp)                       -
    KV heads (tp >  Hkv)    the one head r // (tp/Hkv)  (replicated)           -
    o_proj / down_proj      the input columns of its q heads / MLP slice       all-reduce (sum)
    gate/up                 rows [r * I/tp, (r+1) * I/tp)                      -
    embedding / lm_head     vocab rows [r * ceil(V/tp), ...) (zero-padded)     all-reduce / all-gather

KV memory (CPU): the instance keeps ONE KV buffer with ``num_physical_kv_heads`` heads, in
shared memory; rank r reads and writes the head slice ``[r * kvr, (r+1) * kvr)`` of it
(kvr = KV heads per rank). With tp <= Hkv the physical heads ARE the model's heads, so the
buffer's bytes are exactly those of a TP=1 instance; with tp > Hkv each replica has its own
physical head (physical head p holds model head ``p * Hkv // num_physical``), so no two ranks
ever write the same bytes. The transports then see one KV cache per instance whatever its TP;
only the physical head count can differ between two instances, and ``head_map`` says which
source head fills each destination head.
"""

from __future__ import annotations

from dataclasses import dataclass

TP_FLAG = "--tensor-parallel-size"


@dataclass(frozen=True)
class TPLayout:
    tp_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int

    def __post_init__(self) -> None:
        tp, hkv = self.tp_size, self.num_kv_heads
        if tp < 1:
            raise ValueError(f"{TP_FLAG}: {tp} must be >= 1")
        if self.num_heads % tp:
            raise ValueError(f"{TP_FLAG}: {tp} does not divide the model's {self.num_heads} attention heads")
        if hkv % tp and tp % hkv:
            raise ValueError(f"{TP_FLAG}: {tp} must divide or be a multiple of the model's {hkv} KV heads")
        if self.intermediate_size % tp:
            raise ValueError(
                f"{TP_FLAG}: {tp} does not divide the model's MLP width {self.intermediate_size}"
            )

    @property
    def heads_per_rank(self) -> int:
        return self.num_heads // self.tp_size

    @property
    def kv_heads_per_rank(self) -> int:
        return max(1, self.num_kv_heads // self.tp_size)

    @property
    def num_physical_kv_heads(self) -> int:
        return self.kv_heads_per_rank * self.tp_size

    @property
    def intermediate_per_rank(self) -> int:
        return self.intermediate_size // self.tp_size

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.vocab_size // self.tp_size)

    def q_heads(self, rank: int) -> range:
        n = self.heads_per_rank
        return range(rank * n, (rank + 1) * n)

    def physical_kv_heads(self, rank: int) -> range:
        """The head slice of the instance's KV buffer this rank reads and writes."""
        n = self.kv_heads_per_rank
        return range(rank * n, (rank + 1) * n)

    def model_kv_heads(self, rank: int) -> range:
        """The model's KV heads (k_proj/v_proj rows / head_dim) this rank computes."""
        phys = self.physical_kv_heads(rank)
        first = phys.start * self.num_kv_heads // self.num_physical_kv_heads
        return range(first, first + len(phys))

    def intermediate(self, rank: int) -> range:
        n = self.intermediate_per_rank
        return range(rank * n, (rank + 1) * n)

    def vocab(self, rank: int) -> range:
        """Vocab rows of this rank's embedding/lm_head shard (the last may be short: padded)."""
        n = self.vocab_per_rank
        return range(min(rank * n, self.vocab_size), min((rank + 1) * n, self.vocab_size))


def num_physical_kv_heads(num_kv_heads: int, tp_size: int) -> int:
    """The model's KV heads, or one per rank when the ranks outnumber them (replicas)."""
    return max(num_kv_heads, tp_size)


def head_map(num_kv_heads: int, src_physical: int, dst_physical: int) -> list[int]:
    """For each destination physical head, the source physical head holding the same model head
    (the first replica). Identity when both sides hold the model's heads unreplicated.

        model heads 1, P tp=1 (1 physical) -> D tp=2 (2 physical):  [0, 0]
        model heads 1, P tp=2 (2 physical) -> D tp=1 (1 physical):  [0]
        model heads 2, P tp=4 (4 physical) -> D tp=2 (2 physical):  [0, 2]
    """
    for physical in (src_physical, dst_physical):
        if physical % num_kv_heads:
            raise ValueError(f"{physical} physical KV heads do not replicate {num_kv_heads} model heads")
    return [(q * num_kv_heads // dst_physical) * src_physical // num_kv_heads for q in range(dst_physical)]


@dataclass(frozen=True)
class Lane:
    """Heads that move from one P rank's slice to one D rank's slice (SGLang's head-slice remap):
    physical heads [src_head, src_head + num_heads) of P land at [dst_head, ...) of D."""

    src_rank: int
    dst_rank: int
    src_head: int
    dst_head: int
    num_heads: int


def remap_lanes(num_kv_heads: int, src_tp: int, dst_tp: int) -> list[Lane]:
    """The per-rank lanes of a P(tp=src_tp) -> D(tp=dst_tp) KV transfer, in destination order.

    Equal TP gives one lane per rank (r -> r, whole slice); e.g. 4 KV heads, P tp=1 -> D tp=2 gives
    (0 -> 0, heads 0-1 -> 0-1) and (0 -> 1, heads 2-3 -> 2-3). A transport that keeps per-rank
    memory (RDMA: one registration per GPU) posts one write per lane and block run.
    """
    src_phys = num_physical_kv_heads(num_kv_heads, src_tp)
    dst_phys = num_physical_kv_heads(num_kv_heads, dst_tp)
    src_per_rank, dst_per_rank = src_phys // src_tp, dst_phys // dst_tp
    mapping = head_map(num_kv_heads, src_phys, dst_phys)
    lanes: list[Lane] = []
    for dst_head, src_head in enumerate(mapping):
        src_rank, dst_rank = src_head // src_per_rank, dst_head // dst_per_rank
        last = lanes[-1] if lanes else None
        if (
            last is not None
            and (last.src_rank, last.dst_rank) == (src_rank, dst_rank)
            and last.src_head + last.num_heads == src_head
            and last.dst_head + last.num_heads == dst_head
        ):
            lanes[-1] = Lane(src_rank, dst_rank, last.src_head, last.dst_head, last.num_heads + 1)
        else:
            lanes.append(Lane(src_rank, dst_rank, src_head, dst_head, 1))
    return lanes


RDMA_PORTS_FLAG = "--rdma-comm-ports"


@dataclass(frozen=True)
class RdmaPorts:
    """What ``--rdma-comm-ports`` means for an instance (FastDeploy passes one port per TP rank).

        given          GPU layout (rank r: its own KV memory)   this build (one KV buffer, rank 0)
        nothing        -                                        one free port
        one p          -                                        p: the buffer, every rank's heads
        N = tp ports   rank r registers its heads on port r     port 0's: the buffer, every rank's
                                                                heads; ports 1..N-1 stay closed

    On CPU the ranks share the instance's one KV buffer (above), and only rank 0 talks to the
    transports, so one registration and one side channel serve every rank's heads; a pair's lanes
    (``remap_lanes``) all land in that one registration. A per-GPU build would open port r in rank
    r with rank r's memory; CUDA P/D is refused by `serve` until then.
    """

    serve_port: int  # 0: a free port
    unused_ports: tuple[int, ...]  # named for ranks 1..N-1, not opened (the ranks share one buffer)

    @classmethod
    def of(cls, ports: tuple[int, ...], tp_size: int) -> RdmaPorts:
        if len(ports) > 1 and len(ports) != tp_size:
            raise ValueError(
                f"{RDMA_PORTS_FLAG}: {len(ports)} ports given: give one, or one per tensor-parallel rank ({tp_size})"
            )
        if len(set(ports)) != len(ports):
            raise ValueError(f"{RDMA_PORTS_FLAG}: {list(ports)} repeats a port (each rank needs its own)")
        return cls(serve_port=ports[0] if ports else 0, unused_ports=tuple(ports[1:]))
