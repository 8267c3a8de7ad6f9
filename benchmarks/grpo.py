"""Identity-GRPO's cost, and its reward gain per CPU-minute against IPRO, in one run.

Data: carphone curated by `ipro prepare` (configs/prepare-tiny.yaml, 3 clips). Adam, a
rank-4 LoRA, 4 sampler steps, 9 frames, one torch thread, 10 optimizer steps per run.
GRPO: groups of 4 videos, every SDE step trained, KL 0.004 (the public setting). IPRO:
one video per step, K = 2 gradient steps, KL weight 1 (the paper's). Each method runs at
every learning rate of its list and reports its best gain per CPU-minute. Gain = the
reward on fixed inputs and noise (ODE sampler, 4 videos per input) after the steps minus
before; CPU time = process time of the training steps.

Two setups:
- "stand-in" (always): the tiny random Wan 2.1 I2V preset at 64x64. Its videos contain no
  faces (random weights), so the face reward is 0 for every sample and neither method can
  gain anything on it. Both optimize the same stand-in: the mean brightness of the
  generated frames, normalized (R - 0.5) / 0.01 like the face reward, read through a fixed
  linear latent -> RGB preview instead of the tiny random VAE (which barely responds to
  its latents; see tests/test_grpo.py). The preview is differentiable, so IPRO can
  backpropagate through it; GRPO needs no gradient.
- "faces" (when the embedded base model ipro/assets/base-model is present): that model
  at 128x160, which makes faces, with the real face-pool reward (MTCNN + dlib); gain in
  dlib cosine (FaceSim against the clip's pool).

Rows: rollout throughput (GRPO's rollout: SDE sampling with log-probs + decode + reward,
against the plain no-grad ODE sampler + decode on the same videos), update time (GRPO's
update, one forward+backward per SDE step plus the base-model KL pass, against a whole
IPRO step), gain per CPU-minute, gain, CPU time.

    python benchmarks/grpo.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

STEPS = 10
GROUP = 4
EVAL_SEEDS = 4  # videos per input in the held-out evaluation
REPO = Path(__file__).resolve().parent.parent


class Setup(NamedTuple):
    name: str
    model_path: str
    size: tuple[int, int]
    lrs: dict  # method -> learning rates to try
    unit: str
    stand_in: bool  # brightness through the latent preview, instead of the face reward


def _setups() -> list[Setup]:
    from ipro.models.pixel import BUILTIN_PATH

    out = [Setup("stand-in reward, tiny model (no faces)", "tiny:wan2.1-i2v", (64, 64),
                 {"grpo": (1e-3, 3e-3, 1e-2), "ipro": (1e-3, 3e-3, 1e-2)}, "brightness", True)]
    if (BUILTIN_PATH / "model_index.json").is_file():
        out.append(Setup("face reward, base model", str(BUILTIN_PATH), (128, 160),
                         {"grpo": (3e-3, 1e-2), "ipro": (1e-4, 1e-3, 1e-2)}, "FaceSim (dlib)", False))
    return out


def _brightness_reward():
    from ipro.rewards.base import Normalization, Reward, finish

    class Brightness(Reward):
        name = "brightness"

        def forward(self, frames, batch=None):
            raw = frames[:, 1:].float().mean(dim=(1, 2, 3, 4))
            anchor = frames.flatten()[:1].sum() * 0.0
            # Unit scale like the face reward's normalization, so that IPRO's reward and KL
            # terms are balanced as with faces (GRPO is scale-free).
            return finish(self.name, Normalization(0.5, 0.01), list(raw), frames.detach().float().mean(dim=(2, 3, 4)),
                          torch.arange(frames.shape[1]), anchor, 0.0)

    return Brightness()


def _latent_preview(model):
    proj = torch.randn(model.latent_channels, 3, generator=torch.Generator().manual_seed(0)) / 4

    def decode(latents, frames=None):
        rgb = torch.sigmoid(torch.einsum("bcfhw,cd->bfdhw", latents, proj))
        index = torch.tensor([model.latent_frame_of(i) for i in range(1 + 4 * (latents.shape[2] - 1))])
        up = F.interpolate(rgb[:, index].flatten(0, 1), scale_factor=model.scale_factor_spatial, mode="nearest")
        video = up.unflatten(0, (latents.shape[0], len(index)))
        return video if frames is None else video[:, list(frames)]

    return decode


def _dataset(root: Path) -> Path:
    from ipro.data.footage import carphone_path
    from ipro.data.prepare import load_config, prepare

    (root / "in").mkdir(parents=True)
    shutil.copy(carphone_path(), root / "in" / "carphone.mp4")
    prepare(root / "in", root / "data", load_config(REPO / "configs" / "prepare-tiny.yaml"))
    return root / "data"


def _trainer(setup: Setup, method: str, data: Path, out: Path, lr: float = 1e-2):
    from ipro.train.config import load_config
    from ipro.train.methods import trainer_class

    cfg = load_config(overrides={
        "method": method, "data.dataset": str(data), "data.height": setup.size[0], "data.width": setup.size[1],
        "data.num_frames": 9, "model.path": setup.model_path, "model.lora_rank": 4, "optim.lr": lr, "optim.steps": STEPS,
        "sampler.num_steps": 4, "run.output_dir": str(out), "run.log_with": [], "run.device": "cpu", "run.seed": 3,
        # Each method's own keys (the other method's are refused).
        **({"grpo.group_size": GROUP} if method == "grpo" else
           {"sampler.grad_steps": 2, **({"reward.weight": 1.0} if setup.stand_in else {})}),
    })
    trainer = trainer_class(method)(cfg, reward=_brightness_reward() if setup.stand_in else None)
    if setup.stand_in:
        trainer.model.decode = _latent_preview(trainer.model)
    return trainer


def _held_out(trainer) -> float:
    """Mean raw reward of EVAL_SEEDS videos per input, fixed noise, ODE sampler."""
    from ipro.data.dataset import collate
    from ipro.rewards import RewardBatch
    from ipro.sampling import sample

    model, c = trainer.model, trainer.config.data
    batch = collate([trainer.dataset[i] for i in range(len(trainer.dataset))])
    cond = model.prepare_condition(batch["image"], ["a person talking"] * len(batch["id"]), 9, c.height, c.width)
    refs = RewardBatch(pools=[p for p in batch["pool"] for _ in range(EVAL_SEEDS)],
                       input_frames=batch["image"].repeat_interleave(EVAL_SEEDS, 0))
    with torch.no_grad():
        latents = sample(model, cond.repeat_interleave(EVAL_SEEDS), num_steps=4, grad_steps=0, seed=123, guidance_scale=1.0).latents
        out = trainer.reward(model.decode(latents), refs)
    return float(out.raw[out.valid].mean())


def _train(trainer) -> tuple[float, float, list[dict]]:
    before = _held_out(trainer)
    t0 = time.process_time()
    logs = [trainer.step() for _ in range(STEPS)]
    cpu = time.process_time() - t0
    return _held_out(trainer) - before, cpu, logs


def _throughput(grpo) -> tuple[float, float]:
    """Videos/s of GRPO's rollout and of the plain ODE sampler + decode, best of 3, interleaved."""
    from ipro.sampling import sample
    from ipro.train.trainer import step_generator

    batch, model, c = grpo.batch_at(0, 0), grpo.model, grpo.config.data
    ours, ref = [], []
    for r in range(3):
        t = time.perf_counter()
        grpo.rollout(batch, step_generator(0, r, 0, 0))
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.no_grad():
            prompts = [p or c.default_prompt for p in batch["caption"]]
            cond = model.prepare_condition(batch["image"], prompts, 9, c.height, c.width).repeat_interleave(GROUP)
            model.decode(sample(model, cond, num_steps=4, grad_steps=0, seed=r, guidance_scale=1.0).latents)
        ref.append(time.perf_counter() - t)
    return GROUP / min(ours), GROUP / min(ref)


def run_setup(setup: Setup, data: Path, tmp: Path) -> list[dict]:
    tag = f"[{setup.name}]"
    rows = []
    runs = {}
    for method, lrs in setup.lrs.items():
        for lr in lrs:
            trainer = _trainer(setup, method, data, tmp / f"{method}-{lr}", lr)
            if method == "grpo" and not rows:
                v_ours, v_ref = _throughput(trainer)
                rows.append({"name": f"{tag} rollout, G={GROUP} (SDE + log-probs + reward vs ODE sampler + decode)",
                             "ours": v_ours, "reference": v_ref, "ratio": v_ours / v_ref, "unit": "videos/s"})
                trainer = _trainer(setup, method, data, tmp / f"{method}-{lr}-fresh", lr)
            gain, cpu, logs = _train(trainer)
            print(f"{tag} {method} lr {lr:g}: gain {gain:+.4g} {setup.unit} in {cpu:.1f} s CPU", file=sys.stderr)
            if method not in runs or gain / cpu > runs[method][1] / runs[method][2]:
                runs[method] = (lr, gain, cpu, logs)
    (lr_g, gain_g, cpu_g, logs_g), (lr_i, gain_i, cpu_i, logs_i) = runs["grpo"], runs["ipro"]
    upd = sorted(lg["update_time_s"] for lg in logs_g)[len(logs_g) // 2]
    ipro_step = sorted(lg["step_time_s"] for lg in logs_i)[len(logs_i) // 2]
    rows.append({"name": f"{tag} update per step (GRPO: 4 SDE steps x {GROUP} videos; IPRO: a whole step)",
                 "ours": upd, "reference": ipro_step, "ratio": upd / ipro_step, "unit": "s (median)"})
    per_min_g, per_min_i = gain_g / (cpu_g / 60), gain_i / (cpu_i / 60)
    rows.append({"name": f"{tag} reward gain per CPU-minute, {STEPS} steps (GRPO lr {lr_g:g} vs IPRO lr {lr_i:g})",
                 "ours": per_min_g, "reference": per_min_i, "ratio": per_min_g / per_min_i if per_min_i > 0 else None,
                 "unit": f"{setup.unit}/min"})
    rows.append({"name": f"{tag} reward gain after {STEPS} steps", "ours": gain_g, "reference": gain_i,
                 "ratio": gain_g / gain_i if gain_i > 0 else None, "unit": setup.unit})
    rows.append({"name": f"{tag} CPU time of {STEPS} steps", "ours": cpu_g, "reference": cpu_i, "ratio": cpu_g / cpu_i, "unit": "s"})
    return rows


def main() -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = _dataset(tmp)
        for i, setup in enumerate(_setups()):
            rows += run_setup(setup, data, tmp / str(i))
    return rows


if __name__ == "__main__":
    for row in main():
        print(row)
