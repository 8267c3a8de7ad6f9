"""Planned vs measured peak GPU memory at real size: Wan 2.2 TI2V-5B, IPRO and GRPO presets.

Builds the real Wan 2.2 TI2V-5B transformer and Wan 2.2 VAE from the shipped configs
(`ipro/assets/wan-configs/wan2.2-ti2v-5b`) with random bf16 weights on the GPU, a tiny
stand-in UMT5 (the prompts' embeddings are zeros of the real width; the real 11 GB encoder
only runs once before training and is then moved to the CPU), and runs two IPRO steps
(configs/wan22-5b-ipro.yaml: 81 frames at 704x1280, K=4 of 8) and two GRPO steps
(configs/wan22-5b-grpo.yaml: groups of 8, 33 frames at 256x416, 25 SDE steps, CFG) through
the planner's own step code on real tensors: real prepare_condition, sampler, checkpointed
VAE decode, dlib recognizer on one aligned chip per scored frame, KL, backward and Adam.
It prints torch.cuda.max_memory_allocated of the second step against `ipro plan`'s
prediction, and the step time. Meant for one H100/H200 (< 8 min).

    python benchmarks/gpu_real_size.py                    # on the GPU
    python benchmarks/gpu_real_size.py --device cpu --tiny   # dry run: the tiny 2.2 family, small video
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

GB = 1e9


def model_folder(tiny: bool, root: Path) -> Path:
    """The 5B configs with a tiny text encoder (or, with --tiny, the whole tiny 2.2 family)."""
    from ipro.memory.meta import arch_folder
    from ipro.models import build_tiny

    if tiny:
        return build_tiny("wan2.2-ti2v", root / "tiny-wan2.2-ti2v", seed=0)
    out = root / "wan2.2-ti2v-5b"
    shutil.copytree(arch_folder("wan2.2-ti2v-5b"), out)
    config = out / "text_encoder" / "config.json"
    c = json.loads(config.read_text())
    c.update(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)
    config.write_text(json.dumps(c))
    return out


def run(preset: str, folder: Path, device: str, tiny: bool, steps: int = 2) -> dict:
    from ipro.memory.planner import Planner
    from ipro.memory.tracker import LiveMemory
    from ipro.train.config import load_config

    overrides = {"model.path": str(folder)}
    if tiny:
        overrides.update({"data.height": 64, "data.width": 64, "data.num_frames": 9, "model.dtype": "float32",
                          "reward.max_frames": 3, "sampler.num_steps": 4})
        if load_config(preset).method == "grpo":
            overrides["grpo.group_size"] = 2
    cfg = load_config(preset, overrides)
    predicted = Planner(cfg).plan(cfg)
    planner = Planner(cfg, device=device)
    peaks, times = [], []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        traced = planner.plan(cfg, mem=LiveMemory(fused_attention=False))
        if device == "cuda":
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated())
        else:
            peaks.append(traced.peak)  # no allocator to ask on the CPU: the tracer on real tensors
        times.append(time.perf_counter() - t0)
    return {"preset": preset, "predicted_gb": predicted.peak / GB, "measured_gb": peaks[-1] / GB,
            "ratio": peaks[-1] / predicted.peak, "step_s": times[-1], "measured_by": "cuda.max_memory_allocated" if device == "cuda" else "tracer on CPU tensors"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny Wan 2.2 family at 64x64x9 (CPU dry run)")
    parser.add_argument("--presets", nargs="+", default=["configs/wan22-5b-ipro.yaml", "configs/wan22-5b-grpo.yaml"])
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args.tiny, Path(tmp))
        for preset in args.presets:
            r = run(preset, folder, args.device, args.tiny)
            print(f"{r['preset']}: predicted {r['predicted_gb']:.2f} GB, measured {r['measured_gb']:.2f} GB "
                  f"({r['measured_by']}), measured/predicted {r['ratio']:.3f}, step {r['step_s']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
