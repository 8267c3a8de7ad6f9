"""The filters of `ipro prepare`: each gives a verdict (pass / fail / None = not applicable)
and a reason quoting the measured value and its threshold."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ipro.errors import IproError
from ipro.data.prepare.config import FILTERS, PrepareConfig
from ipro.data.prepare.detect import ClipFaces, landmark_error


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
