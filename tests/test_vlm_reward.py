"""The VLM backbone of the identity reward model (Identity-GRPO's choice) on a Qwen2.5-VL
built from a config with random weights (the 3B checkpoint cannot be downloaded here),
with the real synthetic pairs from carphone. Numbers in comments were measured on this
CPU with one thread."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import to_tensor

from ipro.data.pairs import load_pairs
from ipro.errors import IproError
from ipro.rewards.learned import evaluate_files, load_reward_model
from ipro.rewards.vlm import VlmIdentityReward, VlmRewardModel, patchify, train_vlm_reward_model


def test_patch_layout_is_the_transformers_image_processor_s(astronaut):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    small = np.asarray(Image.fromarray(astronaut).resize((84, 56), Image.Resampling.BICUBIC))
    expected = Qwen2VLImageProcessorPil()(images=[Image.fromarray(small)], return_tensors="pt")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    rows, grid = patchify((to_tensor(small)[None] - mean) / std, 14, 2, 2)
    assert grid == expected["image_grid_thw"][0].tolist() == [1, 4, 6]
    torch.testing.assert_close(rows, expected["pixel_values"], atol=1e-5, rtol=0)


def test_no_checkpoint_or_another_family_is_a_clear_error(tmp_path):
    with pytest.raises(IproError, match="no VLM checkpoint there"):
        VlmRewardModel(tmp_path / "Qwen2.5-VL-3B-Instruct")
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(IproError, match="model_type 'llava' is not supported"):
        VlmRewardModel(tmp_path)


@pytest.fixture(scope="module")
def trained(tiny_vlm, pairs_dir, tmp_path_factory):
    """LoRA r8 + value head trained on the swap and flicker training pairs."""
    train = [p for p in load_pairs(pairs_dir / "train.jsonl") if p.kind in ("swap", "flicker")]
    model = VlmRewardModel(tiny_vlm, num_frames=4, lora_rank=8, image_size=56)
    before = evaluate_files(model, train)
    train_vlm_reward_model(model, train, epochs=3, lr=3e-3, seed=0)
    return model, train, before, model.save(tmp_path_factory.mktemp("vlm-rm") / "rm")


def test_training_ranks_the_training_pairs(trained):
    model, train, before, _ = trained
    after = evaluate_files(model, train)
    print(before["accuracy"], after["accuracy"], model.normalization)
    assert after["accuracy"] > before["accuracy"] + 0.2


def test_saved_model_loads_back_with_the_same_scores(trained, pairs_dir):
    model, train, _, folder = trained
    assert (folder / "adapter" / "adapter_config.json").is_file()
    again = load_reward_model(folder)
    assert isinstance(again, VlmRewardModel) and again.normalization == model.normalization
    p = train[0]
    assert again.score_files([p.video_a, p.video_b], p.subjects) == pytest.approx(model.score_files([p.video_a, p.video_b], p.subjects), abs=1e-5)


def test_a_batch_scores_as_each_video_alone(trained, carphone, astronaut):
    """Videos with different numbers of subject images are left-padded into one batch;
    each must score as it does alone."""
    model = trained[0]
    frames = to_tensor(carphone[:9])[None].repeat(2, 1, 1, 1, 1)
    frames[1, 4:] = frames[1, 4:].flip(-1)
    subj = [frames[0, :1], torch.stack([frames[1, 0], to_tensor(astronaut)[:, :144, :176]])]
    with torch.no_grad():
        batch = model(subj, frames)
        alone = torch.cat([model(subj[i : i + 1], frames[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=0)
    out = VlmIdentityReward(model)(frames, {"subjects": subj})
    torch.testing.assert_close(out.raw, batch, atol=1e-5, rtol=0)
    assert out.valid.all()


def test_grpo_trains_against_the_vlm_reward(trained, dataset, tmp_path):
    from ipro.train.config import load_config
    from ipro.train.grpo import GRPOTrainer

    cfg = load_config("configs/tiny-cpu-grpo.yaml", {
        "data.dataset": str(dataset), "data.height": 64, "data.width": 64, "grpo.group_size": 2, "grpo.face_reward_weight": 0.0,
        "grpo.reward_model": str(trained[3]), "run.output_dir": str(tmp_path / "run"), "run.log_with": [], "optim.steps": 1,
    })
    trainer = GRPOTrainer(cfg)
    assert isinstance(trainer.reward, VlmIdentityReward)
    logs = trainer.step()
    assert np.isfinite(logs["reward/identity_vlm/raw"]) and logs["valid_fraction"] == 1.0


@pytest.mark.slow  # a CLI run in a subprocess, or many: the fast subset stays under 3 minutes
def test_cli_trains_and_scores_with_the_vlm_backbone(tiny_vlm, pairs_dir, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    ipro = str(Path(sys.executable).with_name("ipro"))
    train = pairs_dir / "vlm-cli-train.jsonl"  # beside the pairs: their paths are relative to the file
    rows = [r for r in (pairs_dir / "train.jsonl").read_text().splitlines() if json.loads(r)["kind"] == "swap"][:4]
    train.write_text("\n".join(rows) + "\n")
    rm = tmp_path / "rm"
    out = subprocess.run([ipro, "reward-model", "train", "--backbone", "vlm", "--vlm", str(tiny_vlm), "--pairs", str(train), "--out", str(rm),
                          "--frames", "4", "--vlm-image-size", "56", "--vlm-lora-rank", "4", "--epochs", "1", "--eval", str(train)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "eval: accuracy" in out.stdout and (rm / "adapter" / "adapter_model.safetensors").is_file()
    first = json.loads(rows[0])
    out = subprocess.run([ipro, "reward-model", "score", str(rm), first["video_a"], "--subject", first["subject"], "--json"],
                         capture_output=True, text=True, cwd=pairs_dir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert np.isfinite(json.loads(out.stdout)["score"])
    out = subprocess.run([ipro, "reward-model", "train", "--backbone", "vlm", "--vlm", str(tiny_vlm), "--pairs", str(train), "--out", str(rm),
                          "--vlm-image-size", "50"], capture_output=True, text=True)
    assert out.returncode == 2 and "image_size 50: must be a multiple of 28" in out.stderr
