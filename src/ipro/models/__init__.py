"""Video model adapters: one `VideoModel` interface over diffusers checkpoints.

    model = load_model("path/to/Wan2.1-I2V-14B-480P-Diffusers", finetune="lora", dtype=torch.bfloat16, device="cuda")
    cond = model.prepare_condition(images, prompts, num_frames=81, height=480, width=832)
    v = model.velocity(x_t, t, cond)

A new family is one module with a `@register_family` subclass of `VideoModel`, imported in
`ipro.models.loading`.
"""

from ipro.models.base import Condition, VideoModel
from ipro.models.loading import load_model, resolve_model_path  # imports (and so registers) every family
from ipro.models.registry import FAMILIES, detect_family, register_family
from ipro.models.tiny import TINY_FAMILIES, TINY_SUBJECT_FAMILIES, build_tiny

__all__ = [
    "FAMILIES",
    "TINY_FAMILIES",
    "TINY_SUBJECT_FAMILIES",
    "Condition",
    "VideoModel",
    "build_tiny",
    "detect_family",
    "load_model",
    "register_family",
    "resolve_model_path",
]
