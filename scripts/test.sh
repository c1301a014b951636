#!/usr/bin/env bash
# README command 2: set everything up and run the whole test suite. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=setup_env.sh
source "$ROOT/scripts/setup_env.sh" test
cd "$ROOT"
echo "==> running the test suite"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
