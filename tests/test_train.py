"""The training loop on the tiny Wan preset and a dataset curated from real footage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import free_port

from ipro.errors import IproError

IPRO = str(Path(sys.executable).with_name("ipro"))


def config(dataset: Path, out: Path, **overrides):
    from ipro.train.config import load_config

    base = {
        "data.dataset": str(dataset), "data.height": 128, "data.width": 160, "data.num_frames": 9,
        "model.path": "tiny:wan2.1-i2v", "model.lora_rank": 4, "optim.steps": 4, "optim.lr": 1e-3,
        "sampler.num_steps": 4, "sampler.grad_steps": 2, "run.output_dir": str(out), "run.log_with": [],
        "run.checkpoint_every": 2, "run.device": "cpu", "run.seed": 3,
    }
    if overrides.get("method", "ipro") != "ipro":
        del base["sampler.grad_steps"]  # IPRO's K; another method's config refuses it
    base.update(overrides)
    return load_config(overrides=base)


def trainable(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.named_params.items()}


@pytest.mark.slow  # a CLI run in a subprocess, or many: the fast subset stays under 3 minutes
def test_bad_config_is_rejected_before_compute(tmp_path):
    cases = {
        "optim: {lrr: 0.1}\ndata: {dataset: x}\n": "unknown key 'optim.lrr'",
        "optim: {lr: fast}\ndata: {dataset: x}\n": "key 'optim.lr'",
        "data: {dataset: x, num_frames: 8}\n": "data.num_frames must be 4k+1",
        "sampler: {num_steps: 4, grad_steps: 6}\ndata: {dataset: x}\n": "sampler.grad_steps (6) cannot exceed",
        "data: [1, 2\n": "not valid YAML",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(text + f"run: {{output_dir: {tmp_path / f'out{i}'}}}\n" if "[" not in text else text)
        out = subprocess.run([IPRO, "train", "-c", str(path)], capture_output=True, text=True)
        assert out.returncode == 2, out.stderr
        assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert not (tmp_path / f"out{i}").exists()  # nothing was computed or written


@pytest.mark.slow  # a CLI run in a subprocess, or many: the fast subset stays under 3 minutes
def test_print_config_lists_documented_defaults():
    out = subprocess.run([IPRO, "train", "--print-config"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "grad_steps: 4  # K: the last K steps" in out.stdout and "lr: 2.0e-05" in out.stdout


@pytest.mark.slow  # keeps the fast subset under 3 minutes
def test_resume_is_exact(dataset, tmp_path):
    from ipro.train.sft import SFTTrainer

    straight = SFTTrainer(config(dataset, tmp_path / "a", method="sft"))
    straight.train()
    first = SFTTrainer(config(dataset, tmp_path / "b", method="sft", **{"optim.steps": 2}))
    first.train()
    resumed = SFTTrainer(config(dataset, tmp_path / "b", method="sft"))
    resumed.train(resume=True)
    a, b = trainable(straight), trainable(resumed)
    assert resumed.global_step == 4
    assert any(not torch.equal(v, first.named_params[k].detach()) for k, v in b.items())  # it trained on
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The checkpoint's LoRA is in diffusers format (what `ipro generate --lora` loads).
    assert (tmp_path / "a" / "checkpoint-4" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert [p.name for p in sorted((tmp_path / "a").glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.slow
def test_kill9_then_resume_matches_uninterrupted_run(dataset, tmp_path):
    def cmd(out: Path, steps: int, *extra: str) -> list[str]:
        sets = [f"data.dataset={dataset}", "data.height=128", "data.width=160", "data.num_frames=9", "model.path=tiny:wan2.1-i2v",
                "model.lora_rank=4", f"optim.steps={steps}", "optim.lr=1e-3", "sampler.num_steps=4", f"run.output_dir={out}",
                "run.log_with=[]", "run.checkpoint_every=1", "run.device=cpu", "method=sft"]
        return [IPRO, "train", *sum((["--set", s] for s in sets), []), *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd(tmp_path / "straight", 5), check=True, capture_output=True, env=env)
    proc = subprocess.Popen(cmd(tmp_path / "killed", 5), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while not (tmp_path / "killed" / "checkpoint-2" / "state.json").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "killed").glob("checkpoint-*"))
    assert done and max(done) < 5, done  # killed mid-run
    subprocess.run(cmd(tmp_path / "killed", 5, "--resume", "latest"), check=True, capture_output=True, env=env)
    a = load_file(tmp_path / "straight" / "checkpoint-5" / "trainable.safetensors")
    b = load_file(tmp_path / "killed" / "checkpoint-5" / "trainable.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_in_sync(dataset, tmp_path):
    script = Path(__file__).with_name("_ddp_train.py")
    # On CPU, torchrun starts the two processes (accelerate's own --cpu launcher starts one
    # unless MPI is set up); the Accelerator in each joins a gloo group.
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
              str(script), str(dataset), str(tmp_path)]
    out = subprocess.run(launch, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    init = load_file(tmp_path / "init.safetensors")
    assert r0.keys() == r1.keys() and len(r0) > 0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert any(not torch.equal(r0[k], init[k]) for k in r0)  # the step changed the weights


def test_ipro_step_on_faceless_rollouts_is_logged_not_a_crash(dataset, tmp_path):
    """The tiny preset has random weights, so its videos have no faces: the reward is a
    logged zero-gradient batch and the run goes on."""
    from ipro.train.ipro import IPROTrainer

    trainer = IPROTrainer(config(dataset, tmp_path, **{"optim.steps": 1}))
    logs = trainer.step()
    assert logs["reward/face/no_face_batch"] == 1.0 and logs["face_coverage"] == 0.0
    assert logs["loss"] == 0.0 and logs["grad_norm"] == 0.0 and logs["kl"] == 0.0  # LoRA B starts at 0


def test_nonfinite_losses_are_skipped_then_abort(dataset, tmp_path):
    from ipro.train.sft import SFTTrainer
    from ipro.train.trainer import NonFiniteLossError

    trainer = SFTTrainer(config(dataset, tmp_path, method="sft", **{"run.max_nonfinite": 2}))
    before = trainable(trainer)
    real = trainer.compute_loss

    def nan_loss(batch, generator):
        loss, logs = real(batch, generator)
        return loss * float("nan"), logs

    trainer.compute_loss = nan_loss
    logs = trainer.step()
    assert logs["nonfinite_skipped"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in trainable(trainer).items())  # skipped, not applied
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"):
        trainer.step()
    trainer.compute_loss = real
    assert trainer.step()["grad_norm"] > 0  # a good batch after the guard trains again


def test_missing_dataset_is_a_clear_error(tmp_path):
    from ipro.train.sft import SFTTrainer

    with pytest.raises(IproError, match="manifest.parquet: not found"):
        SFTTrainer(config(tmp_path / "nothing", tmp_path / "out", method="sft"))


@pytest.mark.slow  # keeps the fast subset under 3 minutes
def test_samples_ema_and_logs(dataset, tmp_path):
    """Sample videos are playable; EMA follows its formula and is checkpointed; CPU peak memory is logged."""
    from ipro.data.video import read_video
    from ipro.train.checkpoint import load_checkpoint
    from ipro.train.sft import SFTTrainer

    trainer = SFTTrainer(config(dataset, tmp_path, method="sft", **{"optim.ema_decay": 0.5}))
    p0 = trainable(trainer)
    logs = trainer.step()
    p1 = trainable(trainer)
    trainer.step()
    p2 = trainable(trainer)
    for k in p0:  # ema = 0.5 * (0.5 * p0 + 0.5 * p1) + 0.5 * p2
        assert torch.allclose(trainer.ema[k], 0.25 * p0[k] + 0.25 * p1[k] + 0.5 * p2[k], atol=1e-6), k
    assert any(not torch.equal(p0[k], p2[k]) for k in p0)
    saved = load_checkpoint(trainer.save())
    assert all(torch.equal(saved["ema"][k], trainer.ema[k]) for k in p0)
    assert logs["peak_rss_gb"] > 0.1
    (sample,) = trainer.write_samples()
    assert sample.name.startswith("step-000002-") and read_video(sample)[0].shape == (9, 128, 160, 3)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# base-model.yaml (method pretrain, the embedded model's CPU recipe) is checked in tests/test_base_model.py.
TRAINING_PRESETS = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith(("prepare", "base-model")))


def test_training_presets_are_found():
    # The parametrized test below would pass on an empty list; these presets must be there.
    for name in ("tiny-cpu-ipro.yaml", "tiny-cpu-grpo.yaml", "tiny-cpu-sft.yaml", "wan21-i2v-ipro.yaml", "wan22-5b-ipro.yaml",
                 "wan22-a14b-ipro.yaml", "wan-vace-grpo.yaml"):
        assert name in TRAINING_PRESETS


@pytest.mark.parametrize("preset", TRAINING_PRESETS)
def test_every_training_preset_validates(preset):
    """The GPU presets cannot run here, but their keys and values must pass validation, and
    their video size must be one the preset's model family can generate."""
    from ipro.models import FAMILIES
    from ipro.train.config import load_config

    cfg = load_config(CONFIGS / preset)
    method = preset.removesuffix(".yaml").rsplit("-", 1)[1]  # every preset's name ends with its method
    assert cfg.method == method and type(cfg).__name__ == f"{method.upper()}Config"
    family = cfg.model.family
    if family == "auto":
        by_prefix = {"wan21-i2v": "wan2.1-i2v", "wan22-5b": "wan2.2-ti2v", "wan22-a14b": "wan2.2-i2v-a14b", "wan-vace": "wan-vace"}
        path = cfg.model.path
        family = next((f for prefix, f in by_prefix.items() if preset.startswith(prefix)), None)
        if family is None and path.startswith("tiny:"):
            family = path.split(":", 1)[1]
        if family is None and path == "builtin":
            family = "pixel-i2v"
    if family is not None and family in FAMILIES:
        FAMILIES[family].check_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width)  # raises IproError if not
    if preset.startswith(("wan-vace", "phantom")):
        assert cfg.model.subject_images > 0
    if not preset.startswith("tiny"):  # GPU presets train in bf16 on a local checkpoint
        assert cfg.model.dtype == "bfloat16" and not cfg.model.path.startswith("tiny:")


def test_reward_section_reaches_the_face_reward():
    from ipro.rewards.factory import build_face_reward
    from ipro.train.config import load_config

    cfg = load_config("configs/tiny-cpu-ipro.yaml", {"reward.unmatched": "penalize", "reward.mode": "aligned"})
    reward = build_face_reward(cfg.reward, "cpu")
    assert reward.unmatched == "penalize" and reward.mode == "aligned"
    with pytest.raises(IproError, match="reward.unmatched"):
        load_config("configs/tiny-cpu-ipro.yaml", {"reward.unmatched": "drop"})
