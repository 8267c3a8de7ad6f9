"""IPRO on the embedded base model (it makes faces) and carphone curated by `ipro prepare`.

One module fixture trains the CPU preset twice for 20 steps from the same seed, with the
preset's KL weight and with the KL off; the tests read what the two runs measured.
Numbers in comments were measured on this CPU with one thread.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ipro.models.pixel import BUILTIN_PATH

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (BUILTIN_PATH / "model_index.json").is_file(), reason="the embedded base model is not in this checkout"),
]

PRESET = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu-ipro.yaml"
STEPS = 20
SEEDS = (11, 12, 13, 14)  # rollout noise for measuring the reward; not used in training


def make_trainer(dataset: Path, out: Path, **overrides):
    from ipro.train.config import load_config
    from ipro.train.ipro import IPROTrainer

    base = {"data.dataset": str(dataset), "optim.steps": STEPS, "run.output_dir": str(out), "run.log_with": [],
            "run.checkpoint_every": 1000, "run.seed": 0}
    return IPROTrainer(load_config(PRESET, {**base, **overrides}))


@torch.no_grad()
def training_reward(trainer) -> float:
    """Mean raw face reward (dlib cosine to the clip's pool) of ODE rollouts from every
    training clip's first frame, with fixed noise: the same videos before and after."""
    from ipro.data.dataset import collate
    from ipro.rewards import RewardBatch

    batch = collate([trainer.dataset[i] for i in range(len(trainer.dataset))])
    values = []
    for seed in SEEDS:
        _, rollout = trainer.rollout(batch, torch.Generator().manual_seed(seed), grad=False)
        frames = trainer.model.decode(rollout.latents)
        out = trainer.reward(frames, RewardBatch(pools=batch["pool"], input_frames=batch["image"]))
        values.append(out.raw)
    raw = torch.cat(values)
    assert torch.isfinite(raw).all(), "a face went missing: the measurement would be biased"
    return float(raw.mean())


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    from ipro.train.config import load_config

    preset_beta = load_config(PRESET, {"data.dataset": str(dataset)}).kl.weight
    results = {}
    for name, beta in (("preset", preset_beta), ("kl_off", 0.0)):
        trainer = make_trainer(dataset, tmp_path_factory.mktemp(name), **{"kl.weight": beta})
        # The reward is asserted on the preset run only: the KL-off run is there for its KL.
        before = training_reward(trainer) if name == "preset" else None
        logs = [trainer.step() for _ in range(STEPS)]
        after = training_reward(trainer) if name == "preset" else None
        results[name] = {"beta": beta, "before": before, "after": after, "kl": [float(x["kl"]) for x in logs]}
    return results


def test_twenty_steps_raise_the_face_reward_on_training_clips(runs):
    r = runs["preset"]
    # Measured (3 clips x 4 noise draws, the same videos before and after), on the new base
    # model: lr 1e-4 gained +0.0010 (0.9653 -> 0.9663), too little to tell from noise; the
    # preset's lr 3e-4: see the assertion's message when it fails. 20 steps is a short run.
    assert r["after"] > r["before"] + 0.002, r


def test_kl_weight_keeps_the_kl_below_the_kl_off_run(runs):
    on, off = runs["preset"], runs["kl_off"]
    assert on["beta"] > 0 and on["kl"][0] == off["kl"][0] == 0.0  # LoRA B starts at 0: policy = base model
    last_on, last_off = sum(on["kl"][-5:]) / 5, sum(off["kl"][-5:]) / 5
    # Measured, mean of the last 5 steps: 7.1e-6 with the KL on against 8.8e-6 off (0.81x);
    # the gap widens with steps (after 60 steps: 6.6e-5 against 1.8e-4, 0.37x).
    assert last_on < 0.9 * last_off, (last_on, last_off)
