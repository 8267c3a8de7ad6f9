"""The `ipro prepare` settings (`PrepareConfig`, every field documented) and their YAML loader."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ipro.errors import IproError
from ipro.yaml_config import read_mapping, validate


FILTERS = ("length", "max_face_size", "min_face_size", "coverage", "confidence", "occlusion", "people", "vlm")
CAPTION_FILES = ("captions.jsonl", "captions.csv")


class PrepareConfig(BaseModel):
    """Everything `ipro prepare` does, in one YAML file (see configs/prepare-*.yaml)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # Clips
    fps: float = Field(16.0, gt=0, description="Frame rate clips are resampled to (Wan: 16).")
    frames: int = Field(81, ge=1, description="Frames per clip, 4k+1 (Wan: 81).")
    height: int = Field(480, ge=16, description="Training height in pixels, a multiple of 16 (Wan 2.2: 32).")
    width: int = Field(832, ge=16, description="Training width in pixels, a multiple of 16 (Wan 2.2: 32).")
    stride_s: float | None = Field(
        None, gt=0, description="Seconds between clip starts; None cuts clips back to back. Must not overlap clips."
    )
    max_clips_per_video: int | None = Field(None, ge=1, description="Stop after this many clips of one video.")
    stills: bool = Field(True, description="Use photos as one-frame, first-frame-only items.")
    max_source_pixels: int = Field(
        3840 * 2160, ge=1, description="Reject inputs with more pixels per frame than this (memory)."
    )
    default_caption: str = Field("", description="Caption for inputs that have none.")
    crf: int = Field(18, ge=0, le=51, description="H.264 quality of written clips (lower is better).")

    # Faces
    recognizer: str = Field("dlib", description="'dlib' or 'arcface:/path/to/backbone.pth'.")
    detect_min_score: float = Field(0.9, ge=0, le=1, description="Detections below this are not faces at all.")
    detector_min_face_size: int = Field(20, ge=8, description="Smallest face side (px) the detector searches for.")
    detect_max_side: int = Field(640, ge=64, description="Frames are downscaled to this for detection only.")
    max_faces_per_frame: int = Field(8, ge=1, description="Keep the most confident faces per frame.")
    batch_frames: int = Field(16, ge=1, description="Frames detected and embedded at once (memory vs speed).")
    identity_threshold: float | None = Field(
        None, ge=-1, le=1,
        description="Cosine at or above which two faces are the same person; None takes the recognizer's "
        "measured threshold (ipro.faces.thresholds: dlib 0.90, ArcFace 0.3).",
    )

    # Filters (each can be switched off with null)
    max_face_size: float | None = Field(
        100, gt=0, description="Largest face side (px, source resolution) allowed in any frame (paper: 100)."
    )
    min_face_size: float | None = Field(
        32, gt=0, description="Median over frames of the largest face side must reach this (recognisable faces)."
    )
    min_coverage: float | None = Field(0.4, ge=0, le=1, description="Fraction of frames with a face (paper: 0.4).")
    min_confidence: float | None = Field(0.95, ge=0, le=1, description="Mean detector score of the clip's faces.")
    suspect_score: float = Field(
        0.98, ge=0, le=1, description="A face scoring below this counts as possibly occluded (scores drop when covered)."
    )
    suspect_landmark_error: float = Field(
        0.25, gt=0,
        description="A face whose landmarks fit the 5-point template worse than this (mean error / eye distance) counts as possibly occluded.",
    )
    max_suspect_fraction: float | None = Field(
        0.3, ge=0, le=1, description="Occlusion filter: at most this fraction of faces may be suspect."
    )
    people: Literal["any", "single", "multi"] = Field(
        "any", description="Keep clips with exactly one person ('single'), two or more ('multi') or any."
    )
    vlm_filter: str | None = Field(
        None,
        description=(
            "'module:function' or 'path/file.py:function' called as fn(frames, faces) -> (keep, reason) on "
            "clips that passed every other filter. frames: (F, H, W, 3) uint8 at source resolution; faces: "
            "per frame a list of {'box', 'score', 'landmarks'} in source pixels."
        ),
    )

    @field_validator("frames")
    @classmethod
    def _four_k_plus_one(cls, v: int) -> int:
        if (v - 1) % 4:
            raise ValueError(f"{v} is not 4k+1; use e.g. 17, 33, 49 or 81")
        return v

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"{v} is not a multiple of 16 (Wan 2.2 needs 32)")
        return v

    @model_validator(mode="after")
    def _clips_do_not_overlap(self) -> "PrepareConfig":
        if self.stride_s is not None and self.stride_s * self.fps < self.frames - 1e-6:
            raise ValueError(f"stride_s: {self.stride_s} s is shorter than a clip ({self.frames / self.fps:.2f} s)")
        return self

    def fingerprint(self) -> dict:
        """The settings that change outputs; a resumed run must use the same ones."""
        return self.model_dump(exclude={"batch_frames"})


def load_config(path: str | Path | None = None, **overrides) -> PrepareConfig:
    """Read a YAML config; an unknown key or a wrong value is a one-line IproError naming it."""
    data = read_mapping(path, "configs/prepare-tiny.yaml") if path is not None else {}
    where = str(path) if path is not None else "config"
    data.update(overrides)
    config = validate(PrepareConfig, data, where, f"remove it (valid keys: {', '.join(PrepareConfig.model_fields)})")
    if config.vlm_filter:
        try:
            load_callable(config.vlm_filter)  # fail now, not after an hour of decoding
        except IproError as e:
            raise IproError(f"{where}: {e}") from None
    return config


def load_callable(spec: str) -> Callable:
    """`module:function` or `path/to/file.py:function`."""
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise IproError(f"vlm_filter: '{spec}' is not 'module:function'; e.g. 'my_filters:no_masks'")
    try:
        if module_name.endswith(".py"):
            spec_obj = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec_obj is None or not Path(module_name).is_file():
                raise ImportError(f"no file {module_name}")
            module = importlib.util.module_from_spec(spec_obj)
            spec_obj.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        return getattr(module, func_name)
    except (ImportError, AttributeError) as e:
        raise IproError(f"vlm_filter: cannot load '{spec}' ({e}); check the module path and function name") from None
