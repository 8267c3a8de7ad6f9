"""The embedded base model (family `pixel-i2v`, weights in ipro/assets/base-model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ipro.cli.generate  # noqa: F401  (registers the command on the app)
import ipro.cli.train  # noqa: F401
from ipro.cli.main import app
from ipro.data.video import read_video, write_image
from ipro.errors import IproError
from ipro.models import detect_family, load_model
from ipro.models.pixel import BUILTIN_PATH, PixelI2V, pack, unpack
from ipro.sampling import flow_schedule, sample

from conftest import to_tensor

H, W, FRAMES = 128, 160, 9


def fit(frame, height=H, width=W) -> torch.Tensor:
    """A carphone frame (144x176, aspect ~0.82) resized to height x width: (1, 3, H, W)."""
    image = to_tensor(frame)[None]
    return torch.nn.functional.interpolate(image, size=(height, width), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


@pytest.fixture(scope="module")
def base():
    return load_model(BUILTIN_PATH)


@pytest.fixture(scope="module")
def embedder():
    from ipro.faces.embedder import FaceEmbedder

    return FaceEmbedder("dlib")


def test_pack_is_exact_and_decode_passes_gradients():
    video = torch.rand(2, 3, 9, 16, 24)
    latents = pack(video)
    assert latents.shape == PixelI2V.latent_shape(2, 9, 16, 24) == (2, 12, 3, 16, 24)
    assert torch.allclose(unpack(latents).transpose(1, 2), video, atol=1e-6)
    latents.requires_grad_(True)
    unpack(latents)[:, 1:].sum().backward()
    assert latents.grad[:, :, 1:].abs().min() > 0  # every generated pixel reaches the latents


def test_shapes_are_checked_before_loading():
    PixelI2V.check_shape(17, 128, 160)
    with pytest.raises(IproError, match="4k\\+1"):
        PixelI2V.check_shape(8, 128, 160)
    with pytest.raises(IproError, match="multiple of 8"):
        PixelI2V.check_shape(9, 100, 160)


def test_committed_weights_are_small_trained_and_detected():
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    files = [f for f in BUILTIN_PATH.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 20 * 2**20
    assert detect_family(BUILTIN_PATH) == "pixel-i2v"
    weights = load_file(BUILTIN_PATH / "transformer" / "diffusion_pytorch_model.safetensors")
    # The file holds every tensor of the transformer its config describes, finite, and not
    # the initialization a fresh model from that config gets (the weights were trained).
    config = WanTransformer3DModel.load_config(BUILTIN_PATH / "transformer")
    torch.manual_seed(0)
    fresh = WanTransformer3DModel.from_config(config).state_dict()
    assert set(weights) == set(fresh)
    assert all(weights[k].shape == fresh[k].shape and torch.isfinite(weights[k]).all() for k in fresh)
    changed = [k for k in fresh if fresh[k].dtype.is_floating_point and not torch.allclose(weights[k].float(), fresh[k].float())]
    assert len(changed) > 0.9 * len(fresh)
    assert "FaceSim" in (BUILTIN_PATH / "MODEL_CARD.md").read_text()


def test_held_out_frame_gives_detectable_recognisable_faces(base, embedder, carphone):
    # Carphone frames 80-119 are held out of training.
    image = fit(carphone[100])
    cond = base.prepare_condition(image, ["a man talks on the phone"], FRAMES, H, W)
    video = base.decode(sample(base, cond, 4, seed=0).latents)  # (1, F, 3, H, W)
    assert video.shape == (1, FRAMES, 3, H, W)
    assert torch.allclose(video[0, 0], image[0], atol=1e-5)  # frame 0 is the input
    assert (video[0, 1:] - video[0, :1]).abs().mean() > 1e-3  # later frames are generated, not copies
    faces = embedder(video)
    assert faces.has_face[0].sum() >= 7  # frame 0 and at least 6 of the 8 generated frames
    input_face = faces.embeddings[faces.frame_faces(0, 0)[0]]
    generated = faces.embeddings[faces.frame > 0]
    similarity = float((generated @ input_face).mean())
    assert 0.9 < similarity < 0.999  # the same person (dlib), but not a frozen copy


def test_velocity_is_the_first_frame_residual_and_first_frame_is_imposed(base):
    torch.manual_seed(0)
    image = torch.rand(1, 3, 32, 40)
    cond = base.prepare_condition(image, [""], 5, 32, 40)
    x = torch.randn(base.latent_shape(1, 5, 32, 40))
    t = torch.tensor([600.0])
    v = base.velocity(x, t, cond)
    x0 = base.predict_x0(x, t, cond)
    assert torch.allclose(x[:, :, 1:] - 0.6 * v[:, :, 1:], x0[:, :, 1:], atol=1e-4)
    assert torch.equal(base.impose_first_frame(x, cond)[:, :, 0], pack(image[:, :, None])[:, :, 0])
    assert base.generated_mask(cond)[0, 0, :, 0, 0].tolist() == [0.0, 1.0]


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch rms_norm under autocast
def test_bfloat16_matches_float32_and_schedule_ends_at_sigma_0_2(base):
    # torch 2.13's CPU bf16 conv3d is wrong for 12-channel 8x8 patches; the family computes
    # the patch embedding as a matmul, so bf16 autocast (training) stays close to float32.
    image = torch.rand(1, 3, 32, 40)
    cond = base.prepare_condition(image, [""], 5, 32, 40)
    x = torch.randn(base.latent_shape(1, 5, 32, 40))
    x0 = base.predict_x0(x, 700.0, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x0_bf16 = base.predict_x0(x, 700.0, cond)
    assert float((x0_bf16 - x0).norm() / x0.norm()) < 0.02
    assert float(flow_schedule(base).sigmas[-2]) == pytest.approx(0.2)  # the last call is at sigma 0.2


def test_lora_step_reaches_the_adapter_and_saved_lora_reloads(tmp_path):
    model = load_model(BUILTIN_PATH, finetune="lora", lora_rank=4)
    image = torch.rand(1, 3, 32, 40)
    cond = model.prepare_condition(image, [""], 5, 32, 40)
    x = torch.randn(model.latent_shape(1, 5, 32, 40))
    with model.base_weights():
        v_before = model.velocity(x, 500.0, cond)
    assert torch.equal(model.velocity(x, 500.0, cond), v_before)  # LoRA B starts at zero
    # A DRaFT-style step: K = 2 of 3 steps with gradient, a pixel loss on the decoded video.
    rollout = sample(model, cond, 3, grad_steps=2, seed=0)
    model.decode(rollout.latents)[:, 1:].mean().backward()
    grads = [p.grad for n, p in model.trainable_module.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    v_tuned = model.velocity(x, 500.0, cond).detach()
    with model.base_weights():
        assert torch.equal(model.velocity(x, 500.0, cond), v_before)
    file = model.save_lora(tmp_path / "lora")
    for reloaded in (load_model(BUILTIN_PATH, lora=file), load_model(BUILTIN_PATH, finetune="lora", lora_rank=4, lora=file)):
        assert torch.allclose(reloaded.velocity(x, 500.0, cond), v_tuned, atol=1e-4)
    with pytest.raises(IproError, match="Lightning"):
        load_model(BUILTIN_PATH, lightning=file)


def test_full_fine_tuning_keeps_a_frozen_base_model(base):
    model = load_model(BUILTIN_PATH, finetune="full")
    image = torch.rand(1, 3, 32, 40)
    cond = model.prepare_condition(image, [""], 5, 32, 40)
    x = torch.randn(model.latent_shape(1, 5, 32, 40))
    v_base = base.velocity(x, 300.0, cond)
    assert len(model.trainable_parameters()) == len(list(model.trainable_module.parameters()))
    with torch.no_grad():
        model.trainable_module.proj_out.bias.add_(0.1)
    assert not torch.allclose(model.velocity(x, 300.0, cond), v_base)
    assert torch.allclose(model.base_velocity(x, 300.0, cond), v_base)


def test_ipro_generate_with_the_base_model_and_a_lora(carphone, tmp_path):
    write_image(tmp_path / "carphone.png", carphone[110])
    lora = load_model(BUILTIN_PATH, finetune="lora", lora_rank=4).save_lora(tmp_path / "lora")
    args = ["generate", tmp_path / "carphone.png", "--model", BUILTIN_PATH, "--lora", lora, "--num-frames", 5,
            "--height", 64, "--width", 80, "--steps", 2, "--out", tmp_path / "out"]
    result = CliRunner().invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output + repr(result.exception)
    frames, _ = read_video(tmp_path / "out" / "carphone.mp4")
    assert frames.shape == (5, 64, 80, 3)
    assert json.loads((tmp_path / "out" / "carphone.json").read_text())["family"] == "pixel-i2v"


# --- How it is trained: `method: pretrain` (configs/base-model.yaml) ----------------------

PRESET = Path(__file__).resolve().parents[1] / "configs" / "base-model.yaml"
# A tiny model on tiny clips: the recipe's code path in seconds.
TINY = {"model.architecture": {"dim": 16, "layers": 1, "heads": 1, "ffn": 32}, "data.height": 32, "data.width": 40,
        "data.num_frames": 5, "data.batch_size": 2, "optim.lr": 2e-3, "optim.warmup_steps": 2, "run.log_with": [],
        "run.log_every": 1, "pretrain.held_out_every": 2, "pretrain.evaluate_faces": False, "run.device": "cpu"}


def tiny_config(out, **overrides):
    from ipro.train.config import load_config

    return load_config(PRESET, {**TINY, "run.output_dir": str(out), **overrides})


def killed_after_two_steps_then_resumed(out: Path, clips, **settings):
    """A pretrain run killed after step 2 (what run.checkpoint_every = 2 leaves behind), then
    resumed to its end with --resume."""
    from ipro.train.pretrain import PretrainTrainer

    killed = PretrainTrainer(tiny_config(out, **settings), dataset=clips)
    killed.step()
    killed.step()
    killed.save()
    resumed = PretrainTrainer(tiny_config(out, **settings), dataset=clips)
    resumed.train(resume=True)
    return resumed


@pytest.fixture(scope="module")
def tiny_clips():
    from ipro.data.base_clips import BaseClips

    return BaseClips(32, 40, 5)


def test_the_preset_is_the_recipe_on_the_committed_architecture_and_bad_keys_are_refused(tmp_path):
    from diffusers import WanTransformer3DModel

    from ipro.models.pixel import default_transformer_config
    from ipro.train.config import load_config

    cfg = load_config(PRESET)
    assert type(cfg).__name__ == "PretrainConfig" and cfg.model.path == "new:pixel-i2v" and cfg.run.seed == 0
    committed = WanTransformer3DModel.load_config(BUILTIN_PATH / "transformer")
    built = default_transformer_config(**cfg.model.architecture.model_dump())
    assert all(committed[k] == (list(v) if isinstance(v, tuple) else v) for k, v in built.items())
    assert json.loads((BUILTIN_PATH / "scheduler" / "scheduler_config.json").read_text())["shift"] == cfg.model.shift
    o, d = cfg.optim, cfg.data
    assert (o.optimizer, o.lr, o.weight_decay, o.betas, o.steps, o.warmup_steps, o.lr_cosine_to, o.ema_decay, o.mixed_precision) == \
        ("adamw", 5e-4, 0.01, (0.9, 0.99), 500, 100, 0.1, 0.998, "no")
    a = cfg.model.architecture
    assert (a.overlap, cfg.pretrain.edge_weight) == (True, 4.0)
    assert (d.height, d.width, d.num_frames, d.batch_size) == (128, 160, 9, 4)
    refused = {
        "'data.dataset' is not a setting of method 'pretrain'": {"data.dataset": "runs/data"},
        "'model.lora_rank' is not a setting of method 'pretrain'": {"model.lora_rank": 8},
        "'sampler' is not a section of method 'pretrain'": {"sampler": {"num_steps": 4}},
        "model.architecture: only for a new model": {"model.path": "builtin"},
        "only 'new:pixel-i2v'": {"model.path": "new:wan2.1-i2v"},
        "heads (5) must divide": {"model.architecture.heads": 5},
        "pretrain.held_out_every (250) must be a multiple of run.log_every (3)": {"run.log_every": 3},
        "data.num_frames must be 4k+1": {"data.num_frames": 11},
    }
    for message, overrides in refused.items():
        with pytest.raises(IproError, match=re.escape(message)):
            load_config(PRESET, overrides)
    with pytest.raises(IproError, match=re.escape("'pretrain' is not a section of method 'ipro' (only of 'pretrain')")):
        load_config("configs/tiny-cpu-ipro.yaml", {"pretrain.held_out_every": 10})
    with pytest.raises(IproError, match=re.escape("'model.architecture' is not a setting of method 'sft'")):
        load_config("configs/tiny-cpu-sft.yaml", {"model.architecture.dim": 64})


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch rms_norm under autocast
def test_pretrain_resumes_exactly_and_saves_its_ema_as_a_loadable_model(tiny_clips, tmp_path):
    from safetensors.torch import load_file

    from ipro.train.pretrain import PretrainTrainer

    settings = {"optim.steps": 4, "run.checkpoint_every": 2, "optim.ema_decay": 0.9}
    straight = PretrainTrainer(tiny_config(tmp_path / "straight", **settings), dataset=tiny_clips)
    start = {k: p.detach().clone() for k, p in straight.named_params.items()}
    straight.train()
    resumed = killed_after_two_steps_then_resumed(tmp_path / "killed", tiny_clips, **settings)
    assert resumed.global_step == 4
    assert any(not torch.equal(start[k], p) for k, p in straight.named_params.items())  # it trained
    for k, p in straight.named_params.items():
        assert torch.equal(p, resumed.named_params[k]) and torch.equal(straight.ema[k], resumed.ema[k]), k
    logged = [json.loads(line) for line in (tmp_path / "straight" / "logs.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "held_out_loss" in row] == [2, 4]
    # The saved folder holds the EMA weights and loads as the family's model, which generates.
    saved = load_file(tmp_path / "straight" / "model" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == straight.ema.keys() and all(torch.equal(saved[k], straight.ema[k]) for k in saved)
    saved_after_resume = load_file(tmp_path / "killed" / "model" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in saved_after_resume.items())
    model = load_model(tmp_path / "straight" / "model")
    assert detect_family(tmp_path / "straight" / "model") == "pixel-i2v"
    image = tiny_clips.clip(torch.Generator().manual_seed(5))[:1]
    video = model.decode(sample(model, model.prepare_condition(image, [""], 5, 32, 40), 2, seed=0).latents)
    assert video.shape == (1, 5, 3, 32, 40) and torch.isfinite(video).all()
    assert torch.allclose(video[0, 0], image[0], atol=1e-5)


@pytest.mark.slow  # 60 steps at 32x40: about 15 s on one thread
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_ipro_train_pretrain_lowers_the_loss_on_real_clips(tiny_clips, tmp_path):
    from ipro.train.pretrain import x0_loss

    sets = {**TINY, "model.architecture": {"dim": 32, "layers": 1, "heads": 1, "ffn": 64}, "data.batch_size": 4,
            "optim.steps": 60, "optim.warmup_steps": 5, "optim.ema_decay": None, "run.checkpoint_every": 30,
            "run.log_every": 10, "pretrain.held_out_every": 30, "run.log_with": ["tensorboard"], "run.output_dir": str(tmp_path),
            "pretrain.edge_weight": 0.0}  # the x0 loss alone: the preset's seam term trades some of it for smoother seams
    args = ["train", "-c", str(PRESET), *sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"model: {tmp_path / 'model'}" in result.output
    assert list(tmp_path.rglob("events.out.tfevents*"))  # TensorBoard, like every method
    logged = [json.loads(line) for line in (tmp_path / "logs.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "held_out_loss" in row] == [30, 60]
    trained = load_model(tmp_path / "model")
    start = load_model(tmp_path / "model")  # a new model's prediction: the first frame, unchanged
    with torch.no_grad():
        start.transformer.proj_out.weight.zero_()
        start.transformer.proj_out.bias.zero_()
    g = torch.Generator().manual_seed(99)  # fresh clips from the training footage
    clips = torch.stack([tiny_clips.clip(g) for _ in range(16)])
    noise = torch.randn(trained.latent_shape(16, 5, 32, 40), generator=torch.Generator().manual_seed(1234))
    # At high noise the best prediction is a blurred mean, which takes far longer to learn; at
    # sigma <= 0.5 a few steps already use what x_t shows of the clip.
    for sigma in (0.1, 0.25, 0.5):
        s = torch.full((16,), sigma)
        with torch.no_grad():
            assert float(x0_loss(trained, clips, s, noise)) < 0.99 * float(x0_loss(start, clips, s, noise)), sigma


@pytest.mark.slow  # about 20 s: 5 videos and MTCNN + dlib on 45 frames
def test_face_evaluation_of_the_committed_model(base):
    from ipro.train.pretrain import evaluate_faces

    report = evaluate_faces(base, seeds=(0,), steps=(4,))
    real, generated = report["real_clips"], report["4_steps"]
    assert real["detection_rate"] == 1.0 and real["facesim"] > 0.97
    assert generated["detection_rate"] >= 0.8 and 0.9 < generated["facesim"] < real["facesim"]
    assert set(generated["facesim_per_input"]) == {"carphone_80", "carphone_88", "carphone_96", "carphone_103", "astronaut"}
