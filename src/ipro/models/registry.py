"""The model families by name, and how a diffusers folder is recognized as one of them.

A family registers itself with `@register_family` when its module is imported;
`ipro.models.loading` imports every family module (one line per family).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ipro.errors import IproError

if TYPE_CHECKING:
    from ipro.models.base import VideoModel

FAMILIES: dict[str, type["VideoModel"]] = {}


def register_family(cls: type["VideoModel"]) -> type["VideoModel"]:
    FAMILIES[cls.family] = cls
    return cls


def read_model_index(path: str | Path) -> tuple[dict, dict]:
    """model_index.json and transformer/config.json of a diffusers folder, with IproErrors if missing."""
    path = Path(path)
    if not path.is_dir():
        raise IproError(
            f"{path}: model folder does not exist; pass a diffusers-format folder containing model_index.json "
            "(e.g. a download of Wan-AI/Wan2.1-I2V-14B-480P-Diffusers)"
        )
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise IproError(f"{index_file}: missing; {path} is not a diffusers-format model folder")
    try:
        model_index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IproError(f"{index_file}: not valid JSON ({e}); re-download the model") from None
    config_file = path / "transformer" / "config.json"
    if not config_file.is_file():
        raise IproError(f"{config_file}: missing; the model folder needs a transformer/ subfolder with its config")
    return model_index, json.loads(config_file.read_text())


def detect_family(path: str | Path) -> str:
    model_index, transformer_config = read_model_index(path)
    for name, cls in FAMILIES.items():
        if cls.matches(model_index, transformer_config):
            return name
    raise IproError(
        f"{Path(path) / 'model_index.json'}: pipeline {model_index.get('_class_name')!r} is not a supported model "
        f"family; pass --family with one of {', '.join(FAMILIES)}"
    )
