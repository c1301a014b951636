#!/usr/bin/env bash
# Make Debian's python3-pyverbs (rdma-core's own Cython bindings, /usr/lib/python3/dist-packages/pyverbs)
# importable from a virtualenv WITHOUT exposing the rest of dist-packages:
#
#   <venv>/system-pyverbs/pyverbs -> /usr/lib/python3/dist-packages/pyverbs      (a symlink, nothing else)
#   <venv>/lib/pythonX.Y/site-packages/splitwise-system-pyverbs.pth               (one line: that directory)
#
# Why not `pip install pyverbs`: PyPI's pyverbs is an sdist that builds its own rdma-core and then only
# loads against that exact rdma-core release (IBVERBS_PRIVATE_<N>), not the system's libibverbs.
# The Debian build is compiled for the system Python (3.11 on Debian 12), so the venv's interpreter must
# have the same extension-module ABI; the script checks that and refuses otherwise.
#
# Usage: tools/link_system_pyverbs.sh [VENV]        (default: <repo>/.venv; PYVERBS_DIR overrides the source)
# Exit status: 0 linked (or already linked); 1 nothing to link / ABI mismatch (reason on stderr).
# Idempotent. Undo: rm -r <venv>/system-pyverbs <site-packages>/splitwise-system-pyverbs.pth
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(cd "${1:-$ROOT/.venv}" && pwd)"
SRC="${PYVERBS_DIR:-/usr/lib/python3/dist-packages/pyverbs}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  echo "link_system_pyverbs: no virtualenv python at $PY" >&2
  exit 1
fi
if [ ! -d "$SRC" ]; then
  echo "link_system_pyverbs: $SRC not found; install it with: apt-get install python3-pyverbs (rdma-core)" >&2
  exit 1
fi

EXT_SUFFIX="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
if ! ls "$SRC"/device*"$EXT_SUFFIX" >/dev/null 2>&1; then
  built="$(ls "$SRC"/device*.so 2>/dev/null | head -n1 || true)"
  echo "link_system_pyverbs: $SRC was built for another Python (${built##*/}); the venv needs *$EXT_SUFFIX" >&2
  exit 1
fi

SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
LINK_DIR="$VENV/system-pyverbs"
mkdir -p "$LINK_DIR"
ln -sfn "$SRC" "$LINK_DIR/pyverbs"
printf '%s\n' "$LINK_DIR" > "$SITE/splitwise-system-pyverbs.pth"

if ! "$PY" -c 'import pyverbs.device' 2>/dev/null; then
  echo "link_system_pyverbs: linked, but 'import pyverbs.device' fails (missing libibverbs1/librdmacm1?):" >&2
  "$PY" -c 'import pyverbs.device' 2>&1 | tail -n1 >&2 || true
  exit 1
fi
echo "link_system_pyverbs: pyverbs from $SRC is importable in $VENV"
