"""Build a model from its config JSONs on the `meta` device: real classes, real shapes, no weights.

Inside `meta_loading()`, diffusers' and transformers' `from_pretrained` read only the
component's config.json and build the module on `meta` (cast to the requested dtype, with
diffusers' keep-in-float32 modules kept in float32), and a diffusers pipeline is assembled
from its model_index.json the same way (no tokenizer or image processor: planning never
tokenizes). Everything above that (`ipro.train.trainer.load_for_training`, the family's own
`from_pretrained`, LoRA setup, gradient checkpointing) runs unchanged, so the planner sees
the model training would build.

Real-size configs of the public Wan checkpoints ship in `ipro/assets/wan-configs/<arch>/`
(see its README) for when the checkpoint folder is not on this machine.
"""

from __future__ import annotations

import importlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ipro.errors import IproError

CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "wan-configs"
# Substrings of a checkpoint folder's name (lower case) that say which shipped configs it is.
ARCH_HINTS = {
    "wan2.2-ti2v-5b": ("ti2v-5b",),
    "wan2.2-i2v-a14b": ("i2v-a14b",),
    "wan2.1-i2v-14b-480p": ("i2v-14b-480p", "2.1-i2v-14b"),
    "wan2.1-vace-14b": ("vace-14b",),
    "wan2.1-vace-1.3b": ("vace-1.3b",),
    "phantom-wan-1.3b": ("phantom-wan-1.3b",),
}


def shipped_archs() -> list[str]:
    return sorted(p.name for p in CONFIGS.iterdir() if (p / "model_index.json").is_file())


def arch_folder(name: str) -> Path:
    """The shipped config folder of an arch name (see `shipped_archs`)."""
    folder = CONFIGS / name
    if not (folder / "model_index.json").is_file():
        raise IproError(f"--arch {name}: no such shipped config; use one of {', '.join(shipped_archs())}")
    return folder


def guess_arch(model_path: str) -> str | None:
    """The shipped arch whose hint appears in a checkpoint folder's name (e.g. .../Wan2.2-TI2V-5B-Diffusers)."""
    name = Path(model_path).name.lower()
    for arch, hints in ARCH_HINTS.items():
        if any(h in name for h in hints):
            return arch
    return None


def _cast(module: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    if dtype is None:
        return module
    module.to(dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    for name, p in module.named_parameters():
        if any(k in name.split(".") for k in keep):
            p.data = p.data.float()
    return module


_DEVICE = ["meta"]  # where meta_loading builds (a real device gives random weights: CPU validation runs)


def _diffusers_model(cls, path, subfolder=None, torch_dtype=None, **_):
    config = cls.load_config(Path(path) / subfolder if subfolder else path)
    with torch.device(_DEVICE[0]):
        model = cls.from_config(config)
    return _cast(model.eval(), torch_dtype)


def _transformers_model(cls, path, *_, subfolder="", torch_dtype=None, dtype=None, **__):
    config = cls.config_class.from_pretrained(Path(path) / subfolder if subfolder else path)
    with torch.device(_DEVICE[0]):
        model = cls(config)
    return _cast(model.eval(), torch_dtype or dtype)


def _pipeline(cls, path, torch_dtype=None, **given):
    path = Path(path)
    index = json.loads((path / "model_index.json").read_text())
    parts: dict = {}
    for name, spec in index.items():
        if name.startswith("_"):
            continue
        if name in given:
            parts[name] = given[name]
        elif isinstance(spec, list) and len(spec) == 2:
            library, class_name = spec
            if library is None or name in ("tokenizer", "image_processor", "feature_extractor"):
                parts[name] = None
                continue
            component = getattr(importlib.import_module(library), class_name)
            if name == "scheduler":
                parts[name] = component.from_pretrained(path, subfolder=name)
            else:
                parts[name] = component.from_pretrained(path, subfolder=name, torch_dtype=torch_dtype)
        else:
            parts[name] = spec  # pipeline settings: boundary_ratio, expand_timesteps
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in parts.items() if k in accepted})


@contextmanager
def meta_loading(device: str = "meta") -> Iterator[None]:
    """Inside, `from_pretrained` of diffusers/transformers models and pipelines builds on `meta`
    (or with random weights on a real `device`: how the planner is checked against a real run)."""
    from diffusers import DiffusionPipeline, ModelMixin
    from transformers import PreTrainedModel

    saved = [(ModelMixin, "from_pretrained", ModelMixin.__dict__["from_pretrained"]),
             (PreTrainedModel, "from_pretrained", PreTrainedModel.__dict__["from_pretrained"]),
             (DiffusionPipeline, "from_pretrained", DiffusionPipeline.__dict__["from_pretrained"])]
    ModelMixin.from_pretrained = classmethod(_diffusers_model)
    PreTrainedModel.from_pretrained = classmethod(_transformers_model)
    DiffusionPipeline.from_pretrained = classmethod(_pipeline)
    _DEVICE[0] = device
    try:
        yield
    finally:
        _DEVICE[0] = "meta"
        for owner, name, value in saved:
            setattr(owner, name, value)
