"""How fast `ipro prepare` curates footage on a CPU, against real time.

Carphone (4 s, 120 frames at 29.97 fps) goes end to end through `prepare` (decode,
resample to 16 fps, detect + embed every sampled frame, filter, write clips and pools),
one thread, best of a few runs because the machine is shared. Reference: real time at
the sampled rate (16 frames/s); ratio > 1 means faster than real time.

Run: python benchmarks/prepare.py
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path


def _time_prepare(config, repeats: int) -> tuple[float, int]:
    """Best wall time of `repeats` fresh runs and the number of frames they processed."""
    from ipro.data.footage import carphone_path
    from ipro.data.prepare import prepare

    best, frames = float("inf"), 0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            inp = Path(tmp) / "in"
            inp.mkdir()
            shutil.copy(carphone_path(), inp / "carphone.mp4")
            start = time.perf_counter()
            summary = prepare(inp, Path(tmp) / "out", config)
            best = min(best, time.perf_counter() - start)
            frames = summary["clips"] * config.frames
    return best, frames


def main(repeats: int = 3) -> list[dict]:
    import torch

    from ipro.data.prepare import PrepareConfig

    torch.set_num_threads(1)
    cases = {
        "tiny preset (17 frames, 128x160)": PrepareConfig(frames=17, height=128, width=160),
        "Wan-size output (49 frames, 480x832)": PrepareConfig(frames=49, height=480, width=832),
    }
    rows = []
    for name, config in cases.items():
        seconds, frames = _time_prepare(config, repeats)
        fps = frames / seconds
        rows.append({
            "name": f"prepare carphone, {name}, CPU 1 thread: frames/s vs real time at {config.fps:g} fps",
            "ours": round(fps, 2), "reference": config.fps, "ratio": round(fps / config.fps, 3), "unit": "frames/s",
        })
    for row in rows:
        print(f"{row['name']}: ours {row['ours']} {row['unit']}, reference {row['reference']}, ratio {row['ratio']}")
    return rows


if __name__ == "__main__":
    main()
