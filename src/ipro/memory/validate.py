"""Check the planner against a real run on the CPU, measured by the kernel, not by the tracer.

    python -m ipro.memory.validate CONFIG.yaml [--arch-folder DIR]   -> one JSON line

The same config is planned on `meta` (the prediction) and then run for real on the CPU with
random weights built from the same config JSONs: the planner's own step (real
`prepare_condition`, `sample`, `decode`, face recognizer, KL, backward, optimizer) with real
tensors and the CPU's own attention kernel. The measurement is the process' resident-set
high-water mark: `VmHWM` from /proc/self/status after resetting it (writing "5" to
/proc/self/clear_refs) just before the measured step, minus `VmRSS` measured after imports
and a warm-up, before the model was built. The step runs twice and the second is measured
(steady state: optimizer state exists, kernels are initialized). Run it with
MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back to the kernel at once (the tests
do), otherwise glibc keeps freed heap pages resident and the mark overstates the peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_high_water_mark() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _warm_up() -> None:
    import torch
    import torch.nn.functional as F

    x = torch.randn(1, 4, 3, 8, 8, requires_grad=True)
    y = F.conv3d(x, torch.randn(4, 4, 3, 3, 3), padding=1)
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    a = F.scaled_dot_product_attention(q, q, q)
    g = F.grid_sample(torch.randn(1, 3, 8, 8), torch.zeros(1, 4, 4, 2), align_corners=False)
    (y.sum() + a.sum() + g.sum() + F.linear(q, torch.randn(8, 8)).sum()).backward()


def measure(config: str, cache_dir: str) -> dict:
    import gc

    import torch

    from ipro.memory.planner import Planner
    from ipro.memory.tracker import LiveMemory
    from ipro.train.config import load_config

    from ipro.memory.planner import CACHE_DIR

    torch.set_num_threads(1)
    cache_dir = cache_dir or CACHE_DIR
    cfg = load_config(config)
    predicted = Planner(cfg, cache_dir=cache_dir).plan(cfg)
    gc.collect()
    _warm_up()
    baseline = _status("VmRSS")
    planner = Planner(cfg, cache_dir=cache_dir, device="cpu")
    planner.plan(cfg, mem=LiveMemory(fused_attention=False))  # first step: optimizer state, kernel caches
    gc.collect()
    _reset_high_water_mark()
    traced = planner.plan(cfg, mem=LiveMemory(fused_attention=False))
    measured = _status("VmHWM") - baseline
    return {"predicted": predicted.peak, "measured_rss": measured, "traced_on_cpu": traced.peak,
            "predicted_phases": predicted.phases, "baseline_rss": baseline}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    json.dump(measure(args.config, args.cache_dir), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
