#!/usr/bin/env bash
# Command 2 of the README: install everything (idempotent) and run the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/install.sh"
cd "$root"
# --fast: the quick subset (everything not marked slow; under 3 minutes on 2 cores).
# --real-size: only the real-size preset plans (about 10 minutes; not in the default run).
if [ "${1:-}" = "--fast" ]; then
  shift
  set -- -m "not slow and not real_size" "$@"
elif [ "${1:-}" = "--real-size" ]; then
  shift
  set -- -m real_size "$@"
fi
# Two pytest-xdist workers: every test runs on one thread, and CI has two cores. loadfile
# keeps each file on one worker, so a module fixture (a training run, a model) is built once.
exec "${IPRO_VENV:-$root/.venv}/bin/python" -m pytest -q -n 2 --dist loadfile "$@"
