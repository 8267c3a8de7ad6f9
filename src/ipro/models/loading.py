"""Loading a model folder as a `VideoModel`: from what users write ('builtin',
'tiny:<family>', a path) to a folder, and from a folder to its family.

Every family module is imported here, which registers it: adding a family is one new file
plus one import line below.
"""

from __future__ import annotations

from pathlib import Path

from ipro.errors import IproError
from ipro.models import phantom, pixel, wan, wan_vace  # noqa: F401  (each registers its families)
from ipro.models.base import VideoModel
from ipro.models.pixel import BUILTIN_PATH
from ipro.models.registry import FAMILIES, detect_family, read_model_index
from ipro.models.tiny import build_tiny


def resolve_model_path(path: str | Path, cache_dir: str | Path) -> Path:
    """A model folder from what users write: a path, 'builtin' (the embedded base model), or
    'tiny:<family>', which builds a random-weight tiny model (tests, CPU smoke runs) once
    under cache_dir."""
    path = str(path)
    if path.startswith("tiny:"):
        family = path.split(":", 1)[1]
        target = Path(cache_dir) / f"tiny-{family}"
        if not (target / "model_index.json").is_file():
            build_tiny(family, target, seed=0)
        return target
    if path == "builtin":
        if not (BUILTIN_PATH / "model_index.json").is_file():
            raise IproError(f"{BUILTIN_PATH}: the embedded base model is missing; reinstall ipro, or train it (ipro train -c configs/base-model.yaml) and copy runs/base-model/model there")
        return BUILTIN_PATH
    return Path(path)


def load_model(path: str | Path, family: str | None = None, **options) -> VideoModel:
    """Load a local diffusers-format folder as a `VideoModel`.

    family: one of FAMILIES, or None to detect it from model_index.json. options go to the
    family's `from_pretrained` (dtype, device, finetune, lora, lora_rank, lightning, ...).
    """
    read_model_index(path)
    if family is None:
        family = detect_family(path)
    if family not in FAMILIES:
        raise IproError(f"family {family!r}: unknown; use one of {', '.join(FAMILIES)}")
    return FAMILIES[family].from_pretrained(path, **options)
