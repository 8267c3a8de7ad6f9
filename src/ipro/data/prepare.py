"""`ipro prepare`: turn a folder of videos (and photos) into a training set with face pools.

For each input file:

1. Decode with PyAV, resample to `fps` by presentation time (so variable frame rate
   comes out evenly spaced), apply rotation metadata, and cut back-to-back clips of
   `frames` frames (`stride_s` leaves gaps between clip starts).
2. Detect faces on every sampled frame at source resolution and embed them with the
   configured recognizer. Faces whose box centre falls outside the training crop are
   ignored: they would not be in the clip the model sees.
3. Run the filters. Each one records a verdict (pass / fail / null = not applicable)
   and a reason that quotes the measured value and the threshold.
4. For kept clips write the first frame (PNG) and the clip (H.264 mp4), both resized
   and centre-cropped to `height` x `width`, and the face pool (safetensors, boxes and
   landmarks in clip pixels, people clustered with `identity_threshold`).

Stills (png, jpg, ...) become one-frame items with `is_still` set: they go through the
same face filters (except `length`), get a first frame and a pool but no clip. The
training loader uses them as first-frame-only items and skips them when a ground-truth
clip is asked for.

Reliability: every file is written atomically; after an input's clips are written its
record (`records/<input_id>.json`) is written, which marks it done. A rerun skips
inputs that have a record, and `manifest.parquet` and `summary.json` are always rebuilt
from all records, so a killed run loses at most the inputs in progress. Bad inputs
(unreadable, corrupt, empty, not a video, too large) are recorded as failed with a
reason and do not stop the run. To retry one, delete its record.

Sharding: `shard=(i, n)` takes the inputs whose stable hash of the relative path is i
mod n. Shards may write into the same OUT_DIR (records are per input; run once more
without a shard at the end to rebuild the manifest from all records) or into separate
ones, combined with `merge_prepared(sources, dest)` (`ipro prepare-merge`).
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ipro.data.video import atomic_path, is_image, is_video, iter_video, probe_video, read_image, write_image, write_video
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
    identity_threshold: float = Field(
        0.85, ge=-1, le=1,
        description="Cosine above which two faces are the same person (dlib: 0.85; ArcFace: about 0.3).",
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


# ---------------------------------------------------------------------------
# Inputs, captions, sharding


def stable_hash(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:15], 16)


def input_id(rel: str) -> str:
    """A readable, collision-free folder/file name for one input."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(rel).stem)[:40] or "input"
    return f"{stem}-{stable_hash(rel):015x}"[: len(stem) + 9]


def list_inputs(input_dir: Path, exclude: Path | None = None) -> tuple[list[str], list[str]]:
    """(media files, other files) as sorted POSIX paths relative to input_dir.

    Hidden files, caption sidecars (.txt) and the root caption files are neither.
    """
    media, other = [], []
    for root, dirs, files in os.walk(input_dir):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (exclude is None or (root_path / d).resolve() != exclude))
        for name in sorted(files):
            rel = (root_path / name).relative_to(input_dir).as_posix()
            if name.startswith(".") or name.lower().endswith(".txt") or rel in CAPTION_FILES:
                continue
            (media if is_video(name) or is_image(name) else other).append(rel)
    return sorted(media), sorted(other)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
        raise IproError(f"--shard: '{text}' is not I/N with 0 <= I < N; e.g. --shard 0/4")
    return int(m[1]), int(m[2])


def in_shard(rel: str, shard: tuple[int, int] | None) -> bool:
    return shard is None or stable_hash(rel) % shard[1] == shard[0]


def load_captions(input_dir: Path) -> dict[str, str]:
    """Root caption map: relative path or stem -> caption, from captions.jsonl or captions.csv.

    jsonl lines: {"file": "clips/a.mp4", "caption": "..."} ("path"/"video"/"name" and
    "text"/"prompt" are accepted too). csv: a header with file and caption columns.
    """
    captions: dict[str, str] = {}
    file_keys, text_keys = ("file", "path", "video", "name"), ("caption", "text", "prompt")

    def add(row: dict, where: str) -> None:
        key = next((row[k] for k in file_keys if row.get(k)), None)
        text = next((row[k] for k in text_keys if k in row), None)
        if not isinstance(key, str) or not isinstance(text, str):
            raise IproError(f"{where}: needs a file key ({'/'.join(file_keys)}) and a caption ({'/'.join(text_keys)}) string")
        captions[Path(key).as_posix()] = text

    jsonl = input_dir / "captions.jsonl"
    if jsonl.is_file():
        for i, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise IproError(f"{jsonl}:{i}: not JSON ({e.msg}); write one object per line") from None
                add(row if isinstance(row, dict) else {}, f"{jsonl}:{i}")
    table = input_dir / "captions.csv"
    if table.is_file():
        with table.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
            for i, row in enumerate(csv.DictReader(f), 2):
                add(row, f"{table}:{i}")
    return captions


def caption_for(input_dir: Path, rel: str, captions: dict[str, str], default: str) -> str:
    """Sidecar `<stem>.txt` first, then the root map by relative path, then by stem."""
    sidecar = (input_dir / rel).with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8").strip()
    return captions.get(rel, captions.get(Path(rel).stem, default))


# ---------------------------------------------------------------------------
# Faces of one clip


@dataclass
class ClipFaces:
    """All faces of a clip in source pixels, as numpy arrays over M faces."""

    frame: np.ndarray  # (M,) int
    boxes: np.ndarray  # (M, 4)
    scores: np.ndarray  # (M,)
    landmarks: np.ndarray  # (M, 5, 2)
    embeddings: np.ndarray  # (M, D) unit norm

    @staticmethod
    def empty() -> "ClipFaces":
        return ClipFaces(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                         np.zeros((0, 5, 2), np.float32), np.zeros((0, 0), np.float32))

    def select(self, keep: np.ndarray) -> "ClipFaces":
        return ClipFaces(self.frame[keep], self.boxes[keep], self.scores[keep], self.landmarks[keep], self.embeddings[keep])

    def records(self, num_frames: int) -> list[list[dict]]:
        out: list[list[dict]] = [[] for _ in range(num_frames)]
        for i, f in enumerate(self.frame.tolist()):
            out[f].append({"box": self.boxes[i].tolist(), "score": float(self.scores[i]), "landmarks": self.landmarks[i].tolist()})
        return out


def find_faces(embedder, frames: np.ndarray, batch: int) -> ClipFaces:
    """Detect and embed faces in (F, H, W, 3) uint8 frames, `batch` frames at a time."""
    import torch

    parts = []
    with torch.no_grad():
        for start in range(0, len(frames), batch):
            video = torch.from_numpy(np.ascontiguousarray(frames[start : start + batch])).permute(0, 3, 1, 2).float() / 255
            faces = embedder.embed(video[None], embedder.detect(video))
            parts.append((faces.frame.numpy() + start, faces.boxes.numpy(), faces.scores.numpy(),
                          faces.landmarks.numpy(), faces.embeddings.numpy()))
    cat = [np.concatenate([p[i] for p in parts]) for i in range(5)]
    return ClipFaces(cat[0].astype(np.int64), *[c.astype(np.float32) for c in cat[1:]])


def landmark_error(landmarks: np.ndarray) -> np.ndarray:
    """How badly each face's 5 landmarks fit the ArcFace template after the best
    similarity transform: mean point distance over the template's eye distance.

    Frontal faces score ~0.03-0.1, turned heads ~0.15; occluders that drag the
    detector's landmarks off the face push it up.
    """
    import torch

    from ipro.faces.align import ARCFACE_TEMPLATE_112 as template
    from ipro.faces.align import similarity_transform

    if len(landmarks) == 0:
        return np.zeros(0, np.float32)
    lm = torch.from_numpy(landmarks).float()
    m = similarity_transform(lm, template)
    fitted = lm @ m[:, :, :2].transpose(1, 2) + m[:, None, :, 2]
    eye = (template[1] - template[0]).norm()
    return ((fitted - template).norm(dim=-1).mean(-1) / eye).numpy()


@dataclass
class Crop:
    """Resize by `scale`, then cut `height` x `width` at (x0, y0) in resized pixels."""

    scale: float
    x0: int
    y0: int
    height: int
    width: int

    @staticmethod
    def center(src_h: int, src_w: int, height: int, width: int) -> "Crop":
        scale = max(height / src_h, width / src_w)
        return Crop(scale, (round(src_w * scale) - width) // 2, (round(src_h * scale) - height) // 2, height, width)

    def points(self, xy: np.ndarray) -> np.ndarray:
        """Source pixel (x, y) -> clip pixel (x, y); works on any (..., 2) array."""
        return xy * self.scale - np.array([self.x0, self.y0], np.float32)

    def inside(self, boxes: np.ndarray) -> np.ndarray:
        centre = self.points((boxes[:, :2] + boxes[:, 2:]) / 2)
        return (centre[:, 0] >= 0) & (centre[:, 0] < self.width) & (centre[:, 1] >= 0) & (centre[:, 1] < self.height)

    def apply(self, frames: np.ndarray) -> np.ndarray:
        import cv2

        h, w = frames.shape[1:3]
        size = (round(w * self.scale), round(h * self.scale))
        interp = cv2.INTER_AREA if self.scale < 1 else cv2.INTER_CUBIC
        return np.stack([
            cv2.resize(f, size, interpolation=interp)[self.y0 : self.y0 + self.height, self.x0 : self.x0 + self.width]
            for f in frames
        ])


# ---------------------------------------------------------------------------
# Filters


def run_filters(config: PrepareConfig, faces: ClipFaces, num_frames: int, people: int, is_still: bool) -> tuple[dict, dict, dict]:
    """Run every filter on one clip.

    Returns (verdicts, reasons, stats): a verdict is True (pass), False (fail) or None
    (off or not applicable); every reason quotes the measured value and the threshold.
    """
    largest = np.zeros(num_frames, np.float32)  # largest face side per frame, 0 without a face
    if len(faces.frame):
        np.maximum.at(largest, faces.frame, np.maximum(faces.boxes[:, 2] - faces.boxes[:, 0], faces.boxes[:, 3] - faces.boxes[:, 1]))
    sizes = largest[largest > 0]
    suspect = (faces.scores < config.suspect_score) | (landmark_error(faces.landmarks) > config.suspect_landmark_error)
    stats = {
        "coverage": float(len(sizes) / num_frames),
        "face_frames": int(len(sizes)),
        "faces": int(len(faces.frame)),
        "face_size_min": float(sizes.min()) if len(sizes) else None,
        "face_size_median": float(np.median(sizes)) if len(sizes) else None,
        "face_size_max": float(sizes.max()) if len(sizes) else None,
        "score_mean": float(faces.scores.mean()) if len(sizes) else None,
        "suspect_fraction": float(suspect.mean()) if len(sizes) else None,
        "people": people,
    }
    verdicts: dict[str, bool | None] = {}
    reasons: dict[str, str] = {}

    def judge(name: str, bound, value, at_most: bool, shown: str, unit: str = "") -> None:
        if bound is None:
            verdicts[name], reasons[name] = None, "filter off"
            return
        ok = value <= bound if at_most else value >= bound
        sign = ("<=" if ok else ">") if at_most else (">=" if ok else "<")
        verdicts[name], reasons[name] = bool(ok), f"{shown} {sign} {bound:g}{unit}"

    if is_still:
        verdicts["length"], reasons["length"] = None, "still image: no clip length"
    else:
        judge("length", config.frames, num_frames, False, f"{num_frames} frames at {config.fps:g} fps", " needed")
    if verdicts["length"] is False or not len(sizes):
        # Nothing to measure: say why once, on the filter that decides.
        why = "not checked: video too short for one clip" if verdicts["length"] is False else "not measured: no face"
        for name in FILTERS[1:]:
            verdicts[name], reasons[name] = None, why
        if verdicts["length"] is not False:
            verdicts["coverage"], reasons["coverage"] = False, "no face in any frame"
        return verdicts, reasons, stats

    judge("max_face_size", config.max_face_size, stats["face_size_max"], True, f"largest face {stats['face_size_max']:.0f} px", " px")
    judge("min_face_size", config.min_face_size, stats["face_size_median"], False,
          f"median face {stats['face_size_median']:.0f} px", " px")
    judge("coverage", config.min_coverage, stats["coverage"], False, f"faces in {stats['coverage']:.2f} of frames")
    judge("confidence", config.min_confidence, stats["score_mean"], False, f"mean detector score {stats['score_mean']:.3f}")
    judge("occlusion", config.max_suspect_fraction, stats["suspect_fraction"], True,
          f"{stats['suspect_fraction']:.2f} of faces look occluded (score < {config.suspect_score:g} "
          f"or landmark error > {config.suspect_landmark_error:g})")
    if config.people == "any":
        verdicts["people"], reasons["people"] = None, f"{people} people; filter off"
    else:
        ok = people == 1 if config.people == "single" else people >= 2
        verdicts["people"], reasons["people"] = ok, f"{people} people, want {config.people}"
    verdicts["vlm"], reasons["vlm"] = None, "no vlm_filter configured" if not config.vlm_filter else "not run: another filter failed"
    return verdicts, reasons, stats


def call_vlm(fn: Callable, frames: np.ndarray, faces: ClipFaces, spec: str) -> tuple[bool, str]:
    result = fn(frames, faces.records(len(frames)))
    if not (isinstance(result, tuple) and len(result) == 2):
        raise IproError(f"vlm_filter '{spec}' returned {result!r}; it must return (keep: bool, reason: str)")
    return bool(result[0]), str(result[1]) or ("kept by vlm_filter" if result[0] else "dropped by vlm_filter")


# ---------------------------------------------------------------------------
# One input


class Worker:
    """Everything needed to process inputs; one per process (builds its own models)."""

    def __init__(self, input_dir: Path, out_dir: Path, config: PrepareConfig, captions: dict[str, str]) -> None:
        from ipro.faces.embedder import FaceEmbedder

        self.input_dir, self.out_dir, self.config, self.captions = input_dir, out_dir, config, captions
        self.embedder = FaceEmbedder(
            recognizer=config.recognizer, min_score=config.detect_min_score, max_faces=config.max_faces_per_frame,
            detect_max_side=config.detect_max_side, min_face_size=config.detector_min_face_size,
        )
        self.vlm = load_callable(config.vlm_filter) if config.vlm_filter else None

    def process(self, rel: str) -> dict:
        """Process one input, write its files and its record; return the record."""
        iid = input_id(rel)
        item_dir = self.out_dir / "items" / iid
        shutil.rmtree(item_dir, ignore_errors=True)  # leftovers of a killed run
        record = {"source": rel, "input_id": iid, "status": "ok", "reason": "", "notes": [], "rows": []}
        try:
            record["rows"] = list(self._clips(rel, iid, record["notes"]))
        except IproError as e:
            record.update(status="failed", reason=str(e).replace(str(self.input_dir / rel), rel), rows=[])
        except Exception as e:  # an odd input must not stop the run; the summary lists it
            record.update(status="failed", reason=f"{rel}: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}", rows=[])
        if record["status"] == "failed":
            shutil.rmtree(item_dir, ignore_errors=True)
        write_json(self.out_dir / "records" / f"{iid}.json", record)
        return record

    def _clips(self, rel: str, iid: str, notes: list[str]):
        config, path = self.config, self.input_dir / rel
        caption = caption_for(self.input_dir, rel, self.captions, config.default_caption)
        if is_image(rel):
            image = read_image(path)
            self._check_size(rel, image.shape[0], image.shape[1])
            yield self._clip(rel, iid, 0, image[None], 0.0, caption, is_still=True)
            return
        info = probe_video(path)
        self._check_size(rel, info.height, info.width)
        if info.truncated:
            notes.append(f"file is cut short: {info.duration_s:.1f} s readable; kept the readable part")
        if info.variable_fps:
            notes.append("variable frame rate: resampled by timestamps")
        if info.pix_fmt not in ("yuv420p", "yuvj420p"):
            notes.append(f"pixel format {info.pix_fmt} converted to RGB")
        step = round(config.stride_s * config.fps) if config.stride_s else config.frames
        buffer: list[np.ndarray] = []
        index = clip_index = 0
        for frame in iter_video(path, fps=config.fps):
            if index % step < config.frames:
                buffer.append(frame)
            index += 1
            if len(buffer) == config.frames:
                yield self._clip(rel, iid, clip_index, np.stack(buffer), (index - config.frames) / config.fps, caption)
                buffer, clip_index = [], clip_index + 1
                if config.max_clips_per_video and clip_index >= config.max_clips_per_video:
                    return
        if index < 0.9 * info.duration_s * config.fps:
            stopped = f"decoding stopped at {index / config.fps:.1f} s of {info.duration_s:.1f} s"
            notes.append(f"corrupt data: {stopped}; kept the decodable part")
        if clip_index == 0:  # too short for one clip: say so in the manifest
            yield self._clip(rel, iid, 0, np.stack(buffer), 0.0, caption)

    def _check_size(self, rel: str, h: int, w: int) -> None:
        if h * w > self.config.max_source_pixels:
            limit = self.config.max_source_pixels
            raise IproError(f"{rel}: {w}x{h} is larger than max_source_pixels={limit}; downscale it or raise the limit")
        if min(h, w) < 16:
            raise IproError(f"{rel}: {w}x{h} is too small to hold a face; remove it")

    def _clip(self, rel: str, iid: str, k: int, frames: np.ndarray, start_s: float, caption: str, is_still: bool = False) -> dict:
        config = self.config
        num_frames, src_h, src_w = frames.shape[:3]
        crop = Crop.center(src_h, src_w, config.height, config.width)
        too_short = not is_still and num_frames < config.frames
        faces = ClipFaces.empty() if too_short else find_faces(self.embedder, frames, config.batch_frames)
        faces = faces.select(crop.inside(faces.boxes))
        identity = self._identities(faces)
        people = int(identity.max()) + 1 if len(identity) else 0
        verdict, reason, stats = run_filters(config, faces, num_frames, people, is_still)
        if self.vlm is not None and not any(v is False for v in verdict.values()):
            verdict["vlm"], reason["vlm"] = call_vlm(self.vlm, frames, faces, config.vlm_filter)
        kept = not any(v is False for v in verdict.values())

        clip_id = f"{iid}-{k:03d}"
        row = {
            "id": clip_id, "source": rel, "input_id": iid, "clip_index": k, "is_still": is_still,
            "start_s": start_s, "end_s": start_s + (0.0 if is_still else num_frames / config.fps),
            "fps": None if is_still else config.fps, "num_frames": int(num_frames),
            "source_width": int(src_w), "source_height": int(src_h), "width": config.width, "height": config.height,
            "caption": caption, **stats, "kept": kept,
            "reason": "; ".join(f"{n}: {reason[n]}" for n in FILTERS if verdict[n] is False),
            **{f"pass_{n}": verdict[n] for n in FILTERS}, **{f"reason_{n}": reason[n] for n in FILTERS},
            "first_frame": None, "clip": None, "pool": None,
        }
        if kept:
            row.update(self._write_item(iid, k, frames, crop, faces, identity, is_still))
        return row

    def _identities(self, faces: ClipFaces) -> np.ndarray:
        """Person id per face; people never share a frame with themselves."""
        import torch

        from ipro.faces.identity import cluster_identities

        if not len(faces.frame):
            return np.zeros(0, np.int64)
        ids = cluster_identities(torch.from_numpy(faces.embeddings), torch.from_numpy(faces.frame), self.config.identity_threshold)
        return ids.numpy()

    def _write_item(self, iid: str, k: int, frames: np.ndarray, crop: Crop, faces: ClipFaces, identity: np.ndarray,
                    is_still: bool) -> dict:
        import torch

        from ipro.data.pool import FacePool, save_pool

        rel_dir = Path("items") / iid
        paths = {"first_frame": (rel_dir / f"{k:03d}.png").as_posix(), "pool": (rel_dir / f"{k:03d}.pool.safetensors").as_posix()}
        clip = crop.apply(frames if not is_still else frames[:1])
        write_image(self.out_dir / paths["first_frame"], clip[0])
        if not is_still:
            paths["clip"] = (rel_dir / f"{k:03d}.mp4").as_posix()
            write_video(self.out_dir / paths["clip"], clip, fps=self.config.fps, crf=self.config.crf)
        pool = FacePool(
            embeddings=torch.from_numpy(faces.embeddings), frame=torch.from_numpy(faces.frame),
            identity=torch.from_numpy(identity),
            boxes=torch.from_numpy(crop.points(faces.boxes.reshape(-1, 2, 2)).reshape(-1, 4).astype(np.float32)),
            landmarks=torch.from_numpy(crop.points(faces.landmarks).astype(np.float32)),
            scores=torch.from_numpy(faces.scores), recognizer=self.embedder.recognizer.name, num_frames=len(frames),
        )
        save_pool(self.out_dir / paths["pool"], pool)
        return paths


def write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))


# ---------------------------------------------------------------------------
# The run


def _manifest_schema():
    import pyarrow as pa

    fields = [
        ("id", pa.string()), ("source", pa.string()), ("input_id", pa.string()), ("clip_index", pa.int32()),
        ("is_still", pa.bool_()), ("start_s", pa.float64()), ("end_s", pa.float64()), ("fps", pa.float64()),
        ("num_frames", pa.int32()), ("source_width", pa.int32()), ("source_height", pa.int32()),
        ("width", pa.int32()), ("height", pa.int32()), ("caption", pa.string()), ("people", pa.int32()),
        ("coverage", pa.float64()), ("face_frames", pa.int32()), ("faces", pa.int32()),
        ("face_size_min", pa.float64()), ("face_size_median", pa.float64()), ("face_size_max", pa.float64()),
        ("score_mean", pa.float64()), ("suspect_fraction", pa.float64()), ("kept", pa.bool_()), ("reason", pa.string()),
        *[(f"pass_{n}", pa.bool_()) for n in FILTERS], *[(f"reason_{n}", pa.string()) for n in FILTERS],
        ("first_frame", pa.string()), ("clip", pa.string()), ("pool", pa.string()),
    ]
    return pa.schema(fields)


def record_paths(out_dir: Path) -> list[Path]:
    """Finished inputs (a killed run may leave hidden temp files beside them)."""
    return sorted(p for p in (out_dir / "records").glob("*.json") if not p.name.startswith("."))


def read_records(out_dir: Path) -> list[dict]:
    records = []
    for path in record_paths(out_dir):
        try:
            records.append(json.loads(path.read_text()))
        except (json.JSONDecodeError, OSError):
            continue  # cannot happen with atomic writes, but never let one file break the manifest
    return sorted(records, key=lambda r: r["source"])


def finalize(out_dir: Path) -> dict:
    """Rebuild manifest.parquet and summary.json from every record in out_dir."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = read_records(out_dir)
    schema = _manifest_schema()
    rows = [{name: row.get(name) for name in schema.names} for r in records for row in r["rows"]]
    with atomic_path(out_dir / "manifest.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    dropped = Counter(n for row in rows if not row["kept"] for n in FILTERS if row[f"pass_{n}"] is False)
    summary = {
        "inputs": sum(r["status"] != "skipped" for r in records),
        "clips": len(rows),
        "kept": sum(row["kept"] for row in rows),
        "dropped": sum(not row["kept"] for row in rows),
        "dropped_by_filter": dict(sorted(dropped.items())),
        "failed_files": [{"source": r["source"], "reason": r["reason"]} for r in records if r["status"] == "failed"],
        "skipped_files": [{"source": r["source"], "reason": r["reason"]} for r in records if r["status"] == "skipped"],
        "notes": [{"source": r["source"], "note": n} for r in records for n in r["notes"]],
    }
    write_json(out_dir / "summary.json", summary)
    return summary


def _check_config(out_dir: Path, config: PrepareConfig) -> None:
    """A resumed run must use the config that made the existing records."""
    path = out_dir / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(config.fingerprint()) if old.get(k) != config.fingerprint().get(k))
        if changed:
            raise IproError(
                f"{out_dir}: was prepared with different settings ({', '.join(changed)}); use a new OUT_DIR or the same config"
            )
    else:
        write_json(path, config.fingerprint())


_worker: Worker | None = None


def _init_worker(input_dir: Path, out_dir: Path, config: PrepareConfig, captions: dict[str, str]) -> None:
    import torch

    global _worker
    torch.set_num_threads(1)  # processes, not threads, give the parallelism
    _worker = Worker(input_dir, out_dir, config, captions)


def _process(rel: str) -> dict:
    assert _worker is not None
    return _worker.process(rel)


def prepare(
    input_dir: str | Path,
    out_dir: str | Path,
    config: PrepareConfig | None = None,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
    progress: bool = False,
) -> dict:
    """Prepare (or resume preparing) a training set; returns the summary (also in summary.json)."""
    input_dir, out_dir = Path(input_dir).resolve(), Path(out_dir).resolve()
    config = config or PrepareConfig()
    if not input_dir.is_dir():
        raise IproError(f"{input_dir}: input folder not found; pass a folder of videos")
    if workers < 1:
        raise IproError(f"--workers: {workers} must be at least 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_config(out_dir, config)
    captions = load_captions(input_dir)
    media, other = list_inputs(input_dir, exclude=out_dir)
    if not config.stills:
        other = sorted(other + [rel for rel in media if is_image(rel)])
        media = [rel for rel in media if not is_image(rel)]
    done = {p.stem for p in record_paths(out_dir)}
    for rel in other:
        if in_shard(rel, shard) and input_id(rel) not in done:
            reason = f"{rel}: {'a still (stills: false)' if is_image(rel) else 'not a video or image'}; ignored"
            write_json(out_dir / "records" / f"{input_id(rel)}.json",
                       {"source": rel, "input_id": input_id(rel), "status": "skipped", "reason": reason, "notes": [], "rows": []})
    pending = [rel for rel in media if in_shard(rel, shard) and input_id(rel) not in done]

    with _progress(progress, len(pending)) as advance:
        if workers == 1 or len(pending) <= 1:
            worker = Worker(input_dir, out_dir, config, captions) if pending else None
            for rel in pending:
                advance(worker.process(rel))
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor
            from concurrent.futures.process import BrokenProcessPool

            # spawn: forking a process that has run torch can deadlock in its thread pools
            try:
                with ProcessPoolExecutor(workers, mp.get_context("spawn"), initializer=_init_worker,
                                         initargs=(input_dir, out_dir, config, captions)) as pool:
                    for record in pool.map(_process, pending):
                        advance(record)
            except BrokenProcessPool:
                raise IproError(
                    f"{out_dir}: a worker process died (out of memory?); finished inputs are saved, "
                    "rerun the same command to resume, with fewer --workers"
                ) from None
    return finalize(out_dir)


class _progress:
    """A rich progress bar over inputs (or nothing); yields `advance(record)`."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda record: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from rich.console import Console

        self.bar = Progress(TextColumn("prepare"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.description}"), console=Console(stderr=True))
        self.bar.start()
        task = self.bar.add_task("", total=self.total)

        def advance(record: dict) -> None:
            kept = sum(r["kept"] for r in record["rows"])
            self.bar.update(task, advance=1, description=f"{record['source']}: {record['status']}, {kept}/{len(record['rows'])} kept")

        return advance

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()


def merge_prepared(sources: list[str | Path], dest: str | Path) -> dict:
    """Combine OUT_DIRs prepared separately (e.g. one per shard) into `dest`.

    Records and item files are hard-linked (copied across file systems); an input
    present in several sources is taken from the first. All sources must share a config.
    """
    dest = Path(dest)
    configs = []
    for src in map(Path, sources):
        if not (src / "config.json").is_file():
            raise IproError(f"{src}: not a prepared folder (no config.json); pass OUT_DIRs of `ipro prepare`")
        configs.append(json.loads((src / "config.json").read_text()))
    if any(c != configs[0] for c in configs):
        raise IproError("prepare-merge: the sources were prepared with different configs; merge only matching runs")
    if not configs:
        raise IproError("prepare-merge: pass at least one source folder")
    _check_config(dest, PrepareConfig(**configs[0]))
    done = {p.stem for p in record_paths(dest)}
    for src in map(Path, sources):
        for record_path in record_paths(src):
            if record_path.stem in done:
                continue
            item_dir = src / "items" / record_path.stem
            for f in sorted(item_dir.glob("*")) if item_dir.is_dir() else []:
                if not f.name.startswith("."):
                    _link(f, dest / "items" / record_path.stem / f.name)
            _link(record_path, dest / "records" / record_path.name)  # last: marks the input done
            done.add(record_path.stem)
    return finalize(dest)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
