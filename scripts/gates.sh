#!/usr/bin/env bash
# The static gates CI runs before the tests: formatting, lint and strict typing of the packages.
# Versions are pinned in setup.cfg's `test` extra so every machine formats the same way.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/.venv/bin"
echo "==> ruff format --check"
"$BIN/ruff" format --check .
echo "==> ruff check"
"$BIN/ruff" check .
echo "==> mypy --strict (splitwise, scheduler, rdma)"
"$BIN/mypy"
