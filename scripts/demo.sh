#!/usr/bin/env bash
# Command 1 of the README: install everything (idempotent) and run the main job on the
# embedded default.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/install.sh"
cd "$root"
exec "${IPRO_VENV:-$root/.venv}/bin/ipro" demo "$@"
