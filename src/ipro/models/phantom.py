"""Phantom-Wan (subject-to-video, one of Identity-GRPO's two base models) on diffusers' `WanPipeline`.

Phantom-Wan 1.3B/14B is a Wan 2.1 text-to-video transformer (16 latent channels in, the T2V
config) fine-tuned to keep the people of 1-4 subject images. Its inference code
(github.com/Phantom-video/Phantom, `phantom_wan/subject2video.py`) does, and so do we:
- each subject image is scaled to fit the video size, centred on white, and VAE-encoded
  as one latent frame; the R subject latents are appended AFTER the video's latent frames;
- before every transformer call the last R latent frames of x_t are overwritten with the
  subject latents (they are "clean" but get the same timestep as the video tokens);
- the decode drops the last R latent frames;
- CFG takes three passes with separate image and text scales:
      v = v(no text, no subj) + s_img * (v(no text, subj) - v(no text, no subj))
                              + s_text * (v(text, subj) - v(no text, subj))
  where "no subj" means subject latents of zeros and "no text" the negative prompt.
  Phantom's defaults are s_img = 5, s_text = 7.5 (50 steps, shift 5). Here `guidance_scale`
  is s_text and `image_guidance_scale` (a load option) s_img; guidance_scale <= 1 is one
  pass with text and subjects, as for every other family.

Phantom has no first frame: the `images` given to `prepare_condition` are not seen by the
transformer (only their batch size is used). Training still draws them from the curated
clips, because the subject crops, the face pool and the reward's people come from them.

A Phantom folder is the Wan T2V diffusers folder with Phantom's transformer (`ipro convert
phantom`), marked by `"_ipro_family": "phantom"` in model_index.json: a plain Wan T2V
folder has the same config, so the config alone cannot tell them apart.
"""

from __future__ import annotations

from pathlib import Path
import json
import os
from typing import Sequence

import torch
from diffusers import WanPipeline

from ipro.errors import IproError
from ipro.models.base import Condition, batch_prompts, fit_on_white, subjects_per_video
from ipro.models.registry import register_family
from ipro.models.wan import WanModel

FAMILY_MARKER = "_ipro_family"  # model_index.json key; diffusers ignores keys starting with "_"
MAX_SUBJECTS = 4  # Phantom was trained with up to 4 subject images


def mark_phantom(folder: str | Path) -> None:
    """Mark a diffusers Wan T2V folder as Phantom (rewrites model_index.json atomically)."""
    index = Path(folder) / "model_index.json"
    tmp = index.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**json.loads(index.read_text()), FAMILY_MARKER: PhantomWan.family}, indent=2) + "\n")
    os.replace(tmp, index)


@register_family
class PhantomWan(WanModel):
    """Phantom-Wan 1.3B/14B: a Wan 2.1 T2V transformer with subject latents appended in time."""

    family = "phantom"
    fps = 16.0
    pipeline_class = WanPipeline  # LoRA files in the format WanPipeline.load_lora_weights reads
    default_steps = 50
    default_guidance = 7.5  # Phantom's text guidance (sample_guide_scale_text)

    takes_subject_images = True
    takes_first_frame = False
    num_subject_images = 1
    image_guidance_scale: float = 5.0  # Phantom's sample_guide_scale_img

    @classmethod
    def matches(cls, model_index, transformer_config):
        return model_index.get(FAMILY_MARKER) == cls.family

    @classmethod
    def from_pretrained(cls, path: str | Path, *, num_subject_images: int = 1, image_guidance_scale: float = 5.0, **options) -> "PhantomWan":
        """As `WanModel.from_pretrained`; num_subject_images: subject images per video (1-4, one per person)."""
        if not 1 <= num_subject_images <= MAX_SUBJECTS:
            raise IproError(
                f"num_subject_images={num_subject_images}: Phantom takes 1 to {MAX_SUBJECTS} subject images "
                "(one per person); set model.subject_images or pass 1-4 --subject images"
            )
        model = super().from_pretrained(path, **options)
        if model.transformer.config.in_channels != model.latent_channels:
            raise IproError(
                f"{Path(path) / 'transformer' / 'config.json'}: in_channels={model.transformer.config.in_channels}, Phantom's "
                f"text-to-video transformer takes {model.latent_channels}; rebuild the folder with `ipro convert phantom`"
            )
        model.num_subject_images = num_subject_images
        model.image_guidance_scale = image_guidance_scale
        return model

    # --- Shapes --------------------------------------------------------------------------

    def latent_shape(self, batch_size: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """The noise shape: the video's latent frames, then `num_subject_images` subject frames."""
        b, c, f, h, w = super().latent_shape(batch_size, num_frames, height, width)
        return (b, c, f + self.num_subject_images, h, w)

    def generated_mask(self, cond: Condition) -> torch.Tensor:
        """1 on the video's latent frames, 0 on the trailing subject frames (imposed, not generated)."""
        _, _, r, h, w = cond.image_latents.shape
        f = self.latent_frame_of(cond.num_frames - 1) + 1
        mask = torch.ones(1, 1, f + r, h, w, device=cond.image_latents.device)
        mask[:, :, f:] = 0
        return mask

    # --- Conditioning --------------------------------------------------------------------

    def _subject_canvas(self, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(3, h, w) in [0, 1] -> (3, H, W) in [0, 1]: scaled to fit, centred on white (Phantom's load_ref_images)."""
        image = image.to(self.device, torch.float32)
        return fit_on_white(image, height, width, mode="bicubic", antialias=True, round_size=True).clamp(0, 1)

    def prepare_condition(
        self,
        images,
        prompts,
        num_frames,
        height,
        width,
        negative_prompt: str | None = "",
        subject_images: Sequence[torch.Tensor] | torch.Tensor | None = None,
    ) -> Condition:
        """B prompts and R = num_subject_images subject images per video in [0, 1]: B sequences
        of (3, h, w) images (sizes may differ) or a (B, R, 3, h, w) tensor; one video's subjects
        may serve the whole batch. `images` (B, 3, H, W) only give the batch size (see module docstring).
        """
        self.check_shape(num_frames, height, width)
        b = images.shape[0]
        prompts = batch_prompts(prompts, b)
        r = self.num_subject_images
        subjects = subjects_per_video(subject_images, b, r)
        canvases = torch.stack([self._subject_canvas(img, height, width) for subj in subjects for img in subj])
        latents = self.encode_video(canvases[:, :, None])  # (B*R, C, 1, h, w), each image its own latent frame
        latents = latents.unflatten(0, (b, r)).squeeze(3).transpose(1, 2)  # (B, C, R, h, w), in the given order
        return Condition(
            prompt_embeds=self.encode_prompts(prompts),
            negative_prompt_embeds=self.encode_prompts([negative_prompt] * b) if negative_prompt is not None else None,
            num_frames=num_frames,
            height=height,
            width=width,
            image_latents=latents.to(self.dtype),
            num_subject_frames=r,
        )

    # --- Denoising and decoding ----------------------------------------------------------

    def impose_first_frame(self, x: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Overwrite the trailing R latent frames with the subject latents (every step, like Phantom)."""
        r = cond.num_subject_frames
        return torch.cat([x[:, :, :-r], cond.image_latents.to(x.dtype)], dim=2)

    def _forward(self, transformer, x: torch.Tensor, t: torch.Tensor, cond: Condition, text: torch.Tensor) -> torch.Tensor:
        # x already holds the subjects (or zeros for the image-unconditional pass) in its last frames.
        out = transformer(
            hidden_states=x.to(getattr(transformer, "module", transformer).patch_embedding.weight.dtype),
            timestep=t,
            encoder_hidden_states=text,
            return_dict=False,
        )[0]
        return out.float()

    def _guided(self, transformer, x, t, cond: Condition, guidance_scale: float) -> torch.Tensor:
        x = self.impose_first_frame(x, cond)
        v_text_subj = self._forward(transformer, x, t, cond, cond.prompt_embeds)
        if guidance_scale <= 1.0:
            return v_text_subj
        if cond.negative_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 needs a condition prepared with a negative_prompt")
        r = cond.num_subject_frames
        no_subj = torch.cat([x[:, :, :-r], torch.zeros_like(x[:, :, -r:])], dim=2)
        v_subj = self._forward(transformer, x, t, cond, cond.negative_prompt_embeds)
        v_none = self._forward(transformer, no_subj, t, cond, cond.negative_prompt_embeds)
        return v_none + self.image_guidance_scale * (v_subj - v_none) + guidance_scale * (v_text_subj - v_subj)

    def velocity(self, x_t, t, cond: Condition, guidance_scale: float = 1.0) -> torch.Tensor:
        if cond.num_subject_frames is None or cond.image_latents is None:
            raise ValueError("this condition has no subject latents; prepare it with the phantom model")
        if x_t.shape[2] != self.latent_frame_of(cond.num_frames - 1) + 1 + cond.num_subject_frames:
            raise IproError(
                f"latents have {x_t.shape[2]} frames but the condition needs the video's then "
                f"{cond.num_subject_frames} subject frames; draw them with model.latent_shape"
            )
        return super().velocity(x_t, t, cond, guidance_scale)

    def decode(self, latents: torch.Tensor, frames: list[int] | None = None) -> torch.Tensor:
        """Latents with the subject frames last -> the video alone, (B, num_frames, 3, H, W)."""
        return super().decode(latents[:, :, : latents.shape[2] - self.num_subject_images], frames)
