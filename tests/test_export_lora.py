"""`ipro export-lora`: ComfyUI / diffusers files that other people's loaders read back exactly,
and the ComfyUI / lightx2v layout read wherever ipro accepts a LoRA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ipro.cli.export_lora import export_lora
from ipro.errors import IproError
from ipro.models import TINY_FAMILIES, load_model

IPRO = str(Path(sys.executable).with_name("ipro"))  # the installed console script
H = W = 64
FRAMES = 9
PROMPT = "a man talks on the phone"
pytestmark = pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")  # diffusers pads Wan 2.1 image attention


def trained(tiny, family, rank=4, alpha=8.0, seed=1):
    """A LoRA model whose B is not zero (peft starts at a no-op), alpha != rank on purpose."""
    model = load_model(tiny[family], finetune="lora", lora_rank=rank, lora_alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.trainable_module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def velocities(model, face, t):
    torch.manual_seed(5)
    cond = model.prepare_condition(face[1], [PROMPT], FRAMES, H, W)
    x = torch.randn(model.latent_shape(1, FRAMES, H, W))
    with torch.no_grad():
        return model.velocity(x, torch.tensor(t), cond)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_comfyui_export_loads_through_diffusers_converter(tiny, face, tmp_path, family):
    model = trained(tiny, family)
    lora = model.save_lora(tmp_path / "lora")
    (files,) = [export_lora(lora, "comfyui", tmp_path / "out.safetensors", family=family)]
    a14b = family == "wan2.2-i2v-a14b"
    assert [f.name for f in files] == (["out_low_noise.safetensors"] if a14b else ["out.safetensors"])
    state = load_file(str(files[0]))
    assert state and all(k.startswith("diffusion_model.blocks.") for k in state)
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in state
    assert "diffusion_model.blocks.1.ffn.2.lora_up.weight" in state
    assert float(state["diffusion_model.blocks.0.cross_attn.o.alpha"]) == 8.0

    # diffusers' own converter (someone else's code) reads the layout; outputs must match ours.
    theirs = load_model(tiny[family])
    theirs.pipe.load_lora_weights(str(files[0]), load_into_transformer_2=a14b)
    t = 300.0  # below A14B's boundary: the low-noise expert, the one we trained
    ours_v, theirs_v, base_v = velocities(model, face, t), velocities(theirs, face, t), velocities(load_model(tiny[family]), face, t)
    assert torch.allclose(theirs_v, ours_v, rtol=1e-5, atol=1e-5), (theirs_v - ours_v).abs().max()
    assert (ours_v - base_v).abs().max() > 1e-2  # the LoRA does change the output


@pytest.mark.parametrize("family", ["wan2.1-i2v", "wan2.2-ti2v"])
def test_comfyui_file_is_read_by_every_lora_path(tiny, face, tmp_path, family):
    model = trained(tiny, family)
    (comfy,) = export_lora(model.save_lora(tmp_path / "lora"), "comfyui", tmp_path / "c.safetensors", family=family)
    expected = velocities(model, face, 300.0)
    frozen = load_model(tiny[family], lora=comfy)  # --lora
    resumed = load_model(tiny[family], finetune="lora", lora_rank=4, lora_alpha=4.0, lora=comfy)  # init_lora, another alpha
    merged = load_model(tiny[family], lightning=comfy)  # lightning_lora
    for other in (frozen, resumed, merged):
        assert torch.allclose(velocities(other, face, 300.0), expected, rtol=1e-5, atol=1e-5)


def test_diffusers_export_and_merged_lightning(tiny, face, tmp_path):
    family = "wan2.1-i2v"
    light_model = trained(tiny, family, rank=2, alpha=2.0, seed=7)
    (light,) = export_lora(light_model.save_lora(tmp_path / "light"), "comfyui", tmp_path / "light.safetensors", family=family)
    # The run trains on top of the merged Lightning LoRA; the export carries both.
    base_light = load_model(tiny[family], lightning=light, finetune="lora", lora_rank=4, lora_alpha=8.0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in base_light.trainable_module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    expected = velocities(base_light, face, 300.0)
    lora = base_light.save_lora(tmp_path / "lora")
    for fmt in ("comfyui", "diffusers"):
        (file,) = export_lora(lora, fmt, tmp_path / f"merged-{fmt}.safetensors", lightning=[light], family=family)
        plain = load_model(tiny[family])
        plain.pipe.load_lora_weights(str(file))
        assert torch.allclose(velocities(plain, face, 300.0), expected, rtol=1e-5, atol=1e-5), fmt


def test_a14b_merge_lightning_writes_one_file_per_expert(tiny, face, tmp_path):
    family = "wan2.2-i2v-a14b"
    model = trained(tiny, family)
    run = tmp_path / "run"
    # Lightning LoRAs of the tiny 2.1 model fit the tiny A14B's experts (same block shapes); one per expert.
    light = [trained(tiny, "wan2.1-i2v", rank=r, seed=3).save_lora(tmp_path / f"light{r}") for r in (2, 3)]
    ckpt = run / "checkpoint-000002"
    model.save_lora(ckpt / "lora")
    (ckpt / "state.json").write_text("{}")
    config = {"model": {"path": str(tiny[family]), "lightning_lora": [str(p) for p in light]}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    files = export_lora(run, "comfyui", merge_lightning=True)
    assert [f.name for f in files] == ["lora-comfyui_high_noise.safetensors", "lora-comfyui_low_noise.safetensors"]
    high, low = (load_file(str(f)) for f in files)
    assert high["diffusion_model.blocks.0.self_attn.q.lora_down.weight"].shape[0] == 2  # Lightning only
    assert low["diffusion_model.blocks.0.self_attn.q.lora_down.weight"].shape[0] == 7  # ours (4) + its Lightning (3)
    with pytest.raises(IproError, match="one per expert"):
        export_lora(run, "comfyui", lightning=[light[0]])


def test_export_errors_are_one_line(tiny, tmp_path):
    with pytest.raises(IproError, match="not found"):
        export_lora(tmp_path / "nope", "comfyui")
    model = trained(tiny, "wan2.1-i2v")
    lora = model.save_lora(tmp_path / "lora")
    with pytest.raises(IproError, match="--format"):
        export_lora(lora, "kohya")
    with pytest.raises(IproError, match="pixel-i2v"):
        export_lora(lora, "comfyui", family="pixel-i2v")
    with pytest.raises(IproError, match="no model.lightning_lora"):
        export_lora(lora, "comfyui", merge_lightning=True)


@pytest.mark.slow  # two CLI processes
def test_export_lora_cli(tiny, tmp_path):
    lora = trained(tiny, "wan2.2-ti2v").save_lora(tmp_path / "lora")
    out = tmp_path / "cli.safetensors"
    run = subprocess.run([IPRO, "export-lora", str(lora), "--format", "comfyui", "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout and any(k.startswith("diffusion_model.") for k in load_file(str(out)))
    bad = subprocess.run([IPRO, "export-lora", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_embedded_pixel_model_exports_in_diffusers_format(face, tmp_path):
    from ipro.models import resolve_model_path

    path = resolve_model_path("builtin", tmp_path)
    model = load_model(path, finetune="lora", lora_rank=4, lora_alpha=8.0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for name, p in model.trainable_module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    (file,) = export_lora(model.save_lora(tmp_path / "lora"), "diffusers", tmp_path / "pixel.safetensors", family="pixel-i2v")
    torch.manual_seed(5)
    cond = model.prepare_condition(face[1], [PROMPT], 9, 64, 64)
    x = torch.randn(model.latent_shape(1, 9, 64, 64))
    with torch.no_grad():
        expected = model.velocity(x, torch.tensor(300.0), cond)
        again = load_model(path, lora=file).velocity(x, torch.tensor(300.0), cond)
        base = load_model(path).velocity(x, torch.tensor(300.0), cond)
    assert torch.allclose(again, expected, rtol=1e-5, atol=1e-5)
    assert (base - expected).abs().max() > 1e-3  # the LoRA does change the output


def test_comfyui_keys_outside_the_blocks_keep_their_alpha():
    from ipro.models.lora_formats import comfyui_modules

    down, up = torch.randn(2, 8), torch.randn(8, 2)
    state = {"diffusion_model.head.head.lora_down.weight": down, "diffusion_model.head.head.lora_up.weight": up,
             "diffusion_model.head.head.alpha": torch.tensor(1.0), "diffusion_model.blocks.0.norm3.diff_b": torch.ones(8)}
    modules, rest = comfyui_modules(state, "x.safetensors")
    assert modules == {} and set(rest) == set(state) and float(rest["diffusion_model.head.head.alpha"]) == 1.0
