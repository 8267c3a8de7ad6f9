"""The one interface trainers, samplers and `ipro generate` use to drive a video model.

A model family (Wan 2.1 I2V, Wan 2.2 TI2V, ...) is one subclass of `VideoModel` in one file,
registered with `@register_family`. Everything above this layer (sampling, IPRO, GRPO,
generation) only calls the methods below, so a new family never touches a trainer.

Conventions
- Latents are (B, C, F, h, w) float32 in the normalized space the transformer sees.
- `t` is the scheduler's timestep in [0, num_train_timesteps] (what the transformer is fed);
  `sigma` = t / num_train_timesteps is the flow-matching noise level:
  x_t = sigma * noise + (1 - sigma) * x0 and the model predicts v = noise - x0.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from ipro.errors import IproError


@dataclass
class Condition:
    """Everything a model needs besides x_t and t, for a batch of B videos.

    Tensor fields have the batch first. Which optional fields are set depends on the family
    (Wan 2.1 uses CLIP `image_embeds`; Wan 2.2 TI2V uses `first_frame_mask`; VACE uses
    `control_latents` and `num_subject_frames`).
    """

    prompt_embeds: torch.Tensor  # (B, L, D) text encoder output
    num_frames: int
    height: int
    width: int
    negative_prompt_embeds: torch.Tensor | None = None  # (B, L, D), for classifier-free guidance
    image_latents: torch.Tensor | None = None  # family-specific latent-space image conditioning
    image_embeds: torch.Tensor | None = None  # (B, N, D_img) image encoder tokens
    first_frame_mask: torch.Tensor | None = None  # (1, 1, F, h, w): 0 where the image latent is imposed
    control_latents: torch.Tensor | None = None  # (B, C_ctrl, R + F, h, w) VACE control video + subject latents
    num_subject_frames: int | None = None  # R leading latent frames that hold subject images (VACE)

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> "Condition":
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # first_frame_mask is shared by the batch (leading dim 1), so it is left alone.
            out[f.name] = fn(value) if torch.is_tensor(value) and f.name != "first_frame_mask" else value
        return Condition(**out)

    def repeat_interleave(self, n: int) -> "Condition":
        """Each video's condition n times in a row (a GRPO group per prompt)."""
        return self._map(lambda x: x.repeat_interleave(n, dim=0))

    def select(self, index) -> "Condition":
        """A sub-batch: an int, slice, list or bool mask over the batch."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda x: x[index])

    def to(self, device) -> "Condition":
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if torch.is_tensor(getattr(self, f.name))
            },
        )


class VideoModel:
    """An image-to-video flow-matching model with its text/image encoders, VAE and scheduler.

    Subclasses set the class attributes and implement the methods that raise NotImplementedError.
    """

    family: str = ""  # registry name, e.g. "wan2.1-i2v"
    fps: float = 16.0  # frame rate the family was trained at; used when writing videos
    num_train_timesteps: int = 1000
    # The latent geometry is fixed per family (a checkpoint that disagrees is refused at load).
    scale_factor_temporal: int = 4  # pixel frames per latent frame (after the first)
    scale_factor_spatial: int = 8  # pixels per latent pixel
    patch_size: tuple[int, int, int] = (1, 2, 2)  # transformer patching (t, h, w) of latents
    latent_channels: int = 16

    # Sampling defaults; a distilled ("Lightning") LoRA changes them to its few-step schedule.
    default_steps: int = 50
    default_guidance: float = 5.0
    default_sigmas: list[float] | None = None  # unshifted custom sigmas (the scheduler shifts them)
    # Video size `ipro generate` uses when none is given: frames, and pixels per frame (the
    # input's aspect ratio is kept). Wan's 480p, 5 s at 16 fps.
    default_num_frames: int = 81
    default_area: int = 480 * 832

    # Subject-to-video families (Wan VACE, Phantom) take subject images of the people besides
    # the first frame; how many per video is fixed when the model is loaded.
    takes_subject_images: bool = False
    num_subject_images: int = 0

    device: torch.device = torch.device("cpu")
    scheduler = None  # a diffusers scheduler; samplers read its sigmas and timesteps

    # --- Registry ------------------------------------------------------------------------

    @classmethod
    def matches(cls, model_index: dict, transformer_config: dict) -> bool:
        """Whether a diffusers folder with this model_index.json / transformer config is this family."""
        return False

    @classmethod
    def from_pretrained(cls, path: str | Path, **options) -> "VideoModel":
        raise NotImplementedError

    # --- Shapes (class-level: checkable before loading weights) -------------------------

    @classmethod
    def pixel_multiple(cls) -> int:
        """Height and width must be multiples of this (VAE downsampling x transformer patching)."""
        return cls.scale_factor_spatial * max(cls.patch_size[1], cls.patch_size[2])

    @classmethod
    def check_shape(cls, num_frames: int, height: int, width: int) -> None:
        """Raise an IproError unless the video shape is one this family can generate."""
        s, m = cls.scale_factor_temporal, cls.pixel_multiple()
        if num_frames < 1 or (num_frames - 1) % s != 0:
            lo = max(1, (num_frames - 1) // s * s + 1)
            raise IproError(
                f"num_frames={num_frames}: {cls.family} needs {s}k+1 frames (the VAE packs {s} frames per latent); "
                f"use {lo} or {lo + s}"
            )
        for name, value in (("height", height), ("width", width)):
            if value < m or value % m != 0:
                near = max(m, value // m * m)
                raise IproError(
                    f"{name}={value}: {cls.family} needs a multiple of {m} "
                    f"(VAE x{cls.scale_factor_spatial} times patch {cls.patch_size[1]}); use {near}"
                )

    @classmethod
    def latent_shape(cls, batch_size: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        cls.check_shape(num_frames, height, width)
        return (
            batch_size,
            cls.latent_channels,
            (num_frames - 1) // cls.scale_factor_temporal + 1,
            height // cls.scale_factor_spatial,
            width // cls.scale_factor_spatial,
        )

    @classmethod
    def latent_frame_of(cls, frame: int) -> int:
        """The latent frame that decodes to output frame `frame` (frame 0 has its own latent)."""
        return 0 if frame == 0 else (frame - 1) // cls.scale_factor_temporal + 1

    # --- Conditioning and denoising ------------------------------------------------------

    def prepare_condition(
        self,
        images: torch.Tensor,
        prompts: list[str],
        num_frames: int,
        height: int,
        width: int,
        negative_prompt: str | None = "",
    ) -> Condition:
        """Encode first frames (B, 3, H, W) float in [0, 1] and B prompts (text embeddings are cached).

        Families with `takes_subject_images` also take `subject_images=` (B, R, 3, h, w)."""
        raise NotImplementedError

    def velocity(self, x_t: torch.Tensor, t, cond: Condition, guidance_scale: float = 1.0) -> torch.Tensor:
        """v(x_t, t) with the current (trainable) weights, float32 like x_t. CFG when guidance_scale > 1."""
        raise NotImplementedError

    @torch.no_grad()
    def base_velocity(self, x_t: torch.Tensor, t, cond: Condition, guidance_scale: float = 1.0) -> torch.Tensor:
        """v(x_t, t) of the base model (the model before fine-tuning, the KL anchor), without gradient."""
        with self.base_weights():
            return self.velocity(x_t, t, cond, guidance_scale)

    @contextmanager
    def base_weights(self) -> Iterator[None]:
        """Inside this block `velocity` uses the base model's weights (before fine-tuning)."""
        yield

    def trained_at(self, t) -> bool:
        """Whether the trainable weights act at timestep t (False on a frozen expert's steps,
        which the KL and the GRPO update leave out)."""
        return True

    def impose_first_frame(self, x: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Overwrite the latents that are given rather than generated (identity for most families)."""
        return x

    def generated_mask(self, cond: Condition) -> torch.Tensor | None:
        """1 where latents are generated and 0 where `impose_first_frame` overwrites them; None if nowhere."""
        return None

    def decode(self, latents: torch.Tensor, frames: list[int] | None = None) -> torch.Tensor:
        """Latents -> video (B, F, 3, H, W) float in [0, 1], differentiable w.r.t. the latents."""
        raise NotImplementedError

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Video (B, 3, F, H, W) in [0, 1] -> normalized latents, without gradient (SFT targets)."""
        raise NotImplementedError

    def release_encoders(self, prompts: list[str], images=()) -> None:
        """Encode these prompts and first frames (3, H, W) once and keep the results on the CPU,
        then take the text/image encoders off the accelerator (a trainer calls this once its
        dataset is known). Families without such encoders do nothing."""

    # --- Training ------------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return []

    @property
    def trainable_module(self) -> torch.nn.Module | None:
        """The module whose parameters train (wrap this one with DDP/FSDP), or None."""
        return None

    # Parallelism is applied from outside: a trainer hands `wrap_trainable` accelerate's
    # `prepare_model` (DDP), and the family's forward then goes through the wrapper, which
    # is what makes DDP all-reduce the gradients.
    _wrapped: torch.nn.Module | None = None

    def wrap_trainable(self, wrap) -> None:
        self._wrapped = wrap(self.trainable_module)

    def forward_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """The callable to run `module` through: its parallel wrapper if it has one."""
        return self._wrapped if self._wrapped is not None and module is self.trainable_module else module

    @contextmanager
    def no_sync(self, skip: bool = True) -> Iterator[None]:
        """Inside, DDP does not all-reduce gradients (the first micro-batches of an accumulation)."""
        if skip and hasattr(self._wrapped, "no_sync"):
            with self._wrapped.no_sync():
                yield
        else:
            yield

    def setup_finetuning(self, finetune: str | None, rank: int = 16, alpha: float | None = None, targets=()) -> None:
        raise NotImplementedError

    def merge_lora(self, transformer: torch.nn.Module, path: str | Path, what: str = "LoRA") -> None:
        raise NotImplementedError

    def start_finetuning(self, finetune: str | None, lora: str | Path | None = None, rank: int = 16,
                         alpha: float | None = None, targets=()) -> None:
        """What `from_pretrained` does for every family: full fine-tuning starts from the base
        weights with `lora` merged in; LoRA fine-tuning starts its adapter from `lora` (resume,
        init_lora) or from zero; inference (None) loads `lora` as a frozen adapter."""
        if finetune not in (None, "lora", "full"):
            raise IproError(f"finetune={finetune!r}: use 'lora', 'full' or None")
        if lora is not None and finetune == "full":
            self.merge_lora(self.trainable_module, lora)
        self.setup_finetuning(finetune, rank=rank, alpha=alpha, targets=targets)
        if lora is not None and finetune != "full":
            self.load_lora(lora)

    def save_lora(self, directory: str | Path) -> Path:
        raise NotImplementedError

    def load_lora(self, path: str | Path) -> None:
        raise NotImplementedError

    def to(self, device) -> "VideoModel":
        raise NotImplementedError


def batch_prompts(prompts: str | list[str], batch_size: int) -> list[str]:
    """One prompt per video: a single prompt serves the whole batch; any other count must match."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) == 1 and batch_size > 1:
        prompts = prompts * batch_size
    if len(prompts) != batch_size:
        raise ValueError(f"got {batch_size} images but {len(prompts)} prompts")
    return prompts


def subjects_per_video(subject_images, batch_size: int, count: int) -> list:
    """Subject-to-video families: `count` subject images for each of `batch_size` videos, from
    B sequences of (3, h, w) images or a (B, R, 3, h, w) tensor; one video's subjects may serve
    the whole batch. One-line IproErrors otherwise."""
    subjects = [] if subject_images is None else list(subject_images)
    if len(subjects) == 1 and batch_size > 1:
        subjects = subjects * batch_size
    if subjects and len(subjects) != batch_size:
        raise IproError(f"subject_images: got subject images for {len(subjects)} videos, but {batch_size} images")
    if any(len(subj) != count for subj in subjects) or (count > 0 and not subjects):
        got = sorted({len(subj) for subj in subjects}) if subjects else [0]
        raise IproError(
            f"subject_images: got {'/'.join(map(str, got))} per video, but the model was loaded with "
            f"num_subject_images={count}; pass that many per video, or load with num_subject_images=<count>"
        )
    return subjects


def fit_on_white(image: torch.Tensor, height: int, width: int, *, mode: str, antialias: bool, round_size: bool) -> torch.Tensor:
    """(3, h, w) -> (3, height, width): scaled to fit and centred on a canvas of ones (white in
    [0, 1] and in [-1, 1]). The resize settings are each family's reference pipeline's."""
    image = image[None]
    scale = min(height / image.shape[-2], width / image.shape[-1])
    size = [round(n * scale) if round_size else int(n * scale) for n in image.shape[-2:]]
    new_h, new_w = max(1, size[0]), max(1, size[1])
    image = F.interpolate(image, size=(new_h, new_w), mode=mode, antialias=antialias, align_corners=False)[0]
    canvas = image.new_ones(3, height, width)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[:, top : top + new_h, left : left + new_w] = image
    return canvas


def scheduler_with_shift(scheduler, shift: float):
    """A copy of a flow-matching scheduler (FlowMatchEuler or UniPC with flow sigmas) with another shift."""
    key = "flow_shift" if "flow_shift" in scheduler.config else "shift"
    return type(scheduler).from_config(scheduler.config, **{key: shift})


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No progress bars, deprecation or fallback chatter while loading or saving components."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    d_bar, t_bar = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    d_level, t_level = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # diffusers' torch_dtype -> dtype rename
            yield
    finally:
        dlog.set_verbosity(d_level)
        tlog.set_verbosity(t_level)
        if d_bar:
            dlog.enable_progress_bar()
        if t_bar:
            tlog.enable_progress_bar()


@contextmanager
def loading_components(path: Path) -> Iterator[None]:
    """`quiet_loading`, and any error the libraries raise for a broken folder as one line naming it."""
    try:
        with quiet_loading():
            yield
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise IproError(f"{path}: could not load the model ({reason}); re-download or rebuild the folder") from None
