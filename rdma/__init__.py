"""RDMA KV-block transport over pyverbs, plus sysfs-based NIC detection.

Modules (one concept each):
    errors        RdmaError and its subclasses by cause
    nics          which NICs to use (sysfs; tools/get_rdma_nics.sh is a wrapper around it)
    verbs         the verbs-level backend interface the transport is written against
    fake          a protocol-level test double of that interface (byte-exact, enforces verbs rules)
    fake_dma      the double's delayed DMA engine (a NIC reads the source when the WR executes)
    fake_cuda     the double's CUDA driver (GPU memory simulated with host buffers)
    pyverbs_backend  the real backend (imports pyverbs lazily)
    gpu_memory    a CUDA tensor's allocation as a dma-buf: range, alignment, IOVA arithmetic
    cuda_driver   the CUDA driver calls behind gpu_memory (cuda-python, else libcuda via ctypes)
    resources     per-NIC device, port and KV registration (host, dma-buf, or nvidia-peermem)
    plan          block runs -> RDMA WRITE work requests, batching within the send-queue depth
    connection    connection info message, QP attribute policy, the RESET->INIT->RTR->RTS machine
    transport     the KV Transport plug-in registered as "rdma"

pyverbs is imported only by pyverbs_backend, so everything else works where it is missing.
"""

# splitwise.transfer.registry imports rdma.transport for protocol "rdma" (it registers on
# import). Nothing is imported here, so `python -m rdma.nics` runs without loading the transport.
