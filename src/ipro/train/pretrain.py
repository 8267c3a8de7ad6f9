"""Pretraining: train a base model in full from real footage (`method: pretrain`). It is how
the embedded model (`ipro/assets/base-model`) is made: `ipro train -c configs/base-model.yaml`.

Objective: flow matching with the first frame imposed (x_t = sigma * noise + (1 - sigma) * x0),
written as the mean squared error of the model's clean-video prediction x0 on the generated
frames (the velocity loss times sigma^2: the velocity loss would weight the near-clean steps
by up to 1/sigma^2). sigma is uniform in [0, 1], then shifted by the model's scheduler shift,
so training sees the noise levels the sampler visits. With `pretrain.edge_weight`, the squared
error of the prediction's pixel differences is added: edges are a small part of the MSE but most
of the difference error (measured to sharpen the model's frames: benchmarks/RESULTS.md). Clips are drawn from
`ipro.data.base_clips`, each step's from its own generator keyed by (seed, step, rank,
micro-batch), so a run resumes exactly like the other methods'.

Besides the shared trainer's checkpoints and logs: every `pretrain.held_out_every` steps the
x0 loss (plain MSE, whatever the edge weight) on held-out carphone clips is logged (held_out_loss); at the end the EMA weights
(the trained ones without EMA) are written to run.output_dir/model, a folder
`ipro.models.load_model` reads, and with `pretrain.evaluate_faces` that folder is measured on
the held-out inputs (face detection rate and dlib FaceSim, beside the real clips') into
run.output_dir/face_eval.json.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ipro.errors import IproError
from ipro.sampling.sde import masked_mean
from ipro.train.trainer import Trainer, step_generator

DATA_STREAM = 0x9E3779B97F4A7C15  # offsets the clips' generator key from the step's noise generator


def data_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """The generator a micro-batch's clips are drawn from: keyed like the step's noise, but
    another stream, so which clip is drawn is independent of its noise."""
    key = step_generator(seed, step, rank, micro).initial_seed()
    return torch.Generator().manual_seed((key + DATA_STREAM) % (2**63 - 1))


def shifted_sigmas(g: torch.Generator, n: int, shift: float) -> torch.Tensor:
    """n noise levels, uniform in [0, 1] then shifted like the sampler's schedule."""
    s = torch.rand(n, generator=g)
    return shift * s / (1 + (shift - 1) * s)


def x0_loss(model, clips: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, edge_weight: float = 0.0) -> torch.Tensor:
    """Mean squared error of the clean-video prediction over the generated frames, for clips
    (B, F, 3, H, W) in [0, 1] noised to `sigma` (B,) with `noise` (latent-shaped); plus
    edge_weight times the squared error of its horizontal and vertical pixel differences."""
    _, f, _, h, w = clips.shape
    x0 = model.encode_video(clips.transpose(1, 2))  # it takes (B, 3, F, H, W)
    cond = model.prepare_condition(clips[:, 0], [""], f, h, w)
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = model.impose_first_frame(s * noise + (1 - s) * x0, cond)
    pred = model.predict_x0(x_t, sigma * model.num_train_timesteps, cond)
    mask = model.generated_mask(cond)
    loss = masked_mean((pred - x0) ** 2, mask).mean()
    if edge_weight:
        err = (pred - x0)[:, :, mask[0, 0, :, 0, 0] > 0]
        loss = loss + edge_weight * (err.diff(dim=-1).square().mean() + err.diff(dim=-2).square().mean())
    return loss


class PretrainTrainer(Trainer):
    method = "pretrain"

    # --- Builders --------------------------------------------------------------------------

    def build_model(self):
        from ipro.models import FAMILIES, load_model, resolve_model_path

        m, d = self.config.model, self.config.data
        if m.path.startswith("new:"):
            model = FAMILIES[m.path.removeprefix("new:")].from_config(shift=m.shift, **m.architecture.model_dump())
            with torch.no_grad():  # start as "repeat the first frame": the change head outputs zero
                model.transformer.proj_out.weight.zero_()
                model.transformer.proj_out.bias.zero_()
            model.start_finetuning("full")
        else:
            model = load_model(resolve_model_path(m.path, self.output_dir), finetune="full")
        model.check_shape(d.num_frames, d.height, d.width)  # before any compute
        return model

    def build_dataset(self):
        from ipro.data.base_clips import BaseClips

        d = self.config.data
        return BaseClips(d.height, d.width, d.num_frames)

    def release_encoders(self) -> None:
        pass  # no captions, no image encoder: nothing to cache

    @functools.cached_property
    def held_out(self):
        from ipro.data.base_clips import held_out

        d = self.config.data
        return held_out(d.height, d.width, d.num_frames)

    def batch_at(self, step: int, micro: int) -> dict:
        c = self.config
        g = data_generator(c.run.seed, step, self.rank, micro)
        return {"clip": torch.stack([self.dataset.clip(g) for _ in range(c.data.batch_size)])}

    # --- One step --------------------------------------------------------------------------

    def compute_loss(self, batch: dict, generator: torch.Generator):
        dev = self.accelerator.device
        clips = batch["clip"].to(dev)  # (B, F, 3, H, W)
        b, f, _, h, w = clips.shape
        sigma = shifted_sigmas(generator, b, self.model.scheduler.config.shift)
        noise = torch.randn(self.model.latent_shape(b, f, h, w), generator=generator)
        loss = x0_loss(self.model, clips, sigma.to(dev), noise.to(dev), self.config.pretrain.edge_weight)
        return loss, {"loss": loss.detach(), "sigma": sigma.mean()}

    def step(self) -> dict:
        logs = super().step()
        every = self.config.pretrain.held_out_every
        if every and self.global_step % every == 0:
            logs["held_out_loss"] = self.held_out_loss()
        return logs

    @torch.no_grad()
    def held_out_loss(self) -> float:
        """The x0 loss on the held-out carphone clips at sigma 0.25, 0.5, 0.75 and 1, with
        fixed noise: comparable across steps and runs of one size."""
        clips = torch.stack([item.frames for item in self.held_out if len(item.frames) > 1]).to(self.accelerator.device)
        b, f, _, h, w = clips.shape
        g = torch.Generator().manual_seed(1234)
        losses = []
        for sigma in (0.25, 0.5, 0.75, 1.0):
            noise = torch.randn(self.model.latent_shape(b, f, h, w), generator=g).to(clips.device)
            with self.accelerator.autocast():
                losses.append(float(x0_loss(self.model, clips, torch.full((b,), sigma, device=clips.device), noise)))
        return sum(losses) / len(losses)

    @torch.no_grad()
    def _update_ema(self) -> None:
        # The recipe's EMA warms up, (step + 1) / (step + 10) capped at the decay, so the
        # average does not hold on to the random initialization.
        if self.ema is None:
            return
        d = min(self.config.optim.ema_decay, (self.global_step + 1) / (self.global_step + 10))
        for k, p in self.named_params.items():
            self.ema[k].lerp_(p.detach(), 1 - d)

    # --- Outputs ---------------------------------------------------------------------------

    def train(self, resume: bool | str = False) -> dict:
        logs = super().train(resume)
        if self.accelerator.is_main_process:
            folder = self.save_model()
            if self.config.pretrain.evaluate_faces:
                from ipro.models import load_model

                d = self.config.data
                report = evaluate_faces(load_model(folder), d.height, d.width, d.num_frames)
                (self.output_dir / "face_eval.json").write_text(json.dumps(report, indent=2) + "\n")
        return logs

    @property
    def model_dir(self) -> Path:
        return self.output_dir / "model"

    @torch.no_grad()
    def save_model(self) -> Path:
        """The EMA weights (the trained ones without EMA) as a model folder (model_index.json,
        transformer/, scheduler/), written under a temporary name and renamed."""
        weights = self.ema if self.ema is not None else {k: p.detach() for k, p in self.named_params.items()}
        trained = {k: p.detach().clone() for k, p in self.named_params.items()}
        tmp = self.output_dir / f".tmp-model-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for k, p in self.named_params.items():
                p.copy_(weights[k])
            self.model.save_pretrained(tmp)
        finally:
            for k, p in self.named_params.items():
                p.copy_(trained[k])
        shutil.rmtree(self.model_dir, ignore_errors=True)
        os.replace(tmp, self.model_dir)
        return self.model_dir

    @torch.no_grad()
    def write_samples(self) -> list[Path]:
        """Videos of the current model from the held-out first frames, written to
        output_dir/samples/step-<N>-<input>.mp4 (ODE, the model's default steps, seed run.seed)."""
        from ipro.generate import generate

        if not self.accelerator.is_main_process:
            return []
        d = self.config.data
        images = torch.stack([item.frames[0] for item in self.held_out])
        return generate(
            self.model, images, self.output_dir / "samples", prompts="", seeds=self.config.run.seed,
            names=[f"step-{self.global_step:06d}-{item.name}" for item in self.held_out], num_frames=d.num_frames,
            height=d.height, width=d.width, batch_size=len(images), metadata={"step": self.global_step},
        )


@torch.no_grad()
def evaluate_faces(model, height: int = 128, width: int = 160, frames: int = 9, seeds=(0, 1, 2), steps=(4, 8)) -> dict:
    """Face detection rate and dlib FaceSim (each generated frame's largest face vs the input's
    face) of a model's videos from the held-out inputs, per sampler step count, beside the
    same measures of the real held-out clips (the ceiling)."""
    from ipro.data.base_clips import held_out
    from ipro.faces.embedder import FaceEmbedder
    from ipro.sampling import sample

    embedder = FaceEmbedder("dlib")
    items = held_out(height, width, frames)
    inputs = {}
    for item in items:
        _, _, face = face_stats(embedder, item.frames[:1], None)
        if face is None:
            raise IproError(f"held-out input {item.name}: no face found in its first frame at {height}x{width}; evaluate at 128x160 "
                           "(in training, pretrain.evaluate_faces: false skips it)")
        inputs[item.name] = face
    real_det, real_sim = [], []
    for item in items:
        if len(item.frames) > 1:
            det, sims, _ = face_stats(embedder, item.frames[1:], inputs[item.name])
            real_det.append(det)
            real_sim += sims
    report = {"real_clips": {"detection_rate": _mean(real_det, 3), "facesim": _mean(real_sim, 4)}}
    for n in steps:
        det_all, sim_all, per_input = [], [], {}
        for item in items:
            cond = model.prepare_condition(item.frames[:1], [""], frames, height, width)
            sims = []
            for seed in seeds:
                video = model.decode(sample(model, cond, n, seed=seed).latents)[0]  # (F, 3, H, W)
                det, s, _ = face_stats(embedder, video[1:], inputs[item.name])
                det_all.append(det)
                sims += s
            sim_all += sims
            per_input[item.name] = _mean(sims, 4)
        report[f"{n}_steps"] = {"detection_rate": _mean(det_all, 3), "facesim": _mean(sim_all, 4), "facesim_per_input": per_input}
    return report


def face_stats(embedder, frames: torch.Tensor, input_face: torch.Tensor | None):
    """(detection rate over frames (F, 3, H, W), each detected largest face's cosine to
    `input_face`, the first frame's largest face embedding or None)."""
    faces = embedder(frames[None])
    sims, found, first = [], 0, None
    for f in range(frames.shape[0]):
        idx = faces.frame_faces(0, f)
        if len(idx) == 0:
            continue
        found += 1
        box = faces.boxes[idx]
        emb = faces.embeddings[idx[((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])).argmax()]]
        first = emb if f == 0 else first
        if input_face is not None:
            sims.append(float(emb @ input_face))
    return found / frames.shape[0], sims, first


def _mean(values, digits: int) -> float | None:
    return round(float(np.mean(values)), digits) if values else None
