"""`pixel-i2v`: a small Wan transformer that works on pixels, the project's own CPU base model.

The committed weights (`ipro/assets/base-model`, trained by `method: pretrain`; its card
gives their recipe, `configs/base-model.yaml` holds the current one) use this family. It is a real diffusers `WanTransformer3DModel`, driven like Wan 2.2 TI2V,
but with no VAE: the "latent" is the video itself.

- Latent space: pixels in [-1, 1], with each group of 4 frames stacked on the channels
  (12 channels), like the Wan VAE's 4x temporal packing, so videos have 4k+1 frames.
  Latent frame 0 is the first frame repeated 4 times. Encoding and decoding are exact
  reshapes: no weights, and decode passes gradients straight to the pixels.
- The transformer patchifies 8x8 pixels x 4 frames per token (patch_size (1, 8, 8) on
  12 channels), so a 128x160x9 video is 960 tokens.
- First frame: imposed before every step with per-token timesteps (its tokens get t = 0),
  as Wan 2.2 TI2V does.
- Prediction: a token holds 768 values but the transformer's width is far smaller, so it
  cannot output a full-rank velocity (noise outside its output subspace would never be
  removed). It predicts the clean video as the first frame plus a change:
  x0 = first_frame + transformer(x_t, t), and the velocity follows as (x_t - x0) / sigma.
  Fine detail of later frames therefore comes from the first frame; the model adds
  motion and change at the coarseness its width allows, which is why faces drift.
- Schedule: shift_terminal 0.2, so the last model call (which makes the video) is at sigma
  0.2, not ~0 where v and the multi-step KL on v would blow up.
- No text conditioning: prompts are accepted and ignored (a fixed all-zero text token), so
  classifier-free guidance has no effect and is skipped.
- Overlapping output (a transformer with 4 x 12 output channels, as the committed model has;
  with 12, each token writes its own 8x8 patch): each token writes a 16x16 patch centred on its 8x8 one, weighted by a tent window
  that sums to 1 across neighbours, so no token boundary is a step in the picture and the
  8-pixel grid has nothing to show (`overlap_add`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ipro.errors import IproError
from ipro.models.base import Condition, VideoModel, loading_components, quiet_loading
from ipro.models.registry import read_model_index, register_family
from ipro.models import lora as adapters
from ipro.models.lora import DEFAULT_LORA_TARGETS

PIPELINE_NAME = "IproPixelI2VPipeline"  # model_index.json's _class_name; how the family is detected
FRAMES_PER_LATENT = 4
CHANNELS = 3 * FRAMES_PER_LATENT
PATCH = (1, 8, 8)
TEXT_DIM = 16
# The schedule's last step starts at sigma = 0.2 instead of ~0. An x0-predicting model makes
# its final video at its last call, so a call at sigma ~ 0 would be the one that decides the
# output while v = (x_t - x0) / sigma (and the multi-step KL on v) blows up there.
SHIFT_TERMINAL = 0.2
OVERLAP_QUADRANTS = 4  # an overlapping token's 16x16 patch is 2 x 2 of its 8x8 ones

# The committed base model (see its MODEL_CARD.md).
BUILTIN_PATH = Path(__file__).resolve().parent.parent / "assets" / "base-model"


def default_transformer_config(dim: int = 192, layers: int = 4, heads: int = 6, ffn: int = 768, overlap: bool = False) -> dict:
    """WanTransformer3DModel arguments; the committed model's are the defaults with overlap=True. overlap: each
    token outputs a 16x16 patch (4 x 12 channels per pixel of its 8x8 one), see `overlap_add`."""
    return dict(
        patch_size=PATCH,
        num_attention_heads=heads,
        attention_head_dim=dim // heads,
        in_channels=CHANNELS,
        out_channels=CHANNELS * OVERLAP_QUADRANTS if overlap else CHANNELS,
        text_dim=TEXT_DIM,
        freq_dim=64,
        ffn_dim=ffn,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=256,
    )


class PatchEmbedding(torch.nn.Conv3d):
    """The transformer's patch Conv3d (kernel = stride) computed as a matmul over patches.

    Same parameters and state-dict keys. Why: torch 2.13's CPU bfloat16 conv3d returns wrong
    values for this shape (12 channels, 8x8 kernel: relative error ~1.2 under autocast),
    which silently breaks bf16 training and inference on CPU; a matmul is exact.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        pt, ph, pw = self.kernel_size
        patches = x.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4)
        out = F.linear(patches, self.weight.flatten(1), self.bias)  # (B, F', H', W', dim)
        return out.permute(0, 4, 1, 2, 3)


def _tent(size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis of `size` pixels: the window weight of the first and second half of each
    token's 16-pixel patch at every pixel (w(k) + w(k + 8) = 1: a partition of unity)."""
    p = PATCH[1]
    k = torch.arange(p, device=device, dtype=torch.float32)
    first, second = (k + 0.5) / p, (p - k - 0.5) / p
    return first.repeat(size // p), second.repeat(size // p)


def _shift(x: torch.Tensor, by: int, dim: int) -> torch.Tensor:
    """x moved `by` pixels along `dim` (out[i] = x[i - by]), zeros shifted in."""
    n = x.shape[dim]
    out = torch.zeros_like(x)
    if by >= 0:
        out.narrow(dim, by, n - by).copy_(x.narrow(dim, 0, n - by))
    else:
        out.narrow(dim, 0, n + by).copy_(x.narrow(dim, -by, n + by))
    return out


def overlap_add(raw: torch.Tensor) -> torch.Tensor:
    """(B, 4 x 12, N, H, W) -> (B, 12, N, H, W): the transformer's per-token 16x16 patches, each
    centred on its token's 8x8 patch (4 pixels beyond each side), tent-weighted and summed.

    raw's channels are (row half, column half, 12): at a pixel of token (i, j)'s 8x8 patch, half
    (a, b) is the patch's pixel 8a + y, 8b + x, which lies 8a - 4 rows and 8b - 4 columns away.
    Within 4 pixels of the border, where a neighbour is missing, the weights are renormalised."""
    b, c, n, h, w = raw.shape
    half = PATCH[1] // 2
    raw = raw.float().reshape(b, 2, 2, CHANNELS, n, h, w)
    wy, wx = _tent(h, raw.device), _tent(w, raw.device)
    out = raw.new_zeros(b, CHANNELS, n, h, w)
    norm_y, norm_x = raw.new_zeros(h), raw.new_zeros(w)
    for a in range(2):
        norm_y += _shift(wy[a], (2 * a - 1) * half, 0)
        norm_x += _shift(wx[a], (2 * a - 1) * half, 0)
        for bb in range(2):
            part = raw[:, a, bb] * wy[a][:, None] * wx[bb]
            out = out + _shift(_shift(part, (2 * a - 1) * half, -2), (2 * bb - 1) * half, -1)
    return out / (norm_y[:, None] * norm_x)


def pack(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [0, 1] with F = 4k+1 -> (B, 12, k+1, H, W) in [-1, 1]."""
    b, c, f, h, w = video.shape
    if (f - 1) % FRAMES_PER_LATENT:
        raise ValueError(f"pack needs 4k+1 frames, got {f}")
    x = video * 2 - 1
    first = x[:, :, :1].expand(b, c, FRAMES_PER_LATENT, h, w)  # frame 0 fills its own latent frame
    x = torch.cat([first, x[:, :, 1:]], dim=2)  # (B, 3, 4(k+1), H, W)
    x = x.reshape(b, c, -1, FRAMES_PER_LATENT, h, w).permute(0, 3, 1, 2, 4, 5)  # (B, 4, 3, k+1, H, W)
    return x.reshape(b, CHANNELS, -1, h, w)


def unpack(latents: torch.Tensor) -> torch.Tensor:
    """(B, 12, k+1, H, W) -> (B, 4k+1, 3, H, W) in [0, 1] (latent frame 0's copies averaged)."""
    b, _, n, h, w = latents.shape
    x = latents.reshape(b, FRAMES_PER_LATENT, 3, n, h, w).permute(0, 3, 1, 2, 4, 5)  # (B, k+1, 4, 3, H, W)
    video = torch.cat([x[:, :1].mean(2), x[:, 1:].flatten(1, 2)], dim=1)
    return (video / 2 + 0.5).clamp(0, 1)


def _pipeline_class():
    """The pipeline whose LoRA format (diffusers' Wan layout) this family reads and writes."""
    from diffusers import WanImageToVideoPipeline

    return WanImageToVideoPipeline


@register_family
class PixelI2V(VideoModel):
    """Pixel-space Wan transformer with first-frame residual prediction (see the module docstring)."""

    family = "pixel-i2v"
    fps = 15.0  # trained on 30 fps footage taken every 1-3 frames (2 on average)
    scale_factor_temporal = FRAMES_PER_LATENT
    scale_factor_spatial = 1
    patch_size = PATCH
    latent_channels = CHANNELS
    default_steps = 4  # measured: 4 steps keep faces detectable more often than 8 (see MODEL_CARD.md)
    default_guidance = 1.0
    default_num_frames = 9  # what it was trained at
    default_area = 128 * 160

    # --- Loading and saving ----------------------------------------------------------------

    @classmethod
    def matches(cls, model_index, transformer_config):
        return model_index.get("_class_name") == PIPELINE_NAME

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
        lightning=None,
        gradient_checkpointing: bool = False,
        **_ignored,  # VAE options of other families (decode_tile, vae_dtype): there is no VAE
    ) -> "PixelI2V":
        from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

        path = Path(path)
        read_model_index(path)
        if lightning is not None:
            raise IproError(f"{cls.family}: has no distilled Lightning LoRA; drop --lightning / model.lightning_lora")
        with loading_components(path):
            transformer = WanTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype or torch.float32)
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        if (path / "refiner").is_dir():
            raise IproError(f"{path}: has a refiner/ folder, which ipro no longer reads (the overlapping output replaced it); retrain "
                            "with configs/base-model.yaml or use a model without one")
        model = cls(transformer, scheduler)
        model.start_finetuning(finetune, lora, rank=lora_rank, alpha=lora_alpha, targets=lora_targets)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        return model.to(device)

    @classmethod
    def from_config(cls, shift: float = 2.0, **transformer_options) -> "PixelI2V":
        """A new model with random weights (training from scratch); overlap=True: the overlapping output."""
        from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

        transformer = WanTransformer3DModel(**default_transformer_config(**transformer_options))
        return cls(transformer, FlowMatchEulerDiscreteScheduler(shift=shift, shift_terminal=SHIFT_TERMINAL))

    def save_pretrained(self, path: str | Path) -> Path:
        """Write model_index.json, transformer/ (safetensors) and scheduler/ under `path`."""
        import diffusers

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with quiet_loading():
            self.transformer.save_pretrained(path / "transformer", safe_serialization=True)
            self.scheduler.save_pretrained(path / "scheduler")
        index = {
            "_class_name": PIPELINE_NAME,
            "_diffusers_version": diffusers.__version__,
            "ipro_family": self.family,
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "transformer": ["diffusers", type(self.transformer).__name__],
        }
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        return path

    def __init__(self, transformer, scheduler):
        config = transformer.config
        outs = (CHANNELS, CHANNELS * OVERLAP_QUADRANTS)
        if tuple(config.patch_size) != PATCH or config.in_channels != CHANNELS or config.out_channels not in outs:
            raise IproError(
                f"{self.family}: the transformer has patch_size={tuple(config.patch_size)}, in/out channels "
                f"{config.in_channels}/{config.out_channels}; the family expects {PATCH}, {CHANNELS} in and {outs[0]} "
                f"or {outs[1]} (overlapping) out"
            )
        self.overlap = config.out_channels != CHANNELS
        transformer.patch_embedding.__class__ = PatchEmbedding  # a forward that is right in bf16 (see its docstring)
        self.transformer = transformer.requires_grad_(False)
        self.scheduler = scheduler
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.device = transformer.device
        self.finetune: str | None = None
        self._frozen: torch.nn.Module | None = None  # full fine-tuning: the weights before training
        self._use_base = False

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.patch_embedding.weight.dtype

    def to(self, device) -> "PixelI2V":
        self.device = torch.device(device)
        self.transformer.to(self.device)
        if self._frozen is not None:
            self._frozen.to(self.device)
        return self

    # --- Fine-tuning -----------------------------------------------------------------------

    @property
    def trainable_module(self) -> torch.nn.Module:
        return self.transformer

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        if self.finetune is None:
            return []
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def setup_finetuning(self, finetune: str | None, rank: int = 16, alpha: float | None = None, targets=DEFAULT_LORA_TARGETS) -> None:
        self.finetune = finetune
        self._frozen = adapters.setup_finetuning(self.transformer, finetune, rank, alpha, targets)

    def save_lora(self, directory: str | Path) -> Path:
        """Write pytorch_lora_weights.safetensors in diffusers' Wan LoRA format."""
        if self.finetune != "lora":
            raise ValueError("save_lora needs a model loaded with finetune='lora'")
        return adapters.save_lora(self.transformer, directory, _pipeline_class())

    def merge_lora(self, transformer: torch.nn.Module, path: str | Path, what: str = "LoRA") -> None:
        adapters.merge_lora(transformer, path, _pipeline_class(), what)

    def load_lora(self, path: str | Path) -> None:
        """Load LoRA weights: into the trained adapter (finetune='lora'), else as a frozen adapter."""
        if self.finetune == "lora":
            adapters.load_into_trained(self.transformer, path, _pipeline_class())
        else:
            adapters.load_frozen(self.transformer, path, _pipeline_class())

    @contextmanager
    def base_weights(self) -> Iterator[None]:
        if self.finetune == "lora":
            self.transformer.disable_adapters()  # the base weights bit for bit, no second copy
            try:
                yield
            finally:
                self.transformer.enable_adapters()
        elif self.finetune == "full":
            self._use_base = True
            try:
                yield
            finally:
                self._use_base = False
        else:
            yield

    # --- Conditioning ----------------------------------------------------------------------

    def prepare_condition(self, images, prompts, num_frames, height, width, negative_prompt: str | None = "") -> Condition:
        self.check_shape(num_frames, height, width)
        b = images.shape[0]
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) not in (1, b):
            raise ValueError(f"got {b} images but {len(prompts)} prompts")
        images = images.to(self.device, torch.float32)
        if tuple(images.shape[-2:]) != (height, width):
            images = F.interpolate(images, size=(height, width), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        _, _, f, h, w = self.latent_shape(b, num_frames, height, width)
        no_text = torch.zeros(b, 1, self.transformer.config.text_dim, device=self.device, dtype=self.dtype)
        mask = torch.ones(1, 1, f, h, w, device=self.device)
        mask[:, :, 0] = 0
        return Condition(
            prompt_embeds=no_text,
            negative_prompt_embeds=no_text if negative_prompt is not None else None,
            num_frames=num_frames,
            height=height,
            width=width,
            image_latents=pack(images[:, :, None]),  # (B, 12, 1, H, W)
            first_frame_mask=mask,
        )

    def impose_first_frame(self, x: torch.Tensor, cond: Condition) -> torch.Tensor:
        m = cond.first_frame_mask
        return (1 - m) * cond.image_latents + m * x

    def generated_mask(self, cond: Condition) -> torch.Tensor:
        return cond.first_frame_mask

    # --- Denoising -------------------------------------------------------------------------

    def predict_x0(self, x_t: torch.Tensor, t, cond: Condition) -> torch.Tensor:
        """The clean-video prediction: the first frame plus the transformer's change."""
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        t = t.expand(b) if t.ndim == 0 else t
        x_in = self.impose_first_frame(x_t, cond)
        # One timestep per token: the imposed first frame is clean (t = 0).
        m = cond.first_frame_mask[0, 0, :, :: PATCH[1], :: PATCH[2]].flatten()
        base = self._use_base and self._frozen is not None
        module = self._frozen if base else self.forward_module(self.trainable_module)
        change = module(
            hidden_states=x_in.to(self.dtype),
            timestep=m[None] * t[:, None],
            encoder_hidden_states=cond.prompt_embeds.to(self.dtype),
            return_dict=False,
        )[0]
        change = overlap_add(change) if self.overlap else change
        return cond.image_latents + change.float()

    def velocity(self, x_t, t, cond: Condition, guidance_scale: float = 1.0) -> torch.Tensor:
        """v = (x_t - x0) / sigma. guidance_scale is ignored: with no text, CFG changes nothing."""
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        t = t.expand(b) if t.ndim == 0 else t
        sigma = (t / self.num_train_timesteps).clamp_min(1e-4).view(-1, 1, 1, 1, 1)
        return (self.impose_first_frame(x_t, cond) - self.predict_x0(x_t, t, cond)) / sigma

    # --- Pixels ----------------------------------------------------------------------------

    def decode(self, latents: torch.Tensor, frames: list[int] | None = None) -> torch.Tensor:
        """Latents -> (B, F, 3, H, W) in [0, 1]: an exact reshape, differentiable w.r.t. the latents."""
        video = unpack(latents.float())
        if frames is not None:
            frames = list(frames)
            if not frames or min(frames) < 0 or max(frames) >= video.shape[1]:
                raise ValueError(f"frames must be in [0, {video.shape[1]}), got {frames}")
            video = video[:, frames]
        return video

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [0, 1] -> latents (B, 12, (F-1)/4+1, H, W)."""
        return pack(video.float().to(self.device))
