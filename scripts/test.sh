#!/usr/bin/env bash
# Command 2 of the README: install everything (idempotent) and run the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/install.sh"
cd "$root"
# --fast: the quick subset (everything not marked slow; under 3 minutes on 2 cores).
if [ "${1:-}" = "--fast" ]; then
  shift
  set -- -m "not slow" "$@"
fi
exec "${IPRO_VENV:-$root/.venv}/bin/python" -m pytest -q "$@"
