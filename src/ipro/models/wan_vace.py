"""Wan VACE (subject-to-video, the base model of Identity-GRPO) on diffusers' `WanVACEPipeline`.

VACE is a text-to-video Wan transformer (16 latent channels in) plus a control branch whose
hints are added to a subset of blocks (`vace_layers`). Everything the video is conditioned on
goes through `control_hidden_states`, 96 channels per latent frame:
- inactive (16): latents of the video where the mask keeps it (the given pixels, 0 elsewhere);
- reactive (16): latents of the video where the mask regenerates it;
- mask (64): the pixel mask folded 8x8 onto channels (VAE stride), resampled to latent frames.

Image-to-video is the video "first frame given, the rest gray (0 in the VAE's [-1, 1]), mask 0
on frame 0 and 1 elsewhere". Subject images (e.g. one face crop per person) are encoded as
one latent frame each and prepended in time: the noise gets R more leading latent frames, their
control is (subject latent, zeros, zero mask), the transformer denoises them along with the
video, and they are dropped before decoding. Nothing is imposed on x_t.

The number of subject images R is a setting of the loaded model (`num_subject_images`),
because the samplers ask the model for the noise shape without the condition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import WanVACEPipeline

from ipro.errors import IproError
from ipro.models.base import Condition, batch_prompts, fit_on_white, subjects_per_video
from ipro.models.registry import register_family
from ipro.models.wan import WanModel


@register_family
class WanVACE(WanModel):
    """Wan 2.1 VACE 1.3B/14B (and two-expert VACE checkpoints, routed like Wan 2.2 A14B)."""

    family = "wan-vace"
    fps = 16.0
    pipeline_class = WanVACEPipeline  # LoRA files in the format WanVACEPipeline.load_lora_weights reads

    takes_subject_images = True
    conditioning_scale: float = 1.0  # weight of the control hints in every VACE layer

    @classmethod
    def matches(cls, model_index, transformer_config):
        return model_index.get("_class_name") == "WanVACEPipeline"

    @classmethod
    def from_pretrained(cls, path: str | Path, *, num_subject_images: int = 0, conditioning_scale: float = 1.0, **options) -> "WanVACE":
        """As `WanModel.from_pretrained`; num_subject_images: subject images per video (0: plain I2V)."""
        if num_subject_images < 0:
            raise IproError(f"num_subject_images={num_subject_images}: use 0 or more")
        model = super().from_pretrained(path, **options)
        model.num_subject_images = num_subject_images
        model.conditioning_scale = conditioning_scale
        return model

    # --- Shapes --------------------------------------------------------------------------

    def latent_shape(self, batch_size: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """The noise shape: the video's latent frames after `num_subject_images` subject frames.

        Unlike the other families this needs the loaded model (it depends on its subject count).
        """
        b, c, f, h, w = super().latent_shape(batch_size, num_frames, height, width)
        return (b, c, self.num_subject_images + f, h, w)

    def generated_mask(self, cond: Condition) -> torch.Tensor | None:
        """0 on the subject frames (denoised but thrown away), 1 on the video; None without subjects."""
        r = cond.num_subject_frames or 0
        if r == 0:
            return None
        _, _, f, h, w = cond.control_latents.shape
        mask = torch.ones(1, 1, f, h, w, device=cond.control_latents.device)
        mask[:, :, :r] = 0
        return mask

    # --- Conditioning --------------------------------------------------------------------

    @torch.no_grad()
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in the VAE's [-1, 1] -> normalized latents (the posterior's mode)."""
        z = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode().float()
        mean, inv_std = self._latents_stats(z)
        return (z - mean) * inv_std

    def _mask_latents(self, mask: torch.Tensor) -> torch.Tensor:
        """Pixel mask (B, F, H, W), 1 = generate -> (B, s*s, f, h, w): each s x s pixel block on channels.

        Latent frames take the mask of the nearest pixel frame ("nearest-exact"), like VACE.
        """
        b, n, height, width = mask.shape
        s = self.scale_factor_spatial
        h, w = height // s, width // s
        blocks = mask.view(b, n, h, s, w, s).permute(0, 3, 5, 1, 2, 4).flatten(1, 2)  # (B, s*s, F, h, w)
        f = (n - 1) // self.scale_factor_temporal + 1
        return F.interpolate(blocks, size=(f, h, w), mode="nearest-exact")

    def _subject_canvas(self, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(3, h, w) in [0, 1] -> (3, H, W) in [-1, 1]: scaled to fit, centred on white (as diffusers does)."""
        image = image.to(self.device, torch.float32) * 2 - 1
        return fit_on_white(image, height, width, mode="bilinear", antialias=False, round_size=False)

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
        """First frames (B, 3, H, W) in [0, 1], B prompts and, when the model was loaded with
        num_subject_images=R, R subject images per video in [0, 1]: B sequences of (3, h, w)
        images (sizes may differ) or a (B, R, 3, h, w) tensor; one video's subjects may serve
        the whole batch. Each is scaled to fit (H, W) and centred on white.

        With several subjects, their latent frames come in reverse order, as in WanVACEPipeline.
        """
        self.check_shape(num_frames, height, width)
        b = images.shape[0]
        prompts = batch_prompts(prompts, b)
        r = self.num_subject_images
        subjects = subjects_per_video(subject_images, b, r)

        images = images.to(self.device, torch.float32)
        if tuple(images.shape[-2:]) != (height, width):
            images = F.interpolate(images, size=(height, width), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        # Control video: the image, then gray frames (0 in [-1, 1]); the mask regenerates all but frame 0.
        video = torch.zeros(b, 3, num_frames, height, width, device=self.device)
        video[:, :, 0] = images * 2 - 1
        mask = torch.ones(b, num_frames, height, width, device=self.device)
        mask[:, 0] = 0
        inactive = self._encode_pixels(video)  # video * (1 - mask): only frame 0 is nonzero
        reactive = self._encode_pixels(torch.zeros_like(video[:1])).expand_as(inactive)  # video * mask: all zero
        control = torch.cat([inactive, reactive, self._mask_latents(mask)], dim=1)

        if r > 0:
            # One latent frame per subject image: (its latent, zero reactive latent, zero mask).
            canvases = torch.stack([self._subject_canvas(img, height, width) for subj in subjects for img in subj])
            latents = self._encode_pixels(canvases[:, :, None]).unflatten(0, (b, r))  # (B, R, C, 1, h, w)
            latents = latents.flip(1).squeeze(3).transpose(1, 2)  # (B, C, R, h, w), last subject image first
            pad = control.new_zeros(b, control.shape[1] - latents.shape[1], r, *latents.shape[-2:])
            control = torch.cat([torch.cat([latents, pad], dim=1), control], dim=2)

        return Condition(
            prompt_embeds=self.encode_prompts(prompts),
            negative_prompt_embeds=self.encode_prompts([negative_prompt] * b) if negative_prompt is not None else None,
            num_frames=num_frames,
            height=height,
            width=width,
            control_latents=control.to(self.dtype),
            num_subject_frames=r,
        )

    # --- Denoising and decoding ----------------------------------------------------------

    def velocity(self, x_t, t, cond: Condition, guidance_scale: float = 1.0) -> torch.Tensor:
        if cond.control_latents is None:
            raise ValueError("this condition has no control_latents; prepare it with the wan-vace model")
        if x_t.shape[2] != cond.control_latents.shape[2]:
            raise IproError(
                f"latents have {x_t.shape[2]} frames but the condition {cond.control_latents.shape[2]} "
                f"({cond.num_subject_frames} subject frames first); draw them with model.latent_shape"
            )
        return super().velocity(x_t, t, cond, guidance_scale)

    def _forward(self, transformer, x: torch.Tensor, t: torch.Tensor, cond: Condition, text: torch.Tensor) -> torch.Tensor:
        module = getattr(transformer, "module", transformer)  # under DDP, the config lives on the inner module
        dtype = module.patch_embedding.weight.dtype
        scale = torch.full((len(module.config.vace_layers),), self.conditioning_scale, device=x.device, dtype=dtype)
        out = transformer(
            hidden_states=x.to(dtype),
            timestep=t,
            encoder_hidden_states=text,
            control_hidden_states=cond.control_latents.to(dtype),
            control_hidden_states_scale=scale,
            return_dict=False,
        )[0]
        return out.float()

    def decode(self, latents: torch.Tensor, frames: list[int] | None = None) -> torch.Tensor:
        """Latents with the subject frames first -> the video alone, (B, num_frames, 3, H, W)."""
        return super().decode(latents[:, :, self.num_subject_images :], frames)
