#!/usr/bin/env bash
# Command 2 of the README: install everything (idempotent) and run the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/install.sh"
cd "$root"
exec "${IPRO_VENV:-$root/.venv}/bin/python" -m pytest -q "$@"
