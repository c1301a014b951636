#!/usr/bin/env bash
# Shared set-up for the README's two commands: a virtualenv in .venv with torch 2.13.0 (CPU build,
# installed FIRST so no looser requirement pulls a multi-GB CUDA build), the project, and
# redis-server (and openssl for the tests) with apt-get when missing (CI runs as root). Exits
# non-zero on any failure.
# Usage: source scripts/setup_env.sh [extras]   e.g. "test"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
  || { echo "error: Python >= 3.10 is required (found $("$PYTHON" --version 2>&1))" >&2; exit 1; }

APT_PACKAGES=()
command -v redis-server >/dev/null 2>&1 || APT_PACKAGES+=(redis-server)
# redis-cli joins the test Redis Cluster (--cluster create); Sentinels run as `redis-server --sentinel`.
command -v redis-cli >/dev/null 2>&1 || APT_PACKAGES+=(redis-tools)
# The test suite makes TLS certificates for its TLS-Redis test.
if [[ "$EXTRAS" == *test* ]] && ! command -v openssl >/dev/null 2>&1; then APT_PACKAGES+=(openssl); fi
# The pyverbs offline tests (rdma-core's own bindings, Debian's build; no RDMA device needed to import).
if [[ "$EXTRAS" == *test* ]] && [ ! -d /usr/lib/python3/dist-packages/pyverbs ]; then APT_PACKAGES+=(python3-pyverbs); fi
if [ ${#APT_PACKAGES[@]} -gt 0 ]; then
  echo "==> installing ${APT_PACKAGES[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
fi
if ! "$PYTHON" -m venv --help >/dev/null 2>&1 || ! "$PYTHON" -c 'import ensurepip' >/dev/null 2>&1; then
  echo "==> installing python3-venv"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
fi

VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  echo "==> installing torch==2.13.0 (CPU)"
  "${PIP[@]}" install "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c 'import torch' || { echo "error: torch install failed" >&2; exit 1; }
fi
echo "==> installing splitwise${EXTRAS:+[$EXTRAS]}"
"${PIP[@]}" install -e "$ROOT${EXTRAS:+[$EXTRAS]}" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c 'import splitwise, scheduler, rdma' || { echo "error: splitwise install failed" >&2; exit 1; }
# Optional: Debian's python3-pyverbs, made visible to the venv when the system has it.
if [ -x "$ROOT/tools/link_system_pyverbs.sh" ]; then
  "$ROOT/tools/link_system_pyverbs.sh" "$VENV" || true
fi
export PATH="$VENV/bin:$PATH"
