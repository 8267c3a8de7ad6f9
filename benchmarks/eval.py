"""`ipro eval` throughput: videos per minute for the full metric set, and where the time goes.

Two workloads made from carphone (real footage): its native size (60 frames,
176x144) and Wan's output size (81 frames, 480x832, carphone resized), each video with
its first frame as the input image and itself as the ground-truth clip (so the GT pool
is embedded too). Subject/background consistency and aesthetics need user weights and
are not part of the set. The reference row is the same run's identity metrics alone
(decode + face detection/embedding of video, input and GT clip): what a FaceSim-only
evaluation costs.

    python benchmarks/eval.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

VIDEOS = 2


def _workload(root: Path, frames: np.ndarray, fps: float) -> None:
    from ipro.data.video import write_image, write_video

    for i in range(VIDEOS):
        clip = np.roll(frames, 7 * i, axis=0)  # different videos, same content statistics
        write_video(root / "videos" / f"v{i}.mp4", clip, fps=fps)
        write_video(root / "inputs" / f"v{i}.mp4", clip, fps=fps)
        write_image(root / "inputs" / f"v{i}.png", clip[0])


def measure(name: str, frames: np.ndarray, fps: float, evaluator) -> list[dict]:
    from ipro.eval import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _workload(root, frames, fps)
        t0 = time.perf_counter()
        result = evaluate(root / "videos", root / "inputs", root / "out", evaluator=evaluator)
        total = time.perf_counter() - t0
    seconds = dict(result["seconds"])
    seconds["report + json"] = total - sum(seconds.values())
    identity_only = seconds["read"] + seconds["identity"]
    rows = [{
        "name": f"{name}: videos/min, full metric set (ref: identity metrics only)",
        "ours": 60 * VIDEOS / total, "reference": 60 * VIDEOS / identity_only,
        "ratio": identity_only / total, "unit": "videos/min",
    }]
    for part, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        rows.append({"name": f"{name}: share of time, {part}", "ours": 100 * s / total, "reference": None, "ratio": None, "unit": "%"})
    return rows


def main() -> list[dict]:
    import cv2

    from ipro.data.footage import carphone
    from ipro.eval import Evaluator

    torch.set_num_threads(1)
    evaluator = Evaluator()  # dlib recognizer, MTCNN; built once, shared by both workloads
    small = carphone()[:60]
    wan = np.stack([cv2.resize(f, (832, 480), interpolation=cv2.INTER_CUBIC) for f in carphone()[:81]])
    rows = measure("176x144x60", small, 30.0, evaluator) + measure("480x832x81", wan, 16.0, evaluator)
    for r in rows:
        ref = "" if r["reference"] is None else f"  (reference {r['reference']:.3g}, ratio {r['ratio']:.2f})"
        print(f"{r['name']}: {r['ours']:.3g} {r['unit']}{ref}")
    return rows


if __name__ == "__main__":
    main()
