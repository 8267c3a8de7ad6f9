"""A second look at settings chosen on the demo's held-out set: the same inputs animated with
other noise seeds (default 3, 4, 5; the demo uses 0, 1, 2), by the LoRAs that
`benchmarks/ipro_motion.py` already trained in --out (training does not depend on these seeds).

Prints, per run, the gap closed, dynamic degree and motion against the base model, and the
rigid rate minus the base model's with a paired 95% interval (resampling inputs).

    python benchmarks/confirm_seeds.py [--out runs/ipro_motion] [--seeds 3 4 5] RUN_SLUG ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    from ipro.demo import evaluated, generate, ground_truth_scores, summarize, write_footage
    from ipro.eval import Evaluator
    from ipro.models import resolve_model_path
    from ipro_motion import change_table  # benchmarks/, beside this script

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders under OUT/runs (e.g. ipro, lr-3e-4-kl-50)")
    ap.add_argument("--out", default="runs/ipro_motion")
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    root = out / ("seeds-" + "-".join(map(str, args.seeds)))
    _, heldout = write_footage(root / "footage", tuple(args.seeds))
    about = json.loads((root / "footage" / "inputs.json").read_text())
    model = resolve_model_path("builtin", out)
    evaluator = Evaluator()
    ceiling = ground_truth_scores(heldout, root, args.seeds[0], evaluator)
    results = {"base": evaluated(generate(model, None, heldout, root / "videos" / "base", 4), heldout, root / "eval" / "base", evaluator)}
    for slug in args.runs:
        lora = out / "runs" / slug / f"checkpoint-{args.steps}" / "lora"
        videos = generate(model, lora, heldout, root / "videos" / slug, 4)
        results[slug] = evaluated(videos, heldout, root / "eval" / slug, evaluator)
    rows = summarize(results, ceiling, about)
    base = rows[0]
    print(f"\nseeds {args.seeds}\n" + change_table(rows, results))
    print(f"base: rigid {base['rigid']['value']:.2f}, dynamic degree {base['dynamic_degree']['value']:.2f}, motion {base['motion_px']['value']:.2f} px")


if __name__ == "__main__":
    main()
