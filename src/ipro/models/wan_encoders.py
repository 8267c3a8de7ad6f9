"""The text and image encoders of a Wan pipeline, as a mixin of `WanModel`: UMT5 prompt
embeddings and CLIP image tokens, cached on the CPU. Training encodes everything it will
need once (`release_encoders`) and then moves both encoders off the accelerator, so a
training step never runs them.
"""

from __future__ import annotations

import hashlib

import torch

TEXT_TOKENS = 512  # Wan's cross-attention assumes exactly 512 text tokens (image tokens come first)


class WanEncoders:
    """Needs `pipe`, `device`, `dtype`, `transformer` and `uses_clip` from the model, and
    `_text_cache`, `_clip_cache`, `_encoders_released` set in its __init__."""

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, 512, D) UMT5 embeddings, zero-padded like the pipeline; cached per prompt (on the CPU)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            encoder_device = self.pipe.text_encoder.device  # the CPU once the encoders are released
            with torch.no_grad():
                embeds, _ = self.pipe.encode_prompt(
                    missing, do_classifier_free_guidance=False, max_sequence_length=TEXT_TOKENS, device=encoder_device, dtype=self.dtype
                )
            for prompt, e in zip(missing, embeds):
                length = int((e.abs().sum(-1) > 0).nonzero().max()) + 1 if e.abs().sum() > 0 else 0
                self._text_cache[prompt] = e[:length].cpu().clone()  # store only real tokens; pads are exact zeros
        out = torch.zeros(len(prompts), TEXT_TOKENS, self.transformer.config.text_dim, device=self.device, dtype=self.dtype)
        for i, p in enumerate(prompts):
            out[i, : len(self._text_cache[p])] = self._text_cache[p]
        return out

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    def release_encoders(self, prompts, images=()) -> None:
        """Encode every prompt and first frame training will use, then move the text and image
        encoders to the CPU: they are not needed on the accelerator again. Anything new later
        is encoded on the CPU (slower, same result up to the device's arithmetic)."""
        self.encode_prompts(list(dict.fromkeys(prompts)))
        self._encoders_released = True  # from here on encode_clip caches what it computes
        if self.uses_clip:
            for image in images:
                self.encode_clip(image[None])
        for encoder in (self.pipe.text_encoder, getattr(self.pipe, "image_encoder", None)):
            if encoder is not None:
                encoder.to("cpu")

    @torch.no_grad()
    def encode_clip(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, N, D) CLIP tokens. Once the encoders are released, each
        image is encoded alone and cached by its pixels, so a training step never runs CLIP."""
        # The CLIP processor works on uint8 pictures (it resizes with PIL); [0, 1] floats round-trip exactly.
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        if not self._encoders_released:
            return self._clip_tokens(list(pixels)).to(self.device)
        keys = [hashlib.sha1(p.tobytes()).digest() + bytes(str(p.shape), "ascii") for p in pixels]
        for key, p in zip(keys, pixels):
            if key not in self._clip_cache:
                self._clip_cache[key] = self._clip_tokens([p]).cpu()[0]
        return torch.stack([self._clip_cache[k] for k in keys]).to(self.device)

    def _clip_tokens(self, pixels: list) -> torch.Tensor:
        encoder = self.pipe.image_encoder
        inputs = self.pipe.image_processor(images=pixels, return_tensors="pt").to(encoder.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(encoder.dtype)
        hidden = encoder(**inputs, output_hidden_states=True).hidden_states
        return hidden[-2].to(self.dtype)  # Wan uses the penultimate layer's tokens
