"""IPRO step time against the sum of its parts, measured in the same run.

The parts are run by hand exactly as the trainer runs them (condition, rollout with
K gradient steps, partial decode, face reward, multi-step KL, backward, optimizer
step); the ratio (step / sum of parts) is the trainer's own overhead: data loading,
collation, accelerate wrappers, logging. Target: <= 1.10.

    python benchmarks/train_step.py [--model tiny:wan2.1-i2v] [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def dataset(root: Path) -> Path:
    from ipro.data.footage import carphone_path
    from ipro.data.prepare import load_config, prepare

    (root / "in").mkdir(parents=True)
    shutil.copy(carphone_path(), root / "in" / "carphone.mp4")
    prepare(root / "in", root / "data", load_config(REPO / "configs" / "prepare-tiny.yaml"))
    return root / "data"


def parts(trainer, step: int) -> dict[str, float]:
    from ipro.rewards import RewardBatch
    from ipro.sampling import sample
    from ipro.train.ipro import multistep_kl
    from ipro.train.trainer import step_generator

    c, m = trainer.config, trainer.model
    gen = step_generator(c.run.seed, step, 0, 0)
    batch, t_data = timed(lambda: trainer.batch_at(step, 0))
    images = batch["image"]
    cond, t_cond = timed(lambda: m.prepare_condition(images, [x or c.data.default_prompt for x in batch["caption"]], c.data.num_frames, c.data.height, c.data.width))
    rollout, t_roll = timed(lambda: sample(m, cond, num_steps=c.sampler.num_steps, grad_steps=c.sampler.grad_steps, generator=gen, guidance_scale=c.sampler.guidance_scale))
    frames, t_dec = timed(lambda: m.decode(rollout.latents))
    out, t_rew = timed(lambda: trainer.reward(frames, RewardBatch(pools=batch["pool"], input_frames=images)))
    kl, t_kl = timed(lambda: multistep_kl(m, rollout, cond, c.kl.weighting))
    loss = -c.reward.weight * out.mean() + c.kl.weight * kl
    _, t_bwd = timed(loss.backward)
    _, t_clip = timed(lambda: torch.nn.utils.clip_grad_norm_(m.trainable_parameters(), c.optim.max_grad_norm))
    _, t_opt = timed(lambda: (trainer.optimizer.step(), trainer.optimizer.zero_grad(set_to_none=True)))
    return {"data": t_data, "condition": t_cond, "rollout": t_roll, "decode": t_dec, "reward": t_rew, "kl": t_kl,
            "backward": t_bwd, "clip": t_clip, "optimizer": t_opt}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny:wan2.1-i2v")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv or [])
    torch.set_num_threads(1)
    from ipro.train.config import load_config
    from ipro.train.ipro import IPROTrainer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = load_config(overrides={
            "data.dataset": str(dataset(tmp)), "data.height": 128, "data.width": 160, "data.num_frames": 9,
            "model.path": args.model, "model.lora_rank": 8, "sampler.num_steps": 4, "sampler.grad_steps": 2,
            "run.output_dir": str(tmp / "run"), "run.log_with": [], "run.device": "cpu", "optim.steps": 1000,
        })
        trainer = IPROTrainer(cfg)
        trainer.step()  # warm-up
        parts(trainer, 0)
        steps, sums, split = [], [], {}
        for i in range(args.repeats):  # interleave so load changes hit both sides
            steps.append(timed(trainer.step)[1])
            p = parts(trainer, i)
            sums.append(sum(p.values()))
            for k, v in p.items():
                split[k] = split.get(k, 0.0) + v / args.repeats
    step_t, sum_t = sorted(steps)[len(steps) // 2], sorted(sums)[len(sums) // 2]
    share = ", ".join(f"{k} {100 * v / sum(split.values()):.0f}%" for k, v in split.items())
    rows = [{"name": f"IPRO step vs sum of parts ({args.model}, 128x160x9, K=2 of 4; parts: {share})",
             "ours": step_t, "reference": sum_t, "ratio": step_t / sum_t, "unit": "s (median of %d)" % args.repeats}]
    for r in rows:
        print(f"{r['name']}: step {r['ours']:.3f} s, parts {r['reference']:.3f} s, ratio {r['ratio']:.3f}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
