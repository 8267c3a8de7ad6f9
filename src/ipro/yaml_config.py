"""YAML settings files validated by pydantic models, with one-line errors.

Shared by `ipro train` and `ipro prepare`: the file must be a mapping; an unknown key,
a wrong type or a failed cross-field rule becomes one IproError line naming the file
and the key, before any compute starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from ipro.errors import IproError

Model = TypeVar("Model", bound=BaseModel)


def read_mapping(path: str | Path, example: str) -> dict:
    """The top-level mapping of a YAML file; `example` names a preset to point users at."""
    path = Path(path)
    if not path.is_file():
        raise IproError(f"{path}: config file not found; pass a YAML file like {example}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise IproError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise IproError(f"{path}: must be a mapping of settings, got {type(data).__name__}")
    return data


def validate(model: type[Model], data: dict, source: str, keys_hint: str) -> Model:
    """model(**data), with the first problem as one line naming the key."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        # An unknown key (often a typo) explains more than the missing key it was meant to be.
        e = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            raise IproError(f"{source}: unknown key '{key}'; {keys_hint}") from None
        if e["type"] == "missing":
            raise IproError(f"{source}: missing required key '{key}'") from None
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "value_error" and (not e["loc"] or e["loc"][-1] not in getattr(model, "model_fields", {}) or msg.startswith(f"{key}.")):
            raise IproError(f"{source}: {msg}") from None  # a cross-field rule or a section's check; its message names the keys
        raise IproError(f"{source}: key '{key}': {msg} (got {e.get('input')!r})") from None
