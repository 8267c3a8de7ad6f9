"""`ipro eval --protocol consisid` vs the default protocol: seconds per video.

The same videos through both, in one run: carphone (real footage) at its native size
(60 frames, 176x144) and at Wan's output size (81 frames, 480x832, resized), each with
its first frame as the input image and itself as the ground-truth clip. The default
protocol computes every metric on every frame (identity against input and GT pool,
swaps, flicker, smoothness, dynamic degree, NIQE, rigid faces) and writes the report;
the consisid protocol detects and embeds the largest face in 16 sampled frames (dlib
standing in for both ArcFace and CurricularFace, as without user weights).

    python benchmarks/consisid.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

VIDEOS = 2


def measure(name: str, frames: np.ndarray, fps: float) -> dict:
    from ipro.data.video import write_image, write_video
    from ipro.eval import evaluate
    from ipro.eval.consisid import ConsisIDProtocol, evaluate_consisid
    from ipro.eval.evaluator import Evaluator

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(VIDEOS):
            clip = np.roll(frames, 7 * i, axis=0)
            write_video(root / "videos" / f"v{i}.mp4", clip, fps=fps)
            write_video(root / "inputs" / f"v{i}.mp4", clip, fps=fps)
            write_image(root / "inputs" / f"v{i}.png", clip[0])
        protocol, evaluator = ConsisIDProtocol(), Evaluator()  # models loaded outside the timing
        t0 = time.perf_counter()
        evaluate_consisid(root / "videos", root / "inputs", root / "consisid", protocol=protocol)
        t1 = time.perf_counter()
        evaluate(root / "videos", root / "inputs", root / "default", evaluator=evaluator)
        t2 = time.perf_counter()
    ours, reference = (t1 - t0) / VIDEOS, (t2 - t1) / VIDEOS
    return {"name": f"{name}: s/video, consisid protocol (ref: default protocol)", "ours": ours, "reference": reference,
            "ratio": reference / ours, "unit": "s/video"}


def main() -> list[dict]:
    import cv2

    from ipro.data.footage import carphone

    torch.set_num_threads(1)
    native = carphone()[:60]
    wan = np.stack([cv2.resize(f, (832, 480), interpolation=cv2.INTER_LINEAR) for f in carphone()[:81]])
    return [measure("176x144x60", native, 30.0), measure("480x832x81", wan, 16.0)]


if __name__ == "__main__":
    for row in main():
        print(row)
