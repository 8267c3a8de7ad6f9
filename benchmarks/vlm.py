"""VLM reward input preparation: our torch patch layout against transformers' processor.

What the reward model does per video before the VLM runs: 1 subject image + 8 frames of
carphone, resized to 224 x 224 and laid out as Qwen2.5-VL patch rows. Ours
(`VlmRewardModel.pixels`: interpolate + normalize + reshape in torch, batched) against
transformers' `Qwen2VLImageProcessorPil` on the same frames as PIL images (what
`AutoProcessor` would do without torchvision). Best of a few repeats, one thread, both in
this run. The two differ only by the resampling filter (torch bicubic vs PIL bicubic).

    python benchmarks/vlm.py
"""

from __future__ import annotations

import time

import numpy as np
import torch

REPEATS = 7


def best(fn) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> list[dict]:
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ipro.data.footage import carphone
    from ipro.rewards.vlm import CLIP_MEAN, CLIP_STD, patchify

    torch.set_num_threads(1)
    frames = carphone()[::13][:9]  # (9, 144, 176, 3): a subject image and 8 frames
    video = torch.from_numpy(np.ascontiguousarray(frames)).float().div(255).movedim(-1, -3)
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]

    def ours():
        x = torch.nn.functional.interpolate(video, size=(224, 224), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return patchify((x - mean) / std, 14, 2, 2)[0]

    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 224 * 224, "longest_edge": 224 * 224})

    def reference():
        images = [Image.fromarray(f).resize((224, 224), Image.Resampling.BICUBIC) for f in frames]
        return processor(images=images, return_tensors="pt")["pixel_values"]

    a, b = ours(), reference()
    assert a.shape == b.shape, (a.shape, b.shape)
    t_ours, t_ref = best(ours), best(reference)
    return [
        {"name": "9 images -> Qwen2.5-VL patch rows (224 px)", "ours": t_ours * 1e3, "reference": t_ref * 1e3,
         "ratio": t_ref / t_ours, "unit": "ms (ratio: processor / ours)"},
        {"name": "mean |ours - processor| (normalized pixels)", "ours": float((a - b).abs().mean()), "reference": None,
         "ratio": None, "unit": "resampling filter only"},
    ]


if __name__ == "__main__":
    for row in main():
        print(row)
