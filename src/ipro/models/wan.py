"""Wan 2.1 / 2.2 image-to-video models on diffusers' `WanImageToVideoPipeline`.

Three families share this file because they share the pipeline; what differs is read from
the checkpoint's own config:
- Wan 2.1 I2V: the image latent and a 4-channel mask are concatenated to x_t on channels
  (16 + 4 + 16 = 36 in), plus CLIP image tokens in cross-attention (`image_dim`).
- Wan 2.2 TI2V-5B (`expand_timesteps`): the first-frame latent is written into x_t before
  every step and its tokens get timestep 0; 48 latent channels, VAE x16, so H, W % 32 == 0.
- Wan 2.2 I2V-A14B: two 2.1-style experts; `transformer` for t >= boundary_ratio * 1000
  (high noise), `transformer_2` below. Only the low-noise expert is fine-tuned.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ipro.errors import IproError
from ipro.models import lora as adapters
from ipro.models.base import Condition, VideoModel, batch_prompts, loading_components, quiet_loading, scheduler_with_shift
from ipro.models.lora import ADAPTER, DEFAULT_LORA_TARGETS
from ipro.models.offload import offload_blockwise
from ipro.models.registry import read_model_index, register_family
from ipro.models.wan_encoders import WanEncoders

with quiet_loading():  # the pipeline module asks transformers for a torchvision image processor: one warning per process
    from diffusers import WanImageToVideoPipeline



class WanModel(WanEncoders, VideoModel):
    """A Wan checkpoint driven through the `VideoModel` interface (see the module docstring)."""

    pipeline_class = WanImageToVideoPipeline  # its LoRA loader/saver defines the file format
    decode_tile: int | None = None  # spatial tile side in pixels for `decode` (None: whole frames)

    # --- Loading -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        finetune: str | None = None,
        lora: str | Path | None = None,
        lora_rank: int = 16,
        lora_alpha: float | None = None,
        lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
        lightning: str | Path | Sequence[str | Path] | None = None,
        lightning_steps: int = 4,
        lightning_shift: float = 5.0,
        gradient_checkpointing: bool = False,
        offload_frozen_expert: bool = False,
        decode_tile: int | None = None,
        vae_dtype: torch.dtype = torch.float32,
    ) -> "WanModel":
        """Load a local diffusers folder.

        dtype: transformer and text/image encoders (bf16 on GPU); the VAE stays in `vae_dtype`.
        finetune: None (inference), "lora" (peft LoRA on the trainable expert) or "full".
        lora: LoRA weights to load; with finetune="lora" they initialize the trained adapter (resume).
        lightning: a distilled few-step LoRA file (A14B: one per expert, high-noise first) that is
            merged into the base weights; sampling then defaults to `lightning_steps` steps with
            `lightning_shift` and no classifier-free guidance.
        gradient_checkpointing: recompute the trained expert's blocks in backward.
        offload_frozen_expert: A14B fine-tuning: the expert that is not trained lives on the CPU and
            runs block by block on `device` (diffusers group offloading), so it never sits on the GPU.
        """
        from diffusers import AutoencoderKLWan

        path = Path(path)
        model_index, _ = read_model_index(path)
        for name, spec in model_index.items():
            if isinstance(spec, list) and spec and spec[0] is not None and not (path / name).is_dir():
                raise IproError(f"{path / name}: missing; model_index.json lists component '{name}'")
        if finetune not in (None, "lora", "full"):  # before minutes of loading
            raise IproError(f"finetune={finetune!r}: use 'lora', 'full' or None")
        with loading_components(path):
            vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype)
            pipe = cls.pipeline_class.from_pretrained(path, vae=vae, torch_dtype=dtype or torch.float32)
        pipe.set_progress_bar_config(disable=True)
        model = cls(pipe)
        if lightning is not None:
            model.merge_lightning(lightning, steps=lightning_steps, shift=lightning_shift)
        model.start_finetuning(finetune, lora, rank=lora_rank, alpha=lora_alpha, targets=lora_targets)
        if gradient_checkpointing and model.finetune is not None:
            model.trainable_module.enable_gradient_checkpointing()  # the frozen expert keeps no activations
        model.offload_frozen = offload_frozen_expert
        if decode_tile is not None:
            from ipro.models.vae_decode import tile_geometry

            tile_geometry(model.vae, decode_tile)  # a bad tile size fails at load, not in the first step
        model.decode_tile = decode_tile
        return model.to(device)

    def __init__(self, pipe):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.transformer_2 = pipe.transformer_2
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        self.boundary_ratio = pipe.config.boundary_ratio
        self.expand_timesteps = bool(pipe.config.get("expand_timesteps", False))  # VACE's pipeline has no such key
        self.uses_clip = self.transformer.config.image_dim is not None
        if self.uses_clip and pipe.image_encoder is None:
            raise IproError("transformer/config.json sets image_dim but the model folder has no image_encoder")
        found = dict(
            patch_size=tuple(self.transformer.config.patch_size),
            latent_channels=self.vae.config.z_dim,
            scale_factor_spatial=self.vae.config.scale_factor_spatial,
            scale_factor_temporal=self.vae.config.scale_factor_temporal,
        )
        for key, value in found.items():
            if value != getattr(self, key):
                raise IproError(f"{self.family}: the checkpoint has {key}={value}, the family expects {getattr(self, key)}; pass the right family")
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.device = self.transformer.device
        self.finetune: str | None = None
        self._frozen: torch.nn.Module | None = None  # full fine-tuning: the weights before training
        self._use_base = False
        # Encoder outputs, kept on the CPU: prompts by text, CLIP tokens by the image's pixels.
        self._text_cache: dict[str, torch.Tensor] = {}
        self._clip_cache: dict[bytes, torch.Tensor] = {}
        self._encoders_released = False  # text/image encoders moved to the CPU by release_encoders
        self.offload_frozen = False  # see from_pretrained(offload_frozen_expert=...)
        self._offloaded_to: torch.device | None = None  # onload device of the offloaded frozen expert
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)

    @property
    def transformers(self) -> list[torch.nn.Module]:
        return [t for t in (self.transformer, self.transformer_2) if t is not None]

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def to(self, device) -> "WanModel":
        """Move to `device`, except what must not sit there: released encoders, and the frozen expert
        when it is offloaded (it then runs on `device` one block at a time)."""
        self.device = torch.device(device)
        released = (self.pipe.text_encoder, getattr(self.pipe, "image_encoder", None)) if self._encoders_released else ()  # T2V/VACE/Phantom pipelines have no image_encoder
        for module in self.pipe.components.values():
            if not isinstance(module, torch.nn.Module) or any(module is r for r in released):
                continue
            if module is self.frozen_expert and self.offload_frozen:
                self._offloaded_to = offload_blockwise(module, self.device, self._offloaded_to)
            else:
                module.to(self.device)
        if self._frozen is not None:
            self._frozen.to(self.device)
        return self

    @property
    def frozen_expert(self) -> torch.nn.Module | None:
        """A14B fine-tuning: the high-noise expert, which runs but never trains; None otherwise."""
        two_experts = self.finetune is not None and self.trainable_module is self.transformer_2
        return self.transformer if two_experts else None

    # --- Fine-tuning setup ---------------------------------------------------------------

    @property
    def trainable_module(self) -> torch.nn.Module:
        # A14B: the low-noise expert shapes faces (late steps); the high-noise one stays frozen.
        return self.transformer_2 if self.boundary_ratio is not None and self.transformer_2 is not None else self.transformer

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        if self.finetune is None:
            return []
        return [p for p in self.trainable_module.parameters() if p.requires_grad]

    def setup_finetuning(self, finetune: str | None, rank: int = 16, alpha: float | None = None, targets=DEFAULT_LORA_TARGETS) -> None:
        self.finetune = finetune
        self._frozen = adapters.setup_finetuning(self.trainable_module, finetune, rank, alpha, targets)

    # --- LoRA files ----------------------------------------------------------------------

    def save_lora(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write pytorch_lora_weights.safetensors that `pipe.load_lora_weights(directory)` loads.

        For A14B the file holds the low-noise expert's LoRA: load it with
        `pipe.load_lora_weights(directory, load_into_transformer_2=True)`. state_dict: see
        `lora.save_lora` (FSDP2)."""
        if self.finetune != "lora":
            raise ValueError("save_lora needs a model loaded with finetune='lora'")
        return adapters.save_lora(self.trainable_module, directory, self.pipeline_class, state_dict)

    def load_lora(self, path: str | Path) -> None:
        """Load LoRA weights: into the trained adapter (finetune='lora'), else as a frozen adapter."""
        if self.finetune == "lora":
            adapters.load_into_trained(self.trainable_module, path, self.pipeline_class)
            return
        file = adapters.lora_file(path)
        two_experts = self.trainable_module is self.transformer_2
        if ADAPTER in getattr(self.trainable_module, "peft_config", {}):
            self.trainable_module.delete_adapters(ADAPTER)
        try:
            with warnings.catch_warnings():  # Wan 2.1: diffusers pads the image-attention LoRA with zeros, peft warns
                warnings.filterwarnings("ignore", message="While injecting the PEFT adapters")
                from ipro.models.lora_formats import pipeline_source

                self.pipe.load_lora_weights(pipeline_source(file), adapter_name=ADAPTER, load_into_transformer_2=two_experts)
        except (ValueError, KeyError, RuntimeError) as e:
            raise IproError(f"{file}: not a Wan LoRA this model can load ({str(e).splitlines()[0][:200]})") from None

    def merge_lora(self, transformer: torch.nn.Module, path: str | Path, what: str = "LoRA") -> None:
        """Add a LoRA file's update to `transformer`'s weights (diffusers, ComfyUI/lightx2v, original Wan or musubi)."""
        adapters.merge_lora(transformer, path, self.pipeline_class, what)

    def merge_lightning(self, paths, steps: int = 4, shift: float = 5.0) -> None:
        """Merge distilled few-step LoRA(s) into the base weights and switch to their schedule.

        paths: one file, or one per expert in `transformers` order (A14B: high-noise, low-noise)."""
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        experts = self.transformers
        # A14B's distilled LoRAs are one file per expert: a high-noise file merged into the
        # low-noise expert (or the reverse) gives wrong videos without any error, so never guess.
        if len(paths) != len(experts):
            what = "one file per expert: {high_noise: FILE, low_noise: FILE}" if len(experts) == 2 else "one file"
            raise IproError(f"model.lightning_lora (--lightning): {self.family} needs {what}; got {len(paths)}")
        for transformer, path in zip(experts, paths):
            self.merge_lora(transformer, path, what="Lightning LoRA")
        self.scheduler = scheduler_with_shift(self.scheduler, shift)
        self.default_steps, self.default_guidance = steps, 1.0
        self.default_sigmas = torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist()  # e.g. t = 1000, 750, 500, 250

    # --- Conditioning --------------------------------------------------------------------

    def _latents_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1, 1).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1, 1).to(like.device, like.dtype)
        return mean, inv_std

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [0, 1] -> normalized latents (the VAE posterior's mode)."""
        z = self.vae.encode((video * 2 - 1).to(self.vae.dtype)).latent_dist.mode().float()
        mean, inv_std = self._latents_stats(z)
        return (z - mean) * inv_std

    def prepare_condition(self, images, prompts, num_frames, height, width, negative_prompt: str | None = "") -> Condition:
        self.check_shape(num_frames, height, width)
        b = images.shape[0]
        prompts = batch_prompts(prompts, b)
        images = images.to(self.device, torch.float32)
        image_embeds = self.encode_clip(images) if self.uses_clip else None  # CLIP resizes on its own
        if tuple(images.shape[-2:]) != (height, width):
            images = F.interpolate(images, size=(height, width), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        _, _, f, h, w = self.latent_shape(b, num_frames, height, width)
        cond = Condition(
            prompt_embeds=self.encode_prompts(prompts),
            negative_prompt_embeds=self.encode_prompts([negative_prompt] * b) if negative_prompt is not None else None,
            num_frames=num_frames,
            height=height,
            width=width,
            image_embeds=image_embeds,
        )
        if self.expand_timesteps:
            cond.image_latents = self.encode_video(images[:, :, None])  # (B, C, 1, h, w)
            cond.first_frame_mask = torch.ones(1, 1, f, h, w, device=self.device)
            cond.first_frame_mask[:, :, 0] = 0
        else:
            # The image followed by gray frames (0 in the VAE's [-1, 1] input), encoded as one video;
            # the 4-channel mask marks which of the 4 pixel frames in each latent frame are given.
            gray = images.new_full((b, 3, num_frames - 1, height, width), 0.5)
            video = torch.cat([images[:, :, None], gray], dim=2)
            mask = torch.zeros(b, self.scale_factor_temporal, f, h, w, device=self.device)
            mask[:, :, 0] = 1
            cond.image_latents = torch.cat([mask, self.encode_video(video)], dim=1)
        return cond

    # --- Denoising -----------------------------------------------------------------------

    def impose_first_frame(self, x: torch.Tensor, cond: Condition) -> torch.Tensor:
        if not self.expand_timesteps:
            return x
        m = cond.first_frame_mask
        return (1 - m) * cond.image_latents + m * x

    def generated_mask(self, cond: Condition) -> torch.Tensor | None:
        return cond.first_frame_mask if self.expand_timesteps else None

    def trained_at(self, t) -> bool:
        """A14B: only the trained expert's steps (t below the boundary for the low-noise one)."""
        if self.boundary_ratio is None or self.transformer_2 is None:
            return True
        high = bool((torch.as_tensor(t) >= self.boundary_ratio * self.num_train_timesteps).all())
        return high == (self.trainable_module is self.transformer)

    def _expert(self, high_noise: bool) -> torch.nn.Module:
        module = self.transformer if (self.boundary_ratio is None or high_noise) else self.transformer_2
        if self._use_base and self._frozen is not None and module is self.trainable_module:
            return self._frozen
        return self.forward_module(module)

    def _forward(self, transformer, x: torch.Tensor, t: torch.Tensor, cond: Condition, text: torch.Tensor) -> torch.Tensor:
        if self.expand_timesteps:
            model_input = self.impose_first_frame(x, cond)
            # One timestep per token: the imposed first frame is clean (t = 0).
            m = cond.first_frame_mask[0, 0, :, :: self.patch_size[1], :: self.patch_size[2]].flatten()
            timestep = m[None] * t[:, None]
        else:
            model_input = torch.cat([x, cond.image_latents], dim=1)
            timestep = t
        out = transformer(
            # (ModelMixin.dtype walks every parameter; one weight's dtype is free)
            hidden_states=model_input.to(getattr(transformer, "module", transformer).patch_embedding.weight.dtype),
            timestep=timestep,
            encoder_hidden_states=text,
            encoder_hidden_states_image=cond.image_embeds,
            return_dict=False,
        )[0]
        return out.float()

    def _guided(self, transformer, x, t, cond: Condition, guidance_scale: float) -> torch.Tensor:
        v = self._forward(transformer, x, t, cond, cond.prompt_embeds)
        if guidance_scale > 1.0:
            if cond.negative_prompt_embeds is None:
                raise ValueError("guidance_scale > 1 needs a condition prepared with a negative_prompt")
            v_uncond = self._forward(transformer, x, t, cond, cond.negative_prompt_embeds)
            v = v_uncond + guidance_scale * (v - v_uncond)
        return v

    def velocity(self, x_t, t, cond: Condition, guidance_scale: float = 1.0) -> torch.Tensor:
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(b) if t.ndim == 0 else t
        if self.boundary_ratio is None:
            return self._guided(self._expert(True), x_t, t, cond, guidance_scale)
        high = t >= self.boundary_ratio * self.num_train_timesteps
        if high.all() or not high.any():
            return self._guided(self._expert(bool(high[0])), x_t, t, cond, guidance_scale)
        v = torch.zeros_like(x_t, dtype=torch.float32)  # a batch straddling the boundary: one call per expert
        v[high] = self._guided(self._expert(True), x_t[high], t[high], cond.select(high), guidance_scale)
        v[~high] = self._guided(self._expert(False), x_t[~high], t[~high], cond.select(~high), guidance_scale)
        return v

    @contextmanager
    def base_weights(self) -> Iterator[None]:
        if self.finetune == "lora":
            module = self.trainable_module
            module.disable_adapters()  # base weights bit for bit, no second copy
            try:
                yield
            finally:
                module.enable_adapters()
        elif self.finetune == "full":
            self._use_base = True
            try:
                yield
            finally:
                self._use_base = False
        else:
            yield

    # --- Decoding ------------------------------------------------------------------------

    def decode(self, latents: torch.Tensor, frames: list[int] | None = None) -> torch.Tensor:
        """Latents -> (B, F, 3, H, W) in [0, 1], with gradient w.r.t. the latents (VAE frozen).

        frames: only return these output frames. The Wan VAE is causal in time, so latent frames
        after latent_frame_of(max(frames)) are not decoded: asking for early frames is cheap, the
        last frame costs a full decode. Under autograd each latent frame (and spatial tile, see
        `decode_tile`) is one checkpointed node (`ipro.models.vae_decode`), so backward keeps the
        causal cache, not every activation of every frame.
        """
        from ipro.models.vae_decode import decode_wan_vae

        z = latents.to(self.vae.dtype)
        mean, inv_std = self._latents_stats(z)
        video = decode_wan_vae(self.vae, z / inv_std + mean, frames, tile=self.decode_tile)  # (B, 3, F, H, W) in [-1, 1]
        return (video.float() / 2 + 0.5).clamp(0, 1).transpose(1, 2)


def _listed(model_index: dict, name: str) -> bool:
    spec = model_index.get(name)
    return isinstance(spec, list) and bool(spec) and spec[0] is not None


@register_family
class Wan21I2V(WanModel):
    """Wan 2.1 I2V 14B (480p/720p): mask + image latent on channels, CLIP tokens in cross-attention."""

    family = "wan2.1-i2v"
    fps = 16.0

    @classmethod
    def matches(cls, model_index, transformer_config):
        return (
            not model_index.get("expand_timesteps")
            and not _listed(model_index, "transformer_2")
            and transformer_config.get("in_channels") == 36
        )


@register_family
class Wan22TI2V(WanModel):
    """Wan 2.2 TI2V-5B: first-frame latent imposed every step, 48-channel latents, VAE x16."""

    family = "wan2.2-ti2v"
    fps = 24.0
    scale_factor_spatial = 16
    latent_channels = 48
    default_steps = 50

    @classmethod
    def matches(cls, model_index, transformer_config):
        return bool(model_index.get("expand_timesteps")) and not _listed(model_index, "transformer_2")


@register_family
class Wan22I2VA14B(WanModel):
    """Wan 2.2 I2V-A14B: two 14B experts split at boundary_ratio; the low-noise one trains."""

    family = "wan2.2-i2v-a14b"
    fps = 16.0
    default_steps = 40

    @classmethod
    def matches(cls, model_index, transformer_config):
        return (
            _listed(model_index, "transformer_2")
            and model_index.get("boundary_ratio") is not None
            and transformer_config.get("in_channels") == 36
        )
