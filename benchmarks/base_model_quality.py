"""Base-model quality against real held-out clips: the three bars of issue #19, point 1.

Inputs: the demo's held-out carphone clips (frames 80, 88, 96, 103 on, every other
frame, 128x160x9, as `ipro.demo` cuts them), each animated with 3 seeds (12 videos),
scored by `ipro eval` next to the real clips themselves (written through the same
H.264 encoder). Printed, for the model and for the committed `pixel-i2v` (the
reference, unless the model is that one):

- blockiness (8-px grid energy, `ipro.eval.blockiness`): bar = within 10% of the real
  clips', i.e. a ratio to real in [0.9, 1.1];
- motion px (mean top-5% DIS flow per frame pair): bar = ratio to real >= 0.6;
- FaceSim fall (first quarter minus last quarter of the clip, vs the input face): bar =
  at least half of the committed model's fall, with faces found in >= 90% of frames.

Videos are stored with H.264 at --crf, real and generated alike. The default, 0, keeps the
luma lossless, so blockiness reads the model's own block pattern: at `ipro generate`'s
default crf 18 the codec adds 8x8 edges of its own, more to noisy generated frames than to
the real clips (measured 2026-12-03: a model with raw blockiness 0.97-1.07, real clips
0.99-1.03, reads 1.18-1.28 against the real clips' 1.06-1.11 at crf 18; benchmarks/RESULTS.md).

Generated videos and eval results are kept under --work (a rerun reuses them; delete a
model's folder there after retraining it).

    python benchmarks/base_model_quality.py [MODEL_DIR ...] [--work DIR] [--steps 4] [--crf 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

METRICS = ("blockiness", "motion_px", "face_sim_fall", "face_coverage", "face_sim", "dynamic_degree")


def heldout_inputs(work: Path, crf: int) -> Path:
    """The demo's carphone held-out items: name_sSEED.png and its real clip name_sSEED.mp4."""
    from ipro.data.footage import carphone
    from ipro.data.video import write_image, write_video
    from ipro.demo import FRAME_STEP, HELDOUT_STARTS, NUM_FRAMES, SEEDS, _fit, seeded

    inputs = work / f"inputs-crf{crf}"
    video = carphone()
    for start in HELDOUT_STARTS:
        clip = _fit(video[start : start + FRAME_STEP * NUM_FRAMES : FRAME_STEP])
        for seed in SEEDS:
            item = inputs / seeded(f"carphone_{start}", seed)
            if not item.with_suffix(".mp4").is_file():
                write_video(item.with_suffix(".mp4"), clip, fps=16, crf=crf)
                write_image(item.with_suffix(".png"), clip[0])
    return inputs


def scores(videos: Path, inputs: Path, out: Path, evaluator) -> dict:
    """Mean of each metric over the videos (a cached eval when out/metrics.json exists)."""
    from ipro.eval import evaluate, load_run

    result = load_run(out) if (out / "metrics.json").is_file() else evaluate(videos, inputs, out, evaluator=evaluator)
    return {k: result["aggregate"][k]["mean"] for k in METRICS}


def generated(model_dir: Path, inputs: Path, out: Path, steps: int, crf: int) -> Path:
    from ipro.demo import NUM_FRAMES
    from ipro.generate import generate_folder

    return generate_folder(model_dir, None, inputs, out, num_frames=NUM_FRAMES, steps=steps, crf=crf)


def bars(model: dict, real: dict, reference: dict) -> dict:
    """Each bar as a ratio and whether it is met."""
    block = model["blockiness"] / real["blockiness"]
    motion = model["motion_px"] / real["motion_px"]
    fall = model["face_sim_fall"] / reference["face_sim_fall"] if reference["face_sim_fall"] and model["face_sim_fall"] is not None else float("nan")
    return {
        "blockiness / real": (block, abs(block - 1) <= 0.1),
        "motion / real": (motion, motion >= 0.6),
        "FaceSim fall / committed": (fall, fall >= 0.5 and model["face_coverage"] >= 0.9),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", default=["builtin"], help="model folders (default: the committed pixel-i2v)")
    parser.add_argument("--work", default="/tmp/ipro-base-model-quality", help="where videos and eval results are kept")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--crf", type=int, default=0, help="H.264 quality of every stored video (0: lossless luma)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from ipro.eval import Evaluator
    from ipro.models import resolve_model_path

    work = Path(args.work)
    t0 = time.perf_counter()
    inputs = heldout_inputs(work, args.crf)
    evaluator = Evaluator()
    real = scores(inputs, inputs, work / "eval" / f"real-crf{args.crf}", evaluator)
    builtin = resolve_model_path("builtin", work)
    # A run's folder is runs/NAME/model: name it by its last two parts.
    models = {"committed": builtin, **{"_".join(Path(m).parts[-2:]): resolve_model_path(m, work) for m in args.models if m != "builtin"}}
    rows = {}
    for name, path in models.items():
        slug = f"{name}-{args.steps}steps-crf{args.crf}"
        videos = generated(path, inputs, work / "videos" / slug, args.steps, args.crf)
        rows[name] = scores(videos, inputs, work / "eval" / slug, evaluator)
    print(f"held-out carphone clips, 12 videos (4 inputs x 3 seeds), 128x160x9, {args.steps} steps, crf {args.crf}; "
          f"{(time.perf_counter() - t0) / 60:.1f} min")
    print("| model | " + " | ".join(METRICS) + " | blockiness / real | motion / real | FaceSim fall / committed |")
    print("|---" * (len(METRICS) + 4) + "|")
    print("| real clips | " + " | ".join(f"{real[k]:.4f}" for k in METRICS) + " | 1 | 1 | - |")
    for name, row in rows.items():
        met = bars(row, real, rows["committed"])
        cells = [f"{v:.3f} ({'met' if ok else 'not met'})" for v, ok in met.values()]
        print(f"| {name} | " + " | ".join("-" if row[k] is None else f"{row[k]:.4f}" for k in METRICS) + " | " + " | ".join(cells) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
