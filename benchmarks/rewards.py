"""Face reward cost: forward+backward per video, and where the time goes.

Two videos of 17 frames at 256x256 made from carphone (centre square, resized), scored
against carphone's pool with `FaceIdentityReward` (MTCNN + dlib port), single thread.
Shares, timed inside one forward+backward: detection (MTCNN, no_grad) / alignment +
embedding forward plus the whole backward (which runs through the recognizer and the
warp) / the rest of the forward (assignment, tracking, scoring). Best of a few
repeats, all measured in this run.

    python benchmarks/rewards.py              # timings
    python benchmarks/rewards.py --calibrate  # the dlib normalization measurement
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

REPEATS = 5


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).float().div(255).movedim(-1, -3)


def videos_256() -> torch.Tensor:
    """(2, 17, 3, 256, 256): two different stretches of carphone, centre square."""
    from ipro.data.footage import carphone

    clip = to_tensor(carphone())[..., :, 16:160]  # 144x144 centre
    clip = F.interpolate(clip, size=(256, 256), mode="bilinear", align_corners=False).clamp(0, 1)
    return torch.stack([clip[0:68:4], clip[50:118:4]])


def timed(obj, method: str, log: dict) -> None:
    """Make obj.method add its run time to log[method] (instance attribute override)."""
    fn = getattr(obj, method)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            log[method] = log.get(method, 0.0) + time.perf_counter() - t0

    setattr(obj, method, wrapper)


def main() -> list[dict]:
    from ipro.data.footage import carphone
    from ipro.faces.embedder import FaceEmbedder
    from ipro.rewards import FaceIdentityReward, FrameSelection, pools_from_video

    torch.set_num_threads(1)
    embedder = FaceEmbedder()
    pool = pools_from_video(embedder, to_tensor(carphone())[None], identity_threshold=0.92)[0]
    video = videos_256()
    b = video.shape[0]
    batch = {"pools": [pool] * b}
    reward = FaceIdentityReward(embedder)
    subset = FaceIdentityReward(embedder, frames=FrameSelection(count=5))
    log: dict[str, float] = {}
    timed(embedder, "detect", log)
    timed(embedder, "forward", log)  # validate + detect + align + embed

    def fwd_bwd(r=reward) -> dict:
        log.clear()
        frames = video.clone().requires_grad_(True)
        t0 = time.perf_counter()
        out = r(frames, batch)
        t1 = time.perf_counter()
        out.mean().backward()  # almost all of it runs back through the recognizer and the warp
        t2 = time.perf_counter()
        return {"total": t2 - t0, "detect": log["detect"], "embed": log["forward"] - log["detect"] + t2 - t1,
                "rest": (t1 - t0) - log["forward"], "faces": out.logs["face/faces"]}

    def fwd() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            reward(video, batch)
        return time.perf_counter() - t0

    fwd_bwd()  # warm-up
    run = min((fwd_bwd() for _ in range(REPEATS)), key=lambda r: r["total"])
    t_fwd = min(fwd() for _ in range(REPEATS))
    t_subset = min(fwd_bwd(subset)["total"] for _ in range(REPEATS))
    t_total, per = run["total"], 1.0 / b
    rows = [
        {"name": f"face reward forward+backward vs forward only ({b}x17x256^2, {run['faces']:.0f} faces)",
         "ours": t_total * per, "reference": t_fwd * per, "ratio": t_total / t_fwd, "unit": "s/video"},
        {"name": "  detection (MTCNN, no grad); ratio = share of forward+backward",
         "ours": run["detect"] * per, "reference": t_total * per, "ratio": run["detect"] / t_total, "unit": "s/video"},
        {"name": "  align + embed, forward and backward; ratio = share",
         "ours": run["embed"] * per, "reference": t_total * per, "ratio": run["embed"] / t_total, "unit": "s/video"},
        {"name": "  rest (assignment, tracking, scoring); ratio = share",
         "ours": run["rest"] * per, "reference": t_total * per, "ratio": run["rest"] / t_total, "unit": "s/video"},
        {"name": "FrameSelection(count=5) vs all 17 frames, forward+backward",
         "ours": t_subset * per, "reference": t_total * per, "ratio": t_subset / t_total, "unit": "s/video"},
    ]
    for r in rows:
        print(f"{r['name']}: ours {r['ours']:.3g}, reference {r['reference']:.3g}, ratio {r['ratio']:.3g} {r['unit']}")
    return rows


def calibrate() -> dict:
    """Per-frame FSM values s_i of the same person and of other people against
    carphone's pool, with the default MTCNN + dlib port; the normalization follows."""
    from ipro.data.footage import astronaut, carphone
    from ipro.data.video import read_image
    from ipro.faces.embedder import FaceEmbedder
    from ipro.faces.weights import package_file

    torch.set_num_threads(1)
    embedder = FaceEmbedder()
    with torch.no_grad():
        pool = embedder(to_tensor(carphone())[None]).embeddings
        same = pool @ pool.mean(0)  # s_i of each carphone frame against its own pool
        camera = read_image(package_file("skimage", "data", "camera.png"))
        camera = np.repeat(camera[..., None], 3, -1) if camera.ndim == 2 else camera[..., :3]
        others = {"astronaut 512px": to_tensor(astronaut()), "astronaut 144px": F.interpolate(
            to_tensor(astronaut())[None], size=(144, 144), mode="area")[0], "cameraman": to_tensor(camera)}
        diff = {k: float((embedder(v[None, None]).embeddings @ pool.mean(0)).mean()) for k, v in others.items()}
    result = {"same_mean": float(same.mean()), "same_min": float(same.min()), "same_max": float(same.max()), **diff}
    gap = result["same_mean"] - float(np.mean(list(diff.values())))
    result["suggested_mean"], result["suggested_std"] = result["same_mean"] - gap / 4, gap / 4
    for k, v in result.items():
        print(f"{k}: {v:.4f}")
    return result


if __name__ == "__main__":
    calibrate() if "--calibrate" in sys.argv else main()
