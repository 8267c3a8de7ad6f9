"""Model adapters on tiny random Wan checkpoints: loading, LoRA, base-model weights, decoding, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image

from ipro.errors import IproError
from ipro.models import FAMILIES, TINY_FAMILIES, detect_family, load_model
from ipro.sampling import sample

from conftest import randomize_lora

H = W = 64
FRAMES = 9
PROMPT = "a man talks on the phone"


def pipeline_latents(folder, image, steps=4, seed=3, lora=None, two_experts=False):
    pipe = WanImageToVideoPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora), load_into_transformer_2=two_experts)
    out = pipe(
        image=Image.fromarray(image), prompt=PROMPT, height=H, width=W, num_frames=FRAMES, num_inference_steps=steps,
        guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(seed),
    )
    return out.frames


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_load_detects_family_and_shapes(tiny, face, family):
    assert detect_family(tiny[family]) == family
    model = load_model(tiny[family])
    assert isinstance(model, FAMILIES[family]) and model.family == family
    cond = model.prepare_condition(face[1], [PROMPT], FRAMES, H, W)
    x = torch.randn(model.latent_shape(1, FRAMES, H, W))
    v = model.velocity(x, torch.tensor(500.0), cond)
    assert v.shape == x.shape and v.dtype == torch.float32 and v.abs().mean() > 0
    assert model.trainable_parameters() == []


def test_text_embeddings_match_pipeline_and_are_cached(tiny):
    model = load_model(tiny["wan2.1-i2v"])
    ours = model.encode_prompts([PROMPT, "", PROMPT])
    theirs, _ = model.pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=512)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[2], theirs[0])
    assert set(model._text_cache) == {PROMPT, ""}
    assert len(model._text_cache[PROMPT]) < 512  # only the real tokens are kept


@pytest.mark.parametrize("family", ["wan2.1-i2v", "wan2.2-i2v-a14b"])
def test_gradients_reach_only_lora(tiny, face, family):
    model = load_model(tiny[family], finetune="lora", lora_rank=4)
    randomize_lora(model)
    cond = model.prepare_condition(face[1], [PROMPT], FRAMES, H, W)
    rollout = sample(model, cond, 4, grad_steps=2, seed=0, guidance_scale=1.0)
    video = model.decode(rollout.latents, frames=[0, FRAMES - 1])
    video.mean().backward()

    with_grad = {
        (name, id(module)): p.grad
        for module in model.pipe.components.values() if isinstance(module, torch.nn.Module)
        for name, p in module.named_parameters() if p.grad is not None
    }
    assert with_grad, "no parameter received a gradient"
    assert all("lora_" in name for name, _ in with_grad)
    # Every LoRA parameter of the trained expert gets a gradient, and it is not all zeros.
    lora = [p for n, p in model.trainable_module.named_parameters() if "lora_" in n]
    assert len(lora) == len(model.trainable_parameters()) and all(p.grad is not None for p in lora)
    assert all(p.grad.abs().sum() > 0 for p in lora if p.grad is not None)
    if family == "wan2.2-i2v-a14b":  # only the low-noise expert trains
        assert model.trainable_module is model.transformer_2
        assert not any("lora_" in n for n, _ in model.transformer.named_parameters())


def test_lora_a_has_no_gradient_at_init(tiny, face):
    # peft's B = 0 makes the adapter a no-op at step 0; dL/dA = B^T (...) = 0 then (expected).
    model = load_model(tiny["wan2.1-i2v"], finetune="lora", lora_rank=4)
    cond = model.prepare_condition(face[1], [PROMPT], FRAMES, H, W)
    rollout = sample(model, cond, 2, grad_steps=1, seed=0, guidance_scale=1.0)
    rollout.latents.square().mean().backward()
    grads = {n: p.grad for n, p in model.trainable_module.named_parameters() if "lora_" in n}
    assert all(g.abs().sum() == 0 for n, g in grads.items() if "lora_A" in n)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


@pytest.mark.parametrize("family", ["wan2.1-i2v", "wan2.2-ti2v", "wan2.2-i2v-a14b"])
def test_base_velocity_equals_frozen_copy(tiny, face, family):
    base = load_model(tiny[family])
    lora = load_model(tiny[family], finetune="lora", lora_rank=4)
    full = load_model(tiny[family], finetune="full")
    randomize_lora(lora)
    with torch.no_grad():
        for p in full.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    cond = base.prepare_condition(face[1], [PROMPT], FRAMES, H, W)
    x = torch.randn(base.latent_shape(1, FRAMES, H, W))
    for t in (torch.tensor(950.0), torch.tensor(300.0)):  # both experts for A14B
        expected = base.velocity(x, t, cond)
        assert torch.equal(lora.base_velocity(x, t, cond), expected)
        # The frozen copy holds the base weights bit for bit (checked below); its output can differ
        # in the last float32 bit (measured 7e-7 on values up to 2.4), as a copy's memory layout
        # may take another kernel path.
        assert torch.allclose(full.base_velocity(x, t, cond), expected, rtol=0, atol=1e-5)
        trained_expert_runs = family != "wan2.2-i2v-a14b" or t < 900  # A14B's high-noise expert stays frozen
        assert torch.equal(lora.velocity(x, t, cond), expected) != trained_expert_runs
    assert sum(p.numel() for p in full.trainable_parameters()) == sum(p.numel() for p in full.trainable_module.parameters())
    frozen = dict(full._frozen.named_parameters())
    base_weights = dict(base.trainable_module.named_parameters())
    assert frozen.keys() == base_weights.keys() and all(torch.equal(frozen[k], base_weights[k]) for k in frozen)


# diffusers pads a Wan 2.1 LoRA with zero image-attention layers when loading it, and peft says so.
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_saved_lora_loads_in_diffusers(tiny, face, tmp_path, family):
    # alpha != rank: the scale must survive the file (diffusers reads it from the metadata).
    model = load_model(tiny[family], finetune="lora", lora_rank=4, lora_alpha=8)
    randomize_lora(model)
    cond = model.prepare_condition(face[1], [PROMPT], FRAMES, H, W)
    with torch.no_grad():
        ours = sample(model, cond, 4, seed=3, guidance_scale=1.0).latents
    file = model.save_lora(tmp_path / "lora")
    assert file.name == "pytorch_lora_weights.safetensors" and file.is_file()

    theirs = pipeline_latents(tiny[family], face[0], lora=tmp_path / "lora", two_experts=family.endswith("a14b"))
    base = pipeline_latents(tiny[family], face[0])
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert (ours - base).abs().max() > 1e-2  # and the LoRA does something

    # Our loaders: as a frozen adapter for inference, and into the trained adapter to resume.
    for reloaded in (load_model(tiny[family], lora=file), load_model(tiny[family], finetune="lora", lora_rank=4, lora_alpha=8, lora=tmp_path / "lora")):
        with torch.no_grad():
            again = sample(reloaded, cond, 4, seed=3, guidance_scale=1.0).latents
        assert torch.allclose(again, ours, atol=1e-6)


def test_lightning_lora_is_merged_with_its_schedule(tiny, face, tmp_path):
    trained = load_model(tiny["wan2.1-i2v"], finetune="lora", lora_rank=4)
    randomize_lora(trained)
    file = trained.save_lora(tmp_path / "distilled")
    merged = load_model(tiny["wan2.1-i2v"], lightning=file, lightning_steps=4, lightning_shift=5.0)
    assert merged.default_steps == 4 and merged.default_guidance == 1.0
    assert merged.default_sigmas == [1.0, 0.75, 0.5, 0.25] and merged.scheduler.config.shift == 5.0
    assert not any("lora_" in n for n, _ in merged.transformer.named_parameters())  # fused, not an adapter
    cond = merged.prepare_condition(face[1], [PROMPT], FRAMES, H, W)
    x = torch.randn(merged.latent_shape(1, FRAMES, H, W))
    t = torch.tensor(700.0)
    assert torch.allclose(merged.velocity(x, t, cond), trained.velocity(x, t, cond).detach(), atol=1e-5)


def test_decode_selected_frames_is_a_prefix_decode_with_gradient(tiny):
    model = load_model(tiny["wan2.2-ti2v"])
    latents = torch.randn(model.latent_shape(1, FRAMES, H, W), requires_grad=True)
    full = model.decode(latents)
    assert full.shape == (1, FRAMES, 3, H, W) and 0 <= full.min() and full.max() <= 1
    some = model.decode(latents, frames=[0, 3])
    assert torch.equal(some, full[:, [0, 3]])  # the VAE is causal: later latents do not matter
    some.sum().backward()
    assert latents.grad[:, :, 2].abs().sum() == 0 and latents.grad[:, :, :2].abs().sum() > 0


def test_a14b_routes_by_boundary(tiny, face):
    model = load_model(tiny["wan2.2-i2v-a14b"])
    cond = model.prepare_condition(face[1].repeat(2, 1, 1, 1), [PROMPT], FRAMES, H, W)
    x = torch.randn(model.latent_shape(2, FRAMES, H, W))
    t = torch.tensor([950.0, 300.0])  # one sample on each side of boundary 0.9 * 1000
    mixed = model.velocity(x, t, cond)
    high = model.velocity(x[:1], t[:1], cond.select(0))
    low = model.velocity(x[1:], t[1:], cond.select(1))
    assert torch.allclose(mixed, torch.cat([high, low]), atol=1e-6)
    assert not torch.allclose(low, model._forward(model.transformer, x[1:], t[1:], cond.select(1), cond.prompt_embeds[1:]))


def test_gradient_checkpointing_changes_nothing(tiny, face):
    plain = load_model(tiny["wan2.1-i2v"], finetune="lora", lora_rank=4)
    ckpt = load_model(tiny["wan2.1-i2v"], finetune="lora", lora_rank=4, gradient_checkpointing=True)
    assert ckpt.transformer.gradient_checkpointing
    randomize_lora(plain)
    with torch.no_grad():
        for p, q in zip(plain.trainable_parameters(), ckpt.trainable_parameters()):
            q.copy_(p)
    grads = []
    for model in (plain, ckpt):
        cond = model.prepare_condition(face[1], [PROMPT], FRAMES, H, W)
        sample(model, cond, 3, grad_steps=2, seed=0, guidance_scale=1.0).latents.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.trainable_parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_condition_repeat_and_select(tiny, face):
    model = load_model(tiny["wan2.2-ti2v"])
    cond = model.prepare_condition(face[1], [PROMPT], FRAMES, H, W)
    group = cond.repeat_interleave(3)
    assert group.batch_size == 3 and group.image_latents.shape[0] == 3
    assert group.first_frame_mask.shape[0] == 1  # shared by the batch
    assert torch.equal(group.select(2).prompt_embeds, cond.prompt_embeds)


# --- Errors the user can cause ---------------------------------------------------------------


def test_missing_or_broken_model_folders(tiny, tmp_path):
    with pytest.raises(IproError, match="model folder does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IproError, match="model_index.json: missing"):
        load_model(tmp_path / "empty")
    broken = shutil.copytree(tiny["wan2.1-i2v"], tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    with pytest.raises(IproError, match="vae: missing; model_index.json lists component 'vae'"):
        load_model(broken)
    weights = shutil.copytree(tiny["wan2.1-i2v"], tmp_path / "weights")
    for f in (weights / "transformer").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(IproError, match="could not load the model"):
        load_model(weights)
    t2v = shutil.copytree(tiny["wan2.1-i2v"], tmp_path / "t2v")
    config = json.loads((t2v / "transformer" / "config.json").read_text())
    (t2v / "transformer" / "config.json").write_text(json.dumps({**config, "in_channels": 16}))
    with pytest.raises(IproError, match="not a supported model family"):
        load_model(t2v)
    with pytest.raises(IproError, match="unknown"):
        load_model(tiny["wan2.1-i2v"], family="sora")
    with pytest.raises(IproError, match="latent_channels=16, the family expects 48"):
        load_model(tiny["wan2.1-i2v"], family="wan2.2-ti2v")


def test_bad_shapes_and_options(tiny, face, tmp_path):
    model = load_model(tiny["wan2.2-ti2v"])
    with pytest.raises(IproError, match=r"num_frames=10: wan2.2-ti2v needs 4k\+1 frames .* use 9 or 13"):
        model.prepare_condition(face[1], [PROMPT], 10, H, W)
    with pytest.raises(IproError, match="height=48: wan2.2-ti2v needs a multiple of 32"):
        model.prepare_condition(face[1], [PROMPT], FRAMES, 48, W)
    FAMILIES["wan2.1-i2v"].check_shape(FRAMES, 48, 48)  # 2.1 only needs 16
    with pytest.raises(IproError, match="LoRA not found"):
        load_model(tiny["wan2.1-i2v"], lora=tmp_path / "missing.safetensors")
    with pytest.raises(IproError, match="finetune='half'"):
        load_model(tiny["wan2.1-i2v"], finetune="half")
    other = load_model(tiny["wan2.1-i2v"], finetune="lora", lora_rank=8)
    file = other.save_lora(tmp_path / "rank8")
    with pytest.raises(IproError, match="does not fit the LoRA being trained"):
        load_model(tiny["wan2.1-i2v"], finetune="lora", lora_rank=4, lora=file)


def test_bfloat16_trains_fp32_adapters_and_decodes_in_fp32(tiny, face):
    model = load_model(tiny["wan2.2-ti2v"], dtype=torch.bfloat16, finetune="lora", lora_rank=4, decode_tile=32)
    assert model.transformer.dtype == torch.bfloat16 and model.vae.dtype == torch.float32 and model.decode_tile == 32
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    randomize_lora(model)
    cond = model.prepare_condition(face[1], [PROMPT], FRAMES, H, W)
    assert cond.prompt_embeds.dtype == torch.bfloat16
    rollout = sample(model, cond, 3, grad_steps=1, seed=0, guidance_scale=1.0)
    assert rollout.latents.dtype == torch.float32
    model.decode(rollout.latents, frames=[0]).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.trainable_parameters())


def test_full_finetuning_from_a_lora_merges_it_into_the_trained_and_base_weights(tiny, face, tmp_path):
    trained = load_model(tiny["wan2.1-i2v"], finetune="lora", lora_rank=4)
    randomize_lora(trained)
    file = trained.save_lora(tmp_path / "lora")
    full = load_model(tiny["wan2.1-i2v"], finetune="full", lora=file)
    cond = full.prepare_condition(face[1], [PROMPT], FRAMES, H, W)
    x = torch.randn(full.latent_shape(1, FRAMES, H, W))
    t = torch.tensor(600.0)
    expected = trained.velocity(x, t, cond).detach()
    assert torch.allclose(full.velocity(x, t, cond), expected, atol=1e-5)
    assert torch.allclose(full.base_velocity(x, t, cond), expected, atol=1e-5)
    with pytest.raises(ValueError, match="frames must be in"):
        full.decode(x, frames=[FRAMES])
