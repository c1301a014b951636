"""Tensor parallelism (#14): one worker process per rank, Megatron-style sharding.

Rank 0 lives in the instance process and owns everything that talks to the outside (scheduler,
HTTP, Redis, the P/D channel, transports); ranks 1..N-1 are ``rank_main`` processes that run the
step plans rank 0 broadcasts. ``layout`` (torch-free) is the head/vocab arithmetic shared with the
scheduler and the transports; see docs/architecture.md "Tensor parallelism".
"""
