"""Wan VACE (subject-to-video) on a tiny random checkpoint: parity with WanVACEPipeline,
subject frames in and out, and LoRA files diffusers loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import WanVACEPipeline
from PIL import Image

from ipro.errors import IproError
from ipro.models import FAMILIES, build_tiny, detect_family, load_model
from ipro.sampling import sample, sde_sample

from conftest import crop

H = W = 64
FRAMES = 9
PROMPT = "a man talks on the phone"


@pytest.fixture(scope="module")
def vace(tmp_path_factory):
    return build_tiny("wan-vace", tmp_path_factory.mktemp("tiny_vace") / "wan-vace", seed=0)


@pytest.fixture(scope="module")
def subject(astronaut):
    """A 40 x 48 face crop (uint8): not the video's aspect, so it is scaled and padded onto white.
    Sides are multiples of 8, which diffusers' image processor leaves alone."""
    return crop(astronaut, slice(40, 240), slice(140, 380), (48, 40))


@pytest.fixture(scope="module")
def subjects(subject, astronaut):
    """Two subject images of different sizes (the second 56 x 32, taller than wide)."""
    return [subject, crop(astronaut, slice(200, 400), slice(100, 300), (32, 56))]


def as_float(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255


def pipeline_latents(folder, face, subjects=(), guidance=1.0, steps=6, seed=7, lora=None, output_type="latent"):
    """WanVACEPipeline on the same I2V control: the image then gray (0.5) frames, mask 0 on frame 0 only."""
    pipe = WanVACEPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    # (1, F, 3, H, W) float tensors in [0, 1]: exact gray, unlike a uint8 picture's 128 / 255
    video = torch.cat([face[1], torch.full((FRAMES - 1, 3, H, W), 0.5)])[None]
    mask = torch.ones(1, FRAMES, 3, H, W)
    mask[:, 0] = 0
    return pipe(
        video=video, mask=mask, reference_images=[Image.fromarray(r) for r in subjects] or None,
        prompt=PROMPT, negative_prompt="blurry", height=H, width=W, num_frames=FRAMES, num_inference_steps=steps,
        guidance_scale=guidance, output_type=output_type, generator=torch.Generator().manual_seed(seed),
    ).frames


def prepared(folder, face, subjects=(), **options):
    model = load_model(folder, num_subject_images=len(subjects), **options)
    cond = model.prepare_condition(
        face[1], [PROMPT], FRAMES, H, W, negative_prompt="blurry",
        subject_images=[[as_float(r) for r in subjects]] if subjects else None,
    )
    return model, cond


# Measured on CPU: bit-identical (max |diff| 0) with 0 or 1 subject image; 7e-7 with 2, because we
# encode the subject images in one VAE batch and diffusers one at a time.
@pytest.mark.parametrize(("num_subjects", "guidance"), [(0, 1.0), (0, 4.0), (1, 1.0), (1, 4.0), (2, 1.0)])
def test_ode_matches_diffusers_pipeline(vace, face, subjects, num_subjects, guidance):
    subj = subjects[:num_subjects]
    model, cond = prepared(vace, face, subj)
    assert detect_family(vace) == "wan-vace" and isinstance(model, FAMILIES["wan-vace"])
    with torch.no_grad():
        ours = sample(model, cond, 6, seed=7, guidance_scale=guidance).latents
    theirs = pipeline_latents(vace, face, subj, guidance)  # latent output keeps the subject frames
    assert ours.shape == theirs.shape == (1, 16, num_subjects + 3, H // 8, W // 8)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


def test_subject_frames_are_dropped_and_not_generated(vace, face, subject):
    model, cond = prepared(vace, face, [subject])
    assert cond.num_subject_frames == 1 and cond.control_latents.shape == (1, 96, 4, H // 8, W // 8)
    mask = model.generated_mask(cond)
    assert mask.shape == (1, 1, 4, H // 8, W // 8)
    assert (mask[:, :, 0] == 0).all() and (mask[:, :, 1:] == 1).all()
    assert model.generated_mask(prepared(vace, face)[1]) is None  # nothing to mask without subjects

    with torch.no_grad():
        latents = sample(model, cond, 4, seed=7, guidance_scale=1.0).latents
        video = model.decode(latents)
    assert video.shape == (1, FRAMES, 3, H, W) and 0 <= video.min() and video.max() <= 1
    assert torch.equal(model.decode(latents, frames=[0, 4]), video[:, [0, 4]])
    # The same frames as the pipeline's own decoded output (which strips the subject frames itself).
    theirs = pipeline_latents(vace, face, [subject], steps=4, output_type="pt")
    assert torch.allclose(video, theirs, atol=1e-5, rtol=0), (video - theirs).abs().max()

    # GRPO's SDE log-probs score only the video's latents.
    rollout = sde_sample(model, cond, 3, eta=0.7, seed=5, guidance_scale=1.0)
    assert rollout.log_probs.shape == (1, 3) and torch.isfinite(rollout.log_probs).all()

    with pytest.raises(IproError, match="num_subject_images=1"):
        model.prepare_condition(face[1], [PROMPT], FRAMES, H, W)
    with pytest.raises(IproError, match="latents have 3 frames but the condition 4"):
        model.velocity(latents[:, :, 1:], torch.tensor(500.0), cond)


def test_saved_lora_loads_in_diffusers(vace, face, subject, tmp_path):
    # alpha != rank: the scale must survive the file (diffusers reads it from the metadata).
    model, cond = prepared(vace, face, [subject], finetune="lora", lora_rank=4, lora_alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.trainable_module.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a no-op adapter)
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    assert any(n.startswith("vace_blocks.") and "lora_" in n for n, _ in model.trainable_module.named_parameters())
    with torch.no_grad():
        ours = sample(model, cond, 4, seed=3, guidance_scale=1.0).latents
        with model.base_weights():
            base = sample(model, cond, 4, seed=3, guidance_scale=1.0).latents
    file = model.save_lora(tmp_path / "lora")
    assert file.name == "pytorch_lora_weights.safetensors" and file.is_file()

    theirs = pipeline_latents(vace, face, [subject], steps=4, seed=3, lora=tmp_path / "lora")
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()
    assert (ours - base).abs().max() > 1e-2  # and the LoRA does something

    # Our loaders: as a frozen adapter for inference, and into the trained adapter to resume.
    for options in (dict(lora=file), dict(finetune="lora", lora_rank=4, lora_alpha=8, lora=tmp_path / "lora")):
        reloaded, cond = prepared(vace, face, [subject], **options)
        with torch.no_grad():
            again = sample(reloaded, cond, 4, seed=3, guidance_scale=1.0).latents
        assert torch.allclose(again, ours, atol=1e-6)


def test_dataset_subject_images_are_the_people_s_faces_in_the_first_frame(dataset):
    """One crop per person on frame 0 (carphone has one: the crop holds his face, the
    same person as his pool), then the whole frame for the remaining slots."""
    from ipro.data.dataset import CuratedDataset, collate
    from ipro.faces.embedder import FaceEmbedder

    data = CuratedDataset(dataset, size=(128, 160), subjects=2)
    batch = collate([data[0], data[1]])
    subj = batch["subjects"]
    assert subj.shape == (2, 2, 3, 128, 128)
    embedder = FaceEmbedder("dlib")
    faces = embedder(subj[:, :1])  # (2 videos, 1 frame): the face crops
    assert faces.sample.tolist() == [0, 1]
    for k, pool in enumerate(batch["pool"]):
        person = torch.nn.functional.normalize(pool.embeddings[pool.identity == 0].mean(0), dim=0)
        assert float(faces.embeddings[k] @ person) > 0.9  # measured 0.993, 0.994
        # The face fills the crop: its box is over a third of the crop's side.
        x0, y0, x1, y1 = faces.boxes[k].tolist()
        assert x1 - x0 > 128 / 3
    # Slot 2: the first frame, squashed to a square.
    whole = torch.nn.functional.interpolate(batch["image"][:1], size=(128, 128), mode="bilinear", antialias=True)
    assert float((subj[0, 1] - whole[0]).abs().mean()) < 0.02


def test_grpo_trains_wan_vace_with_subject_crops(dataset, tmp_path):
    from ipro.train.config import load_config
    from ipro.train.grpo import GRPOTrainer

    overrides = {"model.path": "tiny:wan-vace", "model.subject_images": 1, "data.dataset": str(dataset), "data.height": 64,
                 "data.width": 64, "grpo.group_size": 2, "run.output_dir": str(tmp_path / "run"), "run.log_with": [], "optim.steps": 2}
    trainer = GRPOTrainer(load_config("configs/tiny-cpu-grpo.yaml", overrides))
    assert trainer.model.num_subject_images == 1
    batch = trainer.batch_at(0, 0)
    cond = trainer.condition(batch)
    assert cond.num_subject_frames == 1
    rollout = trainer.rollout(batch, torch.Generator().manual_seed(0))
    assert rollout.sde.latents.shape[2] == 1 + 3  # the subject's latent frame, then the video's
    assert trainer.model.decode(rollout.sde.latents).shape[1] == 9 and rollout.scores.shape == (2,)
    trainer.train()
    assert trainer.global_step == 2 and sorted(p.name for p in (tmp_path / "run").rglob("*lora*.safetensors"))
    with pytest.raises(IproError, match="the wan2.1-i2v family takes no subject images"):
        GRPOTrainer(load_config("configs/tiny-cpu-grpo.yaml", {**overrides, "model.path": "tiny:wan2.1-i2v", "run.output_dir": str(tmp_path / "r2")}))


def test_generate_with_subject_images(vace, face, subject, tmp_path):
    """`ipro generate --subject`: the reference conditions the video (it differs from the
    video made without it) and is not one of its frames."""
    from typer.testing import CliRunner

    import ipro.cli.generate  # noqa: F401  (registers the command)
    from ipro.cli.main import app
    from ipro.data.video import read_video, write_image

    write_image(tmp_path / "first.png", face[0])
    write_image(tmp_path / "ref.png", subject)
    common = [str(tmp_path / "first.png"), "--model", str(vace), "--num-frames", "9", "--height", "64", "--width", "64", "--steps", "3"]
    for name, extra in (("with", ["--subject", str(tmp_path / "ref.png")]), ("without", [])):
        result = CliRunner().invoke(app, ["generate", *common, *extra, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output + repr(result.exception)
    with_ref, _ = read_video(tmp_path / "with" / "first.mp4")
    without, _ = read_video(tmp_path / "without" / "first.mp4")
    assert with_ref.shape == without.shape == (9, 64, 64, 3)
    assert np.abs(with_ref.astype(int) - without.astype(int)).mean() > 1.0
    import json

    assert json.loads((tmp_path / "with" / "first.json").read_text())["subjects"] == [str(tmp_path / "ref.png")]


def test_subject_images_without_a_face_on_the_first_frame_are_the_whole_frame(dataset):
    """A clip whose people all appear later (or a faceless pool) still gets its R subject images."""
    import dataclasses

    from ipro.data.dataset import CuratedDataset, subject_crops

    item = CuratedDataset(dataset)[0]
    image, pool = item["image"], item["pool"]
    later = dataclasses.replace(pool, frame=pool.frame + 1)
    subj = subject_crops(image, later, 2, 32)
    whole = torch.nn.functional.interpolate(image[None], size=(32, 32), mode="bilinear", antialias=True)[0]
    assert subj.shape == (2, 3, 32, 32)
    assert float((subj - whole).abs().max()) < 1e-5
    empty = dataclasses.replace(pool, **{k: getattr(pool, k)[:0] for k in ("embeddings", "frame", "identity", "boxes", "landmarks", "scores")})
    assert subject_crops(image, empty, 1, 32).shape == (1, 3, 32, 32)
