"""The embedded base model (family `pixel-i2v`, weights in ipro/assets/base-model)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import ipro.cli.generate  # noqa: F401  (registers the command on the app)
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
