"""Preference pairs for the identity reward model: which of two videos keeps the people
of the subject image(s) more consistent.

One JSONL line per pair, the same format for human annotations and synthetic pairs:

    {"video_a": "a.mp4", "video_b": "b.mp4", "subject": "alice.png", "label": "a"}

- subject: one image path of the people to keep, or a list of them (e.g. one photo per
  person). Files written before the rename use the key "reference"; it is read the same.
- label: "a" (video_a keeps the people better), "b", or "tie".
- optional: "group" (pairs of one group never straddle a train/held-out split; default:
  the subject images), "kind" (what differs, for accuracy per kind), "weight" (loss weight).
Relative paths are relative to the JSONL file's folder; other keys are ignored.

Synthetic pairs are made from clips curated by `ipro prepare`, whose face pools give
every face's 5 landmarks per frame. Each pair has a known better side:

- swap: from an onset frame on, another person's face replaces the face. The donor face
  is aligned onto the clip's landmarks (similarity transform), colour-matched to the
  skin it covers and feathered in, so the cue is identity, not a visible seam.
- blend: the face morphs toward another person, more and more over time.
- warp: the face's proportions are distorted, more and more over time.
- flicker: another person's face shows up in scattered frames.
- duplicate: with several people, one person's face replaces another's (the same
  person twice).
Blend and warp also give mild-vs-strong pairs (both distorted, the milder is better).
Ties: the clip against a photometric variant of itself (brightness, contrast, gamma,
blur): the same people, so the model must learn to ignore what is not identity.

Donors are other people: the photos that ship with scikit-image (astronaut, cameraman
and the 100 faces of `lfw_subset`) plus any images given. Pairs are split into train
and held-out by source clip, and the donors too, so no clip and no donor identity is
on both sides. Decisive pairs are balanced: half say "a", half "b".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ipro.data.face_edits import (
    Donor,
    builtin_donor_images,
    detect_donors,
    duplicate_person,
    identity_flicker,
    identity_swap,
    photometric,
    progressive_blend,
    progressive_warp,
)
from ipro.errors import IproError

LABELS = ("a", "b", "tie")
DISTORTIONS = ("swap", "blend", "warp", "flicker", "duplicate")


# --- The pair format -----------------------------------------------------------------


@dataclass(frozen=True)
class PreferencePair:
    video_a: Path
    video_b: Path
    subjects: tuple[Path, ...]
    label: str  # "a", "b" or "tie"
    group: str = ""
    kind: str = "human"
    weight: float = 1.0

    @property
    def target(self) -> float:
        """1 if a is better, 0 if b is, 0.5 for a tie."""
        return {"a": 1.0, "b": 0.0, "tie": 0.5}[self.label]

    def to_json(self, root: Path) -> dict:
        def rel(p: Path) -> str:
            try:
                return str(Path(p).resolve().relative_to(root.resolve()))
            except ValueError:
                return str(Path(p).resolve())

        subjects = [rel(s) for s in self.subjects]
        return {
            "video_a": rel(self.video_a), "video_b": rel(self.video_b),
            "subject": subjects[0] if len(subjects) == 1 else subjects, "label": self.label,
            "group": self.group, "kind": self.kind, **({"weight": self.weight} if self.weight != 1.0 else {}),
        }


def load_pairs(path: str | Path, check_files: bool = True) -> list[PreferencePair]:
    """Read and validate a JSONL file of pairs; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise IproError(f"{path}: pairs file not found; pass a JSONL file with one pair per line")
    root = path.parent
    pairs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                pairs.append(_parse_pair(line, f"{path}:{n}", root, check_files))
    if not pairs:
        raise IproError(f"{path}: no pairs; each line must be a JSON object with video_a, video_b, subject, label")
    return pairs


def _parse_pair(line: str, where: str, root: Path, check_files: bool) -> PreferencePair:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise IproError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object") from None
    if not isinstance(row, dict):
        raise IproError(f"{where}: expected a JSON object with video_a, video_b, subject, label; got {type(row).__name__}")
    if "subject" not in row and "reference" in row:  # the key's name before the rename
        row["subject"] = row.pop("reference")
    missing = [k for k in ("video_a", "video_b", "subject", "label") if k not in row]
    if missing:
        raise IproError(f"{where}: missing key '{missing[0]}'; a pair needs video_a, video_b, subject and label")
    label = row["label"]
    if label not in LABELS:
        raise IproError(f"{where}: label must be \"a\", \"b\" or \"tie\", got {label!r}")

    def file(key: str, value) -> Path:
        if not isinstance(value, str) or not value:
            raise IproError(f"{where}: {key} must be a file path (a non-empty string), got {value!r}")
        p = Path(value).expanduser()
        p = p if p.is_absolute() else root / p
        if check_files and not p.is_file():
            raise IproError(f"{where}: {key} file not found: {p}")
        return p

    listed = row["subject"] if isinstance(row["subject"], list) else [row["subject"]]
    if not listed:
        raise IproError(f"{where}: subject is an empty list; give at least one image")
    subjects = tuple(file("subject", s) for s in listed)
    a, b = file("video_a", row["video_a"]), file("video_b", row["video_b"])
    if a.resolve() == b.resolve():
        raise IproError(f"{where}: video_a and video_b are the same file ({a}); a pair compares two videos")
    weight = row.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
        raise IproError(f"{where}: weight must be a positive number, got {weight!r}")
    group = row.get("group") or "|".join(str(s) for s in subjects)
    return PreferencePair(a, b, subjects, label, str(group), str(row.get("kind", "human")), float(weight))


def save_pairs(path: str | Path, pairs: list[PreferencePair]) -> None:
    from ipro.data.video import atomic_path

    path = Path(path)
    lines = [json.dumps(p.to_json(path.parent)) for p in pairs]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + ("\n" if lines else ""))


def split_pairs(pairs: list[PreferencePair], heldout_fraction: float = 0.25, seed: int = 0) -> tuple[list, list]:
    """Train / held-out by group: a group's pairs are all on one side."""
    groups = sorted({p.group for p in pairs})
    held = set(_pick(groups, heldout_fraction, seed))
    return [p for p in pairs if p.group not in held], [p for p in pairs if p.group in held]


def _pick(items: list, fraction: float, seed: int) -> list:
    """A seeded round(fraction * n) of items (at least one, and never all, when n >= 2)."""
    if len(items) < 2 or fraction <= 0:
        return []
    k = min(len(items) - 1, max(1, round(fraction * len(items))))
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in sorted(order[:k])]


# --- Curated clips -------------------------------------------------------------------------


@dataclass
class CuratedClip:
    id: str
    source: str
    frames: np.ndarray  # (F, H, W, 3) uint8
    fps: float
    first_frame: Path  # as written by `ipro prepare`
    landmarks: np.ndarray  # (P, F, 5, 2): each person's landmarks, gaps interpolated
    notes: list[str] = field(default_factory=list)

    @property
    def people(self) -> int:
        return self.landmarks.shape[0]


def person_landmarks(pool, num_frames: int) -> np.ndarray:
    """(P, F, 5, 2) per-person landmarks; frames where a person was not detected are
    interpolated linearly between detections (held at the ends)."""
    people = pool.num_people
    out = np.zeros((people, num_frames, 5, 2), np.float32)
    keep = []
    for p in range(people):
        sel = (pool.identity == p).numpy()
        frames, lms, scores = pool.frame.numpy()[sel], pool.landmarks.numpy()[sel], pool.scores.numpy()[sel]
        known: dict[int, np.ndarray] = {}
        for f, lm, s in sorted(zip(frames.tolist(), lms, scores.tolist()), key=lambda t: t[2]):
            if f < num_frames:
                known[f] = lm  # the most confident face of this person in the frame wins
        if not known:
            continue
        xs = sorted(known)
        flat = np.stack([known[f] for f in xs]).reshape(len(xs), 10)
        filled = np.stack([np.interp(np.arange(num_frames), xs, flat[:, j]) for j in range(10)], 1)
        out[p] = filled.reshape(num_frames, 5, 2)
        keep.append(p)
    return out[keep]


def load_curated_clips(prepared: str | Path, max_frames: int | None = None) -> list[CuratedClip]:
    """The kept video clips of a folder written by `ipro prepare` (stills are skipped)."""
    import pyarrow.parquet as pq

    from ipro.data.pool import load_pool
    from ipro.data.video import read_video

    prepared = Path(prepared)
    manifest = prepared / "manifest.parquet"
    if not manifest.is_file():
        raise IproError(f"{manifest}: not found; run `ipro prepare INPUT_DIR {prepared}` first")
    clips = []
    for row in pq.read_table(manifest).to_pylist():
        if not row["kept"] or row["is_still"] or not row["clip"]:
            continue
        frames, fps = read_video(prepared / row["clip"], max_frames=max_frames)
        lms = person_landmarks(load_pool(prepared / row["pool"]), len(frames))
        if len(lms):
            clips.append(CuratedClip(row["id"], row["source"], frames, fps, prepared / row["first_frame"], lms))
    return clips


# --- Building the pair set -----------------------------------------------------------------


def make_synthetic_pairs(
    prepared: str | Path | list[str | Path],
    out_dir: str | Path,
    *,
    kinds: tuple[str, ...] = DISTORTIONS,
    variants: int = 4,
    ties: int = 1,
    heldout_fraction: float = 0.25,
    split_by: str = "clip",
    donor_images: dict[str, np.ndarray] | None = None,
    builtin_donors: bool = True,
    max_frames: int | None = None,
    seed: int = 0,
    embedder=None,
    progress=None,
) -> dict:
    """Distort curated clips into pairs; write videos, train.jsonl, heldout.jsonl, summary.json.

    variants: pairs per clip and distortion kind; ties: tie pairs per clip.
    split_by: "clip" (each curated clip is a group) or "source" (all clips of a source video).
    Returns the summary (counts per split, kind and label).
    """
    from ipro.data.video import write_image, write_video

    bad = [k for k in kinds if k not in DISTORTIONS]
    if bad:
        raise IproError(f"unknown distortion '{bad[0]}'; use some of {', '.join(DISTORTIONS)}")
    if split_by not in ("clip", "source"):
        raise IproError(f"split_by must be 'clip' or 'source', got {split_by!r}")
    out_dir = Path(out_dir)
    sources = prepared if isinstance(prepared, (list, tuple)) else [prepared]
    clips = [c for s in sources for c in load_curated_clips(s, max_frames)]
    if not clips:
        raise IproError(f"{', '.join(map(str, sources))}: no kept video clips with faces; run `ipro prepare` on videos with faces")
    images = dict(builtin_donor_images() if builtin_donors else {})
    images.update(donor_images or {})
    donors = detect_donors(images, embedder)
    if len(donors) < 2 and any(k in kinds for k in ("swap", "blend", "flicker")):
        raise IproError("need at least two donor faces (one per split) for swap/blend/flicker; pass --donor images with faces")

    groups = sorted({c.id if split_by == "clip" else c.source for c in clips})
    held_groups = set(_pick(groups, heldout_fraction, seed))
    held_donors = {d.name for d in _pick(donors, heldout_fraction, seed + 1)}
    rng = np.random.default_rng(seed)
    splits: dict[str, list[PreferencePair]] = {"train": [], "heldout": []}
    subjects_dir, vid_dir = out_dir / "subjects", out_dir / "videos"

    for ci, clip in enumerate(clips):
        group = clip.id if split_by == "clip" else clip.source
        split = "heldout" if group in held_groups else "train"
        pool = [d for d in donors if (d.name in held_donors) == (split == "heldout")]
        subject = subjects_dir / f"{clip.id}.png"
        write_image(subject, clip.frames[0])
        videos, pairs = clip_distortions(clip, kinds, variants, ties, pool, rng)
        paths = {}
        for name, frames in videos.items():
            paths[name] = vid_dir / clip.id / f"{name}.mp4"
            write_video(paths[name], frames, fps=clip.fps)
        for better, other, kind in pairs:
            label = "tie" if kind == "tie" else "a"
            splits[split].append(PreferencePair(paths[better], paths[other], (subject,), label, group, kind))
        if progress:
            progress(ci + 1, len(clips), clip.id)

    summary: dict = {"clips": len(clips), "heldout_groups": sorted(held_groups), "heldout_donors": sorted(held_donors),
                     "donors": len(donors)}
    for split, pairs in splits.items():
        pairs = _balance(pairs, rng)
        save_pairs(out_dir / f"{split}.jsonl", pairs)
        counts: dict[str, int] = {}
        for p in pairs:
            counts[p.kind] = counts.get(p.kind, 0) + 1
        summary[split] = {"pairs": len(pairs), "kinds": counts,
                          "labels": {lab: sum(p.label == lab for p in pairs) for lab in LABELS}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def clip_distortions(clip: CuratedClip, kinds, variants: int, ties: int, donors: list[Donor],
                     rng: np.random.Generator) -> tuple[dict[str, np.ndarray], list[tuple[str, str, str]]]:
    """Videos made from one clip (by name, "original" included) and pairs (better, other,
    kind) over those names; for kind "tie" neither is better."""
    videos = {"original": clip.frames}
    pairs = []
    f = len(clip.frames)
    for kind in kinds:
        if kind == "duplicate" and clip.people < 2:
            continue
        for v in range(variants):
            p = int(rng.integers(clip.people))
            lm = clip.landmarks[p]
            onset = int(rng.integers(1, max(2, f // 2)))
            donor = donors[int(rng.integers(len(donors)))] if donors else None
            name = f"{kind}{v}"
            if kind == "swap":
                videos[name] = identity_swap(clip.frames, lm, donor, onset)
            elif kind == "flicker":
                videos[name] = identity_flicker(clip.frames, lm, donor, rng)
            elif kind == "duplicate":
                q = (p + 1 + int(rng.integers(clip.people - 1))) % clip.people
                videos[name] = duplicate_person(clip.frames, lm, clip.landmarks[q], onset)
            else:  # blend / warp, progressive; odd variants compare a mild and a strong version
                strong = float(rng.uniform(0.6, 1.0)) if kind == "blend" else float(rng.uniform(0.25, 0.45))
                strengths = {name: strong} if v % 2 == 0 else {name: strong, name + "-mild": strong * 0.35}
                for n, s in strengths.items():
                    videos[n] = progressive_blend(clip.frames, lm, donor, s, onset) if kind == "blend" else progressive_warp(clip.frames, lm, s, onset)
            if kind in ("blend", "warp") and v % 2:
                pairs.append((name + "-mild", name, kind + "-mild"))
            else:
                pairs.append(("original", name, kind))
    for t in range(ties):
        videos[f"tie{t}"] = photometric(clip.frames, rng)
        pairs.append(("original", f"tie{t}", "tie"))
    return videos, pairs


def _balance(pairs: list[PreferencePair], rng: np.random.Generator) -> list[PreferencePair]:
    """Put the better video second in half of the decisive pairs (label "b")."""
    decisive = [i for i, p in enumerate(pairs) if p.label != "tie"]
    flip = set(np.asarray(decisive)[rng.permutation(len(decisive))[: len(decisive) // 2]].tolist()) if decisive else set()
    out = []
    for i, p in enumerate(pairs):
        if i in flip:
            p = PreferencePair(p.video_b, p.video_a, p.subjects, "b", p.group, p.kind, p.weight)
        out.append(p)
    return out
