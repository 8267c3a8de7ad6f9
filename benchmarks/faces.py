"""Faces per second: our detect + align + embed against native dlib's own pipeline.

Both run on the same carphone frames in the same process, single-threaded. Native
dlib: HOG detector (upsampled once, as its small faces need), 5-point shape predictor,
`compute_face_descriptor`. Ours: batched MTCNN, grid_sample alignment, the PyTorch port
of the same dlib ResNet. Also reports forward+backward cost per face (what a reward
pays during training).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import torch

FRAMES = 60  # every second frame of carphone


def ours(frames: np.ndarray) -> tuple[float, int]:
    from ipro.faces.embedder import FaceEmbedder

    embedder = FaceEmbedder("dlib")
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255)[None]
    embedder(video[:, :4])  # warm-up
    t0 = time.perf_counter()
    with torch.no_grad():
        faces = embedder(video)
    return time.perf_counter() - t0, faces.num_faces


def native_dlib(frames: np.ndarray) -> tuple[float, int]:
    import dlib

    models = Path(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]) / "models"
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    recognizer = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
    count = 0
    t0 = time.perf_counter()
    for img in frames:
        for rect in detector(img, 1):
            shape = predictor(img, rect)
            recognizer.compute_face_descriptor(img, shape)
            count += 1
    return time.perf_counter() - t0, count


def backward_per_face(frames: np.ndarray) -> tuple[float, float, int]:
    from ipro.faces.embedder import FaceEmbedder

    embedder = FaceEmbedder("dlib")
    video = torch.from_numpy(frames[:16]).permute(0, 3, 1, 2).float().div(255)[None]
    detections = embedder.detect(video[0])
    v = video.clone().requires_grad_(True)
    t0 = time.perf_counter()
    with torch.no_grad():
        embedder.embed(v, detections)
    fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    faces = embedder.embed(v, detections)
    faces.embeddings.sum().backward()
    fwd_bwd = time.perf_counter() - t0
    return fwd, fwd_bwd, faces.num_faces


def main() -> list[dict]:
    from ipro.data.footage import carphone

    torch.set_num_threads(1)
    frames = carphone()[::2][:FRAMES]
    t_ours, n_ours = ours(frames)
    t_dlib, n_dlib = native_dlib(frames)
    fps_ours, fps_dlib = n_ours / t_ours, n_dlib / t_dlib
    fwd, fwd_bwd, n = backward_per_face(frames)
    rows = [
        {"name": f"detect+align+embed, {len(frames)} carphone frames (faces/s; ours {n_ours} faces, dlib {n_dlib})",
         "ours": fps_ours, "reference": fps_dlib, "ratio": fps_ours / fps_dlib, "unit": "faces/s (higher is better)"},
        {"name": f"align+embed forward+backward vs forward only ({n} faces)",
         "ours": 1000 * fwd_bwd / n, "reference": 1000 * fwd / n, "ratio": fwd_bwd / fwd, "unit": "ms/face"},
    ]
    for r in rows:
        print(f"{r['name']}: ours {r['ours']:.3g}, reference {r['reference']:.3g}, ratio {r['ratio']:.3g} {r['unit']}")
    return rows


if __name__ == "__main__":
    main()
