"""Phantom-Wan (subject-to-video) on a tiny random checkpoint: Phantom's sampling loop and
CFG, subject frames in and out, the checkpoint conversion, training with GRPO and IPRO,
and `ipro generate --subject A B` (alias --reference) / `ipro eval` on its output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ipro.errors import IproError
from ipro.models import FAMILIES, build_tiny, detect_family, load_model
from ipro.rewards.base import Normalization, Reward, finish
from ipro.sampling import sample, sde_sample

from conftest import crop

H = W = 64
FRAMES = 9  # 3 latent frames
PROMPT = "a man talks on the phone"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return build_tiny("phantom", tmp_path_factory.mktemp("tiny_phantom") / "phantom", seed=0)


@pytest.fixture(scope="module")
def subjects(astronaut):
    """Two subject images of different sizes and aspects (48 x 40 and 32 x 56), uint8."""
    return [crop(astronaut, slice(40, 240), slice(140, 380), (48, 40)), crop(astronaut, slice(200, 400), slice(100, 300), (32, 56))]


def as_float(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255


def prepared(folder, subjects, **options):
    model = load_model(folder, num_subject_images=len(subjects), **options)
    cond = model.prepare_condition(
        torch.zeros(1, 3, H, W), [PROMPT], FRAMES, H, W, negative_prompt="blurry", subject_images=[[as_float(r) for r in subjects]]
    )
    return model, cond


def phantom_loop(model, cond, noise, steps, text_scale, image_scale):
    """Phantom's own sampling loop (phantom_wan/subject2video.py), written against diffusers'
    transformer and an Euler flow-matching scheduler: the subject latents replace the last
    R latent frames before every call; CFG = neg + s_img (pos_i - neg) + s_text (pos_it - pos_i)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(steps)
    ref = cond.image_latents
    r = ref.shape[2]
    text, null = cond.prompt_embeds, cond.negative_prompt_embeds

    def net(x, context, t):
        return model.transformer(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=context, return_dict=False)[0]

    latents = noise.clone()
    for t in scheduler.timesteps:
        with_refs = torch.cat([latents[:, :, :-r], ref], dim=2)
        pos_it = net(with_refs, text, t)
        if text_scale > 1:
            pos_i = net(with_refs, null, t)
            neg = net(torch.cat([latents[:, :, :-r], torch.zeros_like(ref)], dim=2), null, t)
            pred = neg + image_scale * (pos_i - neg) + text_scale * (pos_it - pos_i)
        else:
            pred = pos_it
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return latents[:, :, :-r]


@pytest.mark.parametrize(("num_subjects", "text_scale", "image_scale"), [(1, 1.0, 5.0), (2, 1.0, 5.0), (2, 7.5, 5.0), (1, 4.0, 2.0)])
def test_ode_matches_phantom_sampling_loop(phantom, subjects, num_subjects, text_scale, image_scale):
    model, cond = prepared(phantom, subjects[:num_subjects], image_guidance_scale=image_scale)
    assert detect_family(phantom) == "phantom" and isinstance(model, FAMILIES["phantom"])
    noise = torch.randn(model.latent_shape(1, FRAMES, H, W), generator=torch.Generator().manual_seed(7))
    assert noise.shape == (1, 16, 3 + num_subjects, H // 8, W // 8)  # the video's latent frames, then the subjects
    with torch.no_grad():
        ours = sample(model, cond, 5, guidance_scale=text_scale, noise=noise).latents
        theirs = phantom_loop(model, cond, noise, 5, text_scale, image_scale)
    assert torch.equal(ours[:, :, 3:], cond.image_latents)  # the subjects are imposed, not generated
    assert torch.allclose(ours[:, :, :3], theirs, atol=1e-5, rtol=0), (ours[:, :, :3] - theirs).abs().max()
    assert (ours[:, :, :3] - noise[:, :, :3]).abs().mean() > 0.1  # and the video did move


def test_subject_images_condition_the_video_and_are_dropped(phantom, subjects):
    model, cond = prepared(phantom, subjects)
    # Each subject image: scaled to fit the video, centred on white, one latent frame in the given order.
    canvas = model._subject_canvas(as_float(subjects[1]), H, W)
    assert (canvas[:, :, :10] == 1).all() and (canvas[:, :, -10:] == 1).all()  # 32 x 56 (taller): white bars left, right
    alone = model.encode_video(canvas[None, :, None])
    assert torch.allclose(cond.image_latents[:, :, 1:2], alone, atol=1e-6)
    mask = model.generated_mask(cond)
    assert mask.shape == (1, 1, 5, H // 8, W // 8) and (mask[:, :, :3] == 1).all() and (mask[:, :, 3:] == 0).all()

    noise = torch.randn(model.latent_shape(1, FRAMES, H, W), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        latents = sample(model, cond, 4, guidance_scale=1.0, noise=noise).latents
        video = model.decode(latents)
        # The VAE decode of the video's latent frames alone (subjects dropped), by hand.
        mean = torch.tensor(model.vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(model.vae.config.latents_std).view(1, -1, 1, 1, 1)
        by_hand = model.vae.decode(latents[:, :, :3] * std + mean, return_dict=False)[0]
        # Other subject images, same noise: another video.
        swapped = model.prepare_condition(torch.zeros(1, 3, H, W), [PROMPT], FRAMES, H, W, subject_images=[[as_float(r) for r in subjects[::-1]]])
        other = sample(model, swapped, 4, guidance_scale=1.0, noise=noise).latents
    assert video.shape == (1, FRAMES, 3, H, W)
    assert torch.allclose(video, (by_hand / 2 + 0.5).clamp(0, 1).transpose(1, 2), atol=1e-6)
    # The random tiny model reacts weakly (measured max |diff| 7e-4), but far above float noise (~1e-7).
    assert (other[:, :, :3] - latents[:, :, :3]).abs().max() > 1e-4

    rollout = sde_sample(model, cond, 3, eta=0.7, seed=5, guidance_scale=1.0)
    assert rollout.log_probs.shape == (1, 3) and torch.isfinite(rollout.log_probs).all()

    with pytest.raises(IproError, match="num_subject_images=2"):
        model.prepare_condition(torch.zeros(1, 3, H, W), [PROMPT], FRAMES, H, W, subject_images=[[as_float(subjects[0])]])
    with pytest.raises(IproError, match="Phantom takes 1 to 4 subject images"):
        load_model(phantom, num_subject_images=5)


def test_saved_lora_loads_in_diffusers_wan_pipeline(phantom, subjects, tmp_path):
    from diffusers import WanPipeline

    model, cond = prepared(phantom, subjects[:1], finetune="lora", lora_rank=4, lora_alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.trainable_module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        x = torch.randn(model.latent_shape(1, FRAMES, H, W), generator=g)
        ours = model.velocity(x, torch.tensor(600.0), cond)
    file = model.save_lora(tmp_path / "lora")
    pipe = WanPipeline.from_pretrained(phantom)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        theirs = pipe.transformer(hidden_states=model.impose_first_frame(x, cond), timestep=torch.tensor([600.0]),
                                  encoder_hidden_states=cond.prompt_embeds, return_dict=False)[0]
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    again, cond = prepared(phantom, subjects[:1], lora=file)
    with torch.no_grad():
        assert torch.allclose(again.velocity(x, torch.tensor(600.0), cond), ours, atol=1e-5)


# --- Conversion of the released checkpoint ----------------------------------------------

# diffusers name -> name in Wan's original `WanModel` (its module attributes), written out here
# independently of the converter's rename rules.
ORIGINAL_NAMES = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
ORIGINAL_BLOCK_NAMES = {
    "scale_shift_table": "modulation",
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v", "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3",  # Wan's cross-attention norm is its norm3
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}


def original_layout(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            module, _, param = rest.rpartition(".")
            if not module:  # blocks.N.scale_shift_table
                module, param = param, ""
            name = f"blocks.{index}.{ORIGINAL_BLOCK_NAMES[module]}"
        elif module == "":
            name, param = ORIGINAL_NAMES[param], ""
        else:
            name = ORIGINAL_NAMES[module]
        out[f"{name}.{param}" if param else name] = value.clone()
    return out


def test_convert_phantom_checkpoint_equals_the_same_weights_built_in_diffusers(phantom, tmp_path):
    from diffusers import WanTransformer3DModel
    from typer.testing import CliRunner

    from ipro.cli.main import _register, app

    config = WanTransformer3DModel.load_config(phantom / "transformer")
    torch.manual_seed(11)
    direct = WanTransformer3DModel.from_config(config).eval()
    with torch.no_grad():
        for p in direct.parameters():  # no zero-initialized weight may hide a wrong mapping
            p.add_(torch.randn_like(p) * 0.05)
    original = original_layout(direct.state_dict())
    assert "blocks.1.cross_attn.o.weight" in original and "blocks.0.norm3.weight" in original and "head.modulation" in original
    torch.save(original, tmp_path / "Phantom-Wan-tiny.pth")

    _register()
    base = tmp_path / "t2v"
    from diffusers import WanPipeline

    WanPipeline.from_pretrained(phantom).save_pretrained(base)  # a plain Wan T2V folder, no Phantom marker
    with pytest.raises(IproError, match="not a supported model family"):
        detect_family(base)  # the same config as Phantom's: only the converter's marker tells them apart
    schedule = base / "scheduler" / "scheduler_config.json"
    schedule.write_text(json.dumps({**json.loads(schedule.read_text()), "shift": 3.0}))  # as Wan's 480p T2V folders
    result = CliRunner().invoke(app, ["convert", "phantom", str(tmp_path / "Phantom-Wan-tiny.pth"), "--base", str(base), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output + repr(result.exception)

    converted = WanTransformer3DModel.from_pretrained(tmp_path / "out", subfolder="transformer").eval()
    x = torch.randn(1, 16, 3, 8, 8)
    text = torch.randn(1, 512, config["text_dim"])
    with torch.no_grad():
        a = converted(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text, return_dict=False)[0]
        b = direct(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text, return_dict=False)[0]
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in converted.state_dict().items())
    assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    model = load_model(tmp_path / "out", num_subject_images=2)
    assert model.family == "phantom" and model.vae is not None
    assert model.scheduler.config.shift == 5.0 and json.loads(schedule.read_text())["shift"] == 3.0  # Phantom's; base untouched

    # Bad input: one line naming the file and what to do.
    bad = dict(original)
    bad["blocks.0.cross_attn.k_img.weight"] = bad.pop("blocks.0.cross_attn.k.weight")  # an I2V key
    torch.save(bad, tmp_path / "i2v.pth")
    wrong_size = {k: (v[:, :8] if k == "text_embedding.0.weight" else v) for k, v in original.items()}
    torch.save(wrong_size, tmp_path / "other-size.pth")
    cases = {
        "i2v.pth": "not in Wan's text-to-video layout",
        "other-size.pth": "text_embedder.linear_1.weight has shape",
        "missing.pth": "no such checkpoint",
    }
    for name, message in cases.items():
        result = CliRunner().invoke(app, ["convert", "phantom", str(tmp_path / name), "--base", str(base), "--out", str(tmp_path / name[:-4])])
        assert isinstance(result.exception, IproError) and message in str(result.exception), result.output + repr(result.exception)
        assert not (tmp_path / name[:-4]).exists()
    result = CliRunner().invoke(app, ["convert", "phantom", str(tmp_path / "Phantom-Wan-tiny.pth"), "--base", str(base), "--out", str(tmp_path / "out")])
    assert isinstance(result.exception, IproError) and "already exists" in str(result.exception)


# --- Training and generation -------------------------------------------------------------


class Brightness(Reward):
    """Mean brightness of the generated frames: a reward that varies on a faceless tiny model."""

    name = "brightness"

    def forward(self, frames, batch=None):
        raw = frames.float().mean(dim=(1, 2, 3, 4))
        anchor = frames.flatten()[:1].sum() * 0.0
        return finish(self.name, Normalization(), list(raw), frames.float().mean(dim=(2, 3, 4)), torch.arange(frames.shape[1]), anchor, 0.0)


def trainer_for(method, dataset, out, steps, reward=None):
    from ipro.train.config import load_config
    from ipro.train.grpo import GRPOTrainer
    from ipro.train.ipro import IPROTrainer

    overrides = {"data.dataset": str(dataset), "optim.steps": steps, "optim.lr": 1e-2, "run.output_dir": str(out),
                 "run.log_with": [], "run.checkpoint_every": 1, "run.seed": 3}
    if method == "grpo":
        overrides["grpo.group_size"] = 2
    cls = GRPOTrainer if method == "grpo" else IPROTrainer
    return cls(load_config(f"configs/tiny-cpu-phantom-{method}.yaml", overrides), reward=reward)


@pytest.mark.parametrize("method", ["grpo", "ipro"])
def test_tiny_phantom_trains_and_resumes_exactly(method, dataset, tmp_path):
    straight = trainer_for(method, dataset, tmp_path / "a", 2, Brightness())
    assert straight.model.family == "phantom" and straight.model.num_subject_images == 2
    before = {k: p.detach().clone() for k, p in straight.named_params.items()}
    straight.train()
    after = {k: p.detach() for k, p in straight.named_params.items()}
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the LoRA changed
    assert all(torch.isfinite(p).all() for p in after.values())
    lines = [json.loads(line) for line in (tmp_path / "a" / "logs.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(line["reward"]) for line in lines)

    first = trainer_for(method, dataset, tmp_path / "b", 1, Brightness())
    first.train()
    resumed = trainer_for(method, dataset, tmp_path / "b", 2, Brightness())
    resumed.train(resume=True)
    assert resumed.global_step == 2
    for k, p in after.items():
        assert torch.equal(p, resumed.named_params[k].detach()), k


def test_face_reward_runs_on_phantom_rollouts(dataset, tmp_path):
    """The presets' own reward (the face pool) on Phantom's decoded videos: the random tiny
    model draws no faces, so a step is a logged no-op, not a crash."""
    trainer = trainer_for("grpo", dataset, tmp_path, 1)
    batch = trainer.batch_at(0, 0)
    assert batch["subjects"].shape[:2] == (1, 2)
    rollout = trainer.rollout(batch, torch.Generator().manual_seed(0))
    assert rollout.sde.latents.shape[2] == 3 + 2  # the video's latent frames, then the 2 subjects
    assert rollout.logs["reward/face/no_face_batch"] == 1.0
    # IPRO decodes only the frames the face reward scores, through Phantom's decode.
    logs = trainer_for("ipro", dataset, tmp_path / "ipro", 1).step()
    assert logs["face_coverage"] == 0.0 and torch.isfinite(torch.as_tensor(logs["loss"]))


def test_generate_from_two_subject_faces_then_eval(phantom, astronaut, carphone, tmp_path):
    from typer.testing import CliRunner

    from ipro.cli.main import _register, app
    from ipro.data.video import read_video, write_image

    _register()
    faces = {"a": crop(astronaut, slice(40, 240), slice(140, 380), (96, 80)), "b": carphone[0]}  # two people
    for name, image in faces.items():
        write_image(tmp_path / f"{name}.png", image)
    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    common = ["--model", str(phantom), "--num-frames", "9", "--height", "64", "--width", "64", "--steps", "3", "--prompt", PROMPT]
    runs = {"issue": ["--reference", a, b], "repeated": ["--subject", a, "--subject", b], "one": ["--subject", a]}
    for run, args in runs.items():
        result = CliRunner().invoke(app, ["generate", *args, *common, "--out", str(tmp_path / run)])
        assert result.exit_code == 0, result.output + repr(result.exception)
    video, _ = read_video(tmp_path / "issue" / "a+b.mp4")
    assert video.shape == (9, 64, 64, 3)
    # Both spellings make the same video; H.264 encoding is not bit-reproducible here (measured: the
    # same frames written twice differ by 0.03 on average), one reference instead of two by 1.7.
    same = np.abs(video.astype(int) - read_video(tmp_path / "repeated" / "a+b.mp4")[0].astype(int)).mean()
    other = np.abs(video.astype(int) - read_video(tmp_path / "one" / "a.mp4")[0].astype(int)).mean()
    assert same < 0.3 and other > 1.0, (same, other)
    settings = json.loads((tmp_path / "issue" / "a+b.json").read_text())
    assert settings["subjects"] == [a, b] and settings["image"] is None and settings["family"] == "phantom"

    # Phantom takes no first frame, so without references there is nothing to generate from.
    result = CliRunner().invoke(app, ["generate", *common, "--out", str(tmp_path / "none")])
    assert isinstance(result.exception, IproError) and "--subject" in str(result.exception)

    # `ipro eval`: the subject images, side by side, are the video's input image (its people).
    from ipro.eval.inputs import find_items

    items, unmatched = find_items(tmp_path / "issue", tmp_path)
    assert [i.name for i in items] == ["a+b"] and not unmatched
    montage = items[0].input_image()
    assert montage.shape[0] == 256 and montage.shape[1] > 256
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "issue"), "--inputs", str(tmp_path), "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    (video_metrics,) = metrics["videos"]
    assert video_metrics["name"] == "a+b" and video_metrics["details"]["people_in_input"] == 2  # one per subject image


@pytest.mark.real_size  # a real-size plan each (1-3 min): scripts/test.sh --real-size
@pytest.mark.parametrize("preset", ["phantom-grpo.yaml", "phantom-ipro.yaml"])
def test_gpu_presets_fit_one_80gb_gpu_by_the_planner(preset):
    """`ipro plan` on the shipped real-size Phantom-Wan 1.3B configs (meta device, no weights)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "ipro.cli.main", "plan", "-c", f"configs/{preset}", "--gpu-memory", "80GB"],
                         capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    assert "(phantom)" in out.stdout and "fits one 80 GB GPU" in out.stdout, out.stdout
    peak = float(out.stdout.split("overall peak (one GPU)")[1].split()[0])
    assert peak > 3.0  # the 1.3B transformer and UMT5-XXL were counted
