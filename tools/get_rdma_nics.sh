#!/usr/bin/env bash
# Print the RDMA NICs the KV transfer should use, as one line `KVCACHE_RDMA_NICS=<dev>,<dev>,...`
# (FastDeploy's interface: `export $(tools/get_rdma_nics.sh gpu)`), decided from sysfs alone.
#
# A thin wrapper: the one implementation is rdma/nics.py (`python -m rdma.nics`), so the script and
# the transport can never disagree. Same arguments, output and exit status:
#
#   cpu            every RDMA device with an ACTIVE port (any port number), in name order
#   gpu            one entry per NVIDIA GPU in PCI-address order: the nearest active NIC to that GPU
#                  (deepest common PCIe ancestor, then the same NUMA node, then name order)
#   gpu --stripe   the same, but each entry lists every NIC tied for nearest, joined by '+'
#                  (mlx5_0+mlx5_1): the transport stripes that GPU's requests over all of them
#
# Reads $SYSFS_ROOT (default /sys). Exit status: 0 with the line on stdout; 1 when there is no active
# NIC (or, for gpu, no GPU): nothing on stdout, the reason on stderr; 2 on bad usage.
# Python: $PYTHON, else the checkout's .venv/bin/python, else python3.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m rdma.nics "$@"
