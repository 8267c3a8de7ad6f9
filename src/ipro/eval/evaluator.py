"""`evaluate`: every metric for a folder of generated videos, written as metrics.json
and report.html.

Per video we compute identity metrics (FaceSim vs the input image and vs the GT
pool, swaps, coverage), VBench-I2V-style quality metrics and the rigid-face index;
the run aggregates each metric as a mean with a 95% bootstrap interval over videos.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ipro.data.video import atomic_path, read_video
from ipro.errors import IproError, read_format_json
from ipro.eval import identity, motion, rigid
from ipro.eval.blockiness import blockiness
from ipro.eval.inputs import EvalItem, find_items
from ipro.eval.metrics import METRIC_KEYS
from ipro.faces.thresholds import same_person_threshold
from ipro.eval.niqe import niqe_video
from ipro.eval.stats import bootstrap_mean

FORMAT = "ipro-eval-1"


def face_sim_fall(faces, people, num_frames: int) -> float | None:
    """FaceSim of the input's main person (person 0), mean over the first quarter of the
    frames (index < F/4) minus the mean over the last quarter (index >= 3F/4): how much
    the identity drifts over the clip. None without a matched face in either quarter."""
    if people.shape[0] == 0:
        return None
    emb = faces.embeddings.detach().float()
    sims = {f: float(emb[face] @ people[0]) for face, person, f in identity.match_per_frame(faces, people) if person == 0}
    first = [s for f, s in sims.items() if f < num_frames / 4]
    last = [s for f, s in sims.items() if f >= 3 * num_frames / 4]
    return float(np.mean(first) - np.mean(last)) if first and last else None


class Evaluator:
    """Holds the models; `__call__(item)` returns one video's record."""

    def __init__(
        self,
        recognizer: str = "dlib",
        dino: str | Path | None = None,
        clip: str | Path | None = None,
        aesthetic: str | Path | None = None,
        max_frames: int | None = None,
        max_people: int = 4,
        embedder=None,
        device: str = "cpu",
    ) -> None:
        if embedder is None:
            from ipro.faces.embedder import FaceEmbedder

            # Face detection and embedding are ~70-85% of the time on CPU (benchmarks/eval.py).
            embedder = FaceEmbedder(recognizer=recognizer).to(device)
        self.embedder = embedder
        self.recognizer = embedder.recognizer.name
        self.threshold = same_person_threshold(self.recognizer)
        self.max_frames = max_frames
        self.max_people = max_people
        self.not_computed: dict[str, str] = {}
        self.encoders: dict[str, str | None] = {"subject": None, "background": None, "aesthetic": None}
        self._setup_features(dino, clip, aesthetic)

    def _setup_features(self, dino, clip, aesthetic) -> None:
        from ipro.eval.features import AestheticHead, FrameEncoder

        self.dino = FrameEncoder(dino) if dino else None
        self.clip = FrameEncoder(clip) if clip else None
        # VBench: subject <- DINO, background <- CLIP. With one encoder, it serves both.
        self.subject_encoder = self.dino or self.clip
        self.background_encoder = self.clip or self.dino
        if self.subject_encoder is None:
            reason = "no image encoder given (--dino/--clip PATH to a local transformers checkpoint); none ships with ipro"
            self.not_computed["subject_consistency"] = reason
            self.not_computed["background_consistency"] = reason
        else:
            self.encoders["subject"] = self.subject_encoder.name
            self.encoders["background"] = self.background_encoder.name
        self.aesthetic = None
        if not aesthetic:
            self.not_computed["aesthetic_quality"] = "no LAION aesthetic predictor given (--aesthetic PATH, with --clip ViT-L/14)"
        elif self.clip is None:
            self.not_computed["aesthetic_quality"] = "--aesthetic needs --clip (the CLIP ViT-L/14 the predictor was trained on)"
        else:
            self.aesthetic = AestheticHead(aesthetic)
            self.encoders["aesthetic"] = f"{Path(aesthetic).name} on {self.clip.name}"

    def __call__(self, item: EvalItem) -> dict:
        seconds: dict[str, float] = defaultdict(float)
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[name] += now - clock
            clock = now

        frames, fps = read_video(item.video, max_frames=self.max_frames)
        image = item.input_image()
        lap("read")
        metrics: dict[str, float | None] = {}
        details: dict = {"notes": []}
        faces, people = self._identity(item, frames, image, metrics, details)
        lap("identity")
        self._rigid(frames, faces, people, metrics, details)
        lap("rigid")
        metrics["temporal_flickering"] = motion.temporal_flickering(frames)
        lap("flickering")
        metrics["blockiness"] = blockiness(frames)
        lap("blockiness")
        metrics["motion_smoothness"] = motion.motion_smoothness(frames)
        lap("smoothness")
        dd = motion.dynamic_degree(frames, fps)
        metrics["dynamic_degree"], metrics["motion_px"] = dd["dynamic"], dd["motion_px"]
        details["dynamic"] = {k: dd[k] for k in ("moving_pairs", "pairs", "required_pairs")}
        lap("dynamic")
        iq = niqe_video(frames)
        metrics["niqe"], metrics["imaging_quality"] = iq["niqe"], iq["imaging_quality"]
        details["niqe_patch"] = iq["patch"]
        lap("imaging")
        self._features(frames, metrics, details)
        if self.subject_encoder is not None:
            lap("features")

        clean = {k: (None if v is None or not np.isfinite(v) else float(v)) for k, v in metrics.items()}
        return {
            "name": item.name,
            "video": str(item.video),
            "input_image": str(item.image) if isinstance(item.image, Path) else None,
            "gt": str(item.gt) if item.gt else None,
            "caption": item.caption,
            "num_frames": int(len(frames)),
            "fps": float(fps),
            "size": [int(frames.shape[2]), int(frames.shape[1])],
            "metrics": clean,
            "details": details,
            "seconds": dict(seconds),
        }

    def _identity(self, item: EvalItem, frames: np.ndarray, image: np.ndarray | None, metrics: dict, details: dict):
        """FaceSim (input image, GT pool), swaps, coverage; returns the video's faces and
        the input's people (P, D)."""
        faces = identity.embed_frames(self.embedder, frames)
        people = faces.embeddings.new_zeros(0, faces.embeddings.shape[1])
        if image is not None:
            people = identity.input_people(identity.embed_frames(self.embedder, image[None]), self.max_people)
        if people.shape[0] == 0:
            details["notes"].append("no face found in the input image: FaceSim and swaps not computed")
        sim = identity.face_similarity(faces, people)
        metrics["face_sim"] = sim["face_sim"]
        metrics["face_sim_fall"] = face_sim_fall(faces, people, len(frames))
        details["face_sim_per_person"] = sim["per_person"]
        details["people_in_input"] = int(people.shape[0])
        metrics["face_sim_pool"] = None
        pool = self._pool(item, details)
        if pool is not None:
            ps = identity.pool_similarity(faces, *pool)
            metrics["face_sim_pool"] = ps["face_sim_pool"]
            details["face_sim_pool_per_person"] = ps["per_person_pool"]
        cov = identity.swaps_and_coverage(faces, people, self.threshold)
        for key in ("swap_rate", "identity_lost_rate", "face_coverage"):
            metrics[key] = cov[key]
        details["person_coverage"] = cov["person_coverage"]
        return faces, people

    def _rigid(self, frames: np.ndarray, faces, people, metrics: dict, details: dict) -> None:
        matches = identity.match_per_frame(faces, people) if people.shape[0] else None
        r = rigid.rigid_face(frames, faces, rigid.main_face_per_frame(faces, matches))
        metrics["rigid"] = None if r["rigid"] is None else float(r["rigid"])
        metrics["expression_motion"], metrics["appearance_change"] = r["expression_motion"], r["appearance_change"]
        details["first_frame_face_sim"] = r["first_frame_face_sim"]
        if r["rigid"] is None:
            details["notes"].append(f"main face in {r['face_frames']} frames (< {rigid.MIN_FACE_FRAMES}): rigidity not judged")

    def _features(self, frames: np.ndarray, metrics: dict, details: dict) -> None:
        """Subject/background consistency and aesthetics, when encoders were given."""
        metrics["subject_consistency"] = metrics["background_consistency"] = metrics["aesthetic_quality"] = None
        if self.subject_encoder is None:
            return
        from ipro.eval.features import consistency

        subject = self.subject_encoder(frames)
        metrics["subject_consistency"] = consistency(subject)
        background = subject if self.background_encoder is self.subject_encoder else self.background_encoder(frames)
        metrics["background_consistency"] = consistency(background)
        if self.aesthetic is None:
            return
        clip_feats = background if self.background_encoder is self.clip else self.clip(frames)
        if clip_feats.shape[1] == self.aesthetic.input_dim:
            metrics["aesthetic_quality"] = float(self.aesthetic(clip_feats).mean()) / 10.0
        else:
            details["notes"].append(f"aesthetic head wants {self.aesthetic.input_dim}-d CLIP features, --clip gives {clip_feats.shape[1]}")

    def _pool(self, item: EvalItem, details: dict):
        """(embeddings, person) of the GT faces: the stored pool if it was made by our
        recognizer, else embedded from the GT clip; None without either."""
        if item.pool is not None:
            from ipro.data.pool import load_pool

            stored = load_pool(item.pool)
            if stored.recognizer == self.recognizer:
                return stored.embeddings.float(), stored.identity
            details["notes"].append(f"stored pool made by {stored.recognizer}, not {self.recognizer}: re-embedding the GT clip")
        if item.gt is None:
            return None
        gt_frames, _ = read_video(item.gt, max_frames=self.max_frames)
        gt_faces = identity.embed_frames(self.embedder, gt_frames)
        if gt_faces.num_faces == 0:
            details["notes"].append("no face in the GT clip: FaceSim-pool not computed")
            return None
        return identity.pool_people(gt_faces, self.threshold)


def aggregate(videos: list[dict]) -> dict:
    return {key: bootstrap_mean([v["metrics"].get(key) for v in videos]) for key in METRIC_KEYS}


def evaluate(
    videos: str | Path,
    inputs: str | Path,
    out: str | Path,
    evaluator: Evaluator | None = None,
    baselines: list[str | Path] = (),
    progress=None,
    **evaluator_options,
) -> dict:
    """Evaluate every generated video in `videos` that matches an input; write
    `out/metrics.json` and `out/report.html`; return the metrics dict.

    baselines: earlier runs' output folders (or metrics.json files) to compare against
    in the report.
    """
    items, unmatched = find_items(videos, inputs)
    baseline_runs = [load_run(b) for b in baselines]
    evaluator = evaluator or Evaluator(**evaluator_options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Each scored video is appended to records.jsonl at once, keyed by its files and the
    # evaluator's settings: a killed run, or a rerun with a few new videos, scores only the rest.
    journal = out / RECORDS
    done, torn = _read_records(journal)
    records = []
    with open(journal, "a") as log:
        if torn:
            log.write("\n")  # a killed run's torn last line stays a line of its own
        for i, item in enumerate(items):
            key = _record_key(item, evaluator)
            if key not in done:
                done[key] = evaluator(item)
                log.write(json.dumps({"key": key, "record": done[key]}) + "\n")
                log.flush()
                os.fsync(log.fileno())
            records.append(done[key])
            if progress:
                progress(i + 1, len(items), item.name)
    seconds: dict[str, float] = defaultdict(float)
    for r in records:
        for k, v in r["seconds"].items():
            seconds[k] += v
    not_computed = dict(evaluator.not_computed)
    if not any(r["metrics"]["face_sim_pool"] is not None for r in records):
        not_computed["face_sim_pool"] = "no GT clip or face pool for any input"
    result = {
        "format": FORMAT,
        "name": Path(out).name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "videos_dir": str(Path(videos).resolve()),
        "inputs": str(Path(inputs).resolve()),
        "recognizer": evaluator.recognizer,
        "same_person_threshold": evaluator.threshold,
        "rigid_thresholds": {"expression_motion": rigid.RIGID_EXPRESSION, "appearance_change": rigid.RIGID_APPEARANCE},
        "encoders": evaluator.encoders,
        "not_computed": not_computed,
        "unmatched_videos": unmatched,
        "aggregate": aggregate(records),
        "seconds": dict(seconds),
        "videos": records,
    }
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    from ipro.eval.report import write_report

    write_report(out, [result, *baseline_runs])
    return result


RECORDS = "records.jsonl"  # in an eval folder: one scored video per line, for resuming


def _record_key(item: EvalItem, evaluator: Evaluator) -> str:
    """What a video's record depends on: its video, input image, ground truth and pool (their
    bytes) and the evaluator's settings."""
    h = hashlib.sha1(json.dumps({"format": FORMAT, "name": item.name, "recognizer": evaluator.recognizer, "threshold": evaluator.threshold,
                                 "encoders": evaluator.encoders, "max_frames": evaluator.max_frames}, sort_keys=True).encode())
    for part in (item.video, item.image, item.gt, item.pool):
        if isinstance(part, np.ndarray):
            h.update(part.tobytes())
        elif part is not None and Path(part).is_file():
            h.update(Path(part).read_bytes())
        else:
            h.update(f"<{part}>".encode())
    return h.hexdigest()


def _read_records(journal: Path) -> tuple[dict[str, dict], bool]:
    """key -> record of an earlier (possibly killed) run, and whether its last line is torn
    (unterminated; it is ignored)."""
    text = journal.read_text() if journal.is_file() else ""
    done = {}
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            done[entry["key"]] = entry["record"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done, bool(text) and not text.endswith("\n")


def load_run(path: str | Path) -> dict:
    """An earlier run's metrics.json (path to it or to its folder), with "name" set."""
    path = Path(path).expanduser()
    file = path / "metrics.json" if path.is_dir() else path
    if not file.is_file():
        raise IproError(f"{path}: no metrics.json here; run `ipro eval` into this folder first")
    run = read_format_json(file, FORMAT, "an ipro eval result", "re-run `ipro eval`")
    run["name"] = file.parent.name  # runs are named by their folder, as the user passes them
    return run
