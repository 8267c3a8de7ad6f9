"""Identity features of a video's faces for the learned reward model: subject people,
per-frame assignment and tracking, and the feature vector of each sampled frame
(`FEATURES`). Detection and embedding are cached on disk per file."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ipro.data.video import to_tensor
from ipro.rewards.preference import sample_frames

FEATURES = (
    "has_face",  # any face in the frame
    "coverage",  # fraction of the subject people found in the frame
    "extra_faces",  # faces beyond the number of people, per person
    "own_cos",  # mean cosine of each face to its track's person
    "own_cos_min",  # the worst face's cosine to its track's person
    "match_cos",  # mean cosine to the person each face matches in this frame
    "margin",  # own_cos minus the best cosine to another person (several people)
    "swapped",  # fraction of faces whose per-frame match is not their track's person
    "step_cos",  # cosine of each track's face to the same track's previous face
    "track_cos",  # cosine of each face to its track's mean embedding
    "first_cos",  # cosine of each face to its track's first face
    "dup_cos",  # highest cosine between two faces of the frame (one person twice)
    "time",  # position of the frame in the video, 0..1
)


# --- Faces of a video, cached ----------------------------------------------------------


@dataclass
class VideoFaceData:
    """The faces of N sampled frames of one video (what detection costs; cached)."""

    embeddings: torch.Tensor  # (M, D) unit norm
    frame: torch.Tensor  # (M,) 0..N-1: position among the sampled frames
    boxes: torch.Tensor  # (M, 4)
    num_frames: int  # N



def subject_people(embeddings: torch.Tensor, image: torch.Tensor, threshold: float) -> torch.Tensor:
    """(P, D) unit centroids of the people in the subject images' faces; faces of one image
    are different people, faces of different images that agree are merged."""
    from ipro.faces.identity import cluster_identities

    if embeddings.shape[0] == 0:
        return embeddings.new_zeros(0, embeddings.shape[-1])
    ids = cluster_identities(embeddings, image, threshold)
    sums = embeddings.new_zeros(int(ids.max()) + 1, embeddings.shape[1]).index_add_(0, ids.to(embeddings.device), embeddings)
    return F.normalize(sums, dim=-1)


def frame_features(faces: VideoFaceData, people: torch.Tensor) -> torch.Tensor:
    """(N, len(FEATURES)) identity features per sampled frame; NaN where undefined.

    people: (P, D) subject centroids. With P = 0 (no face in the subject images) the
    video's own first faces stand in, so temporal consistency is still measured.
    """
    from ipro.faces.identity import assign
    from ipro.rewards.tracking import track_faces, track_identity

    n = faces.num_frames
    out = torch.full((n, len(FEATURES)), float("nan"))
    col = {k: i for i, k in enumerate(FEATURES)}
    out[:, col["time"]] = torch.linspace(0, 1, n) if n > 1 else 0.0
    emb, frame, boxes = faces.embeddings.float().cpu(), faces.frame.long().cpu(), faces.boxes.float().cpu()
    if people.shape[0] == 0 and emb.shape[0]:
        first = frame == frame.min()
        people = F.normalize(emb[first], dim=-1)
    people = people.float().cpu()
    p = people.shape[0]
    counts = torch.bincount(frame, minlength=n)
    out[:, col["has_face"]] = (counts > 0).float()
    out[:, col["extra_faces"]] = (counts - p).clamp_min(0).float() / max(p, 1)
    out[:, col["coverage"]] = 0.0
    if emb.shape[0] == 0 or p == 0:
        return out
    sim = emb @ people.T  # (M, P)
    match = torch.full((len(emb),), -1, dtype=torch.long)
    for f in frame.unique().tolist():
        idx = torch.nonzero(frame == f).flatten()
        for face, person in assign(sim[idx], -2.0):
            match[idx[face]] = person
    track = track_faces(frame, boxes)
    person = track_identity(track, match)
    own = sim[torch.arange(len(emb)), person.clamp_min(0)]
    others = sim.clone()
    others[torch.arange(len(emb)), person.clamp_min(0)] = -2.0
    best_other = others.max(1).values if p > 1 else torch.full_like(own, float("nan"))
    matched_cos = sim[torch.arange(len(emb)), match.clamp_min(0)]
    # Embedding changes along each track.
    step_cos = torch.full((len(emb),), float("nan"))
    first_cos = torch.full((len(emb),), float("nan"))
    track_cos = torch.full((len(emb),), float("nan"))
    for t in track.unique().tolist():
        idx = torch.nonzero(track == t).flatten()
        idx = idx[frame[idx].argsort()]
        e = emb[idx]
        track_cos[idx] = e @ F.normalize(e.mean(0), dim=0)
        first_cos[idx] = e @ e[0]
        if len(idx) > 1:
            step_cos[idx[1:]] = (e[1:] * e[:-1]).sum(-1)
    for f in frame.unique().tolist():
        i = torch.nonzero(frame == f).flatten()
        own_i, has_person = own[i], person[i] >= 0
        row = out[f]
        row[col["coverage"]] = match[i][match[i] >= 0].unique().numel() / p
        if has_person.any():
            row[col["own_cos"]] = own_i[has_person].mean()
            row[col["own_cos_min"]] = own_i[has_person].min()
            row[col["swapped"]] = (match[i][has_person] != person[i][has_person]).float().mean()
            if p > 1:
                row[col["margin"]] = (own_i - best_other[i])[has_person].mean()
        if (match[i] >= 0).any():
            row[col["match_cos"]] = matched_cos[i][match[i] >= 0].mean()
        for name, values in (("step_cos", step_cos), ("track_cos", track_cos), ("first_cos", first_cos)):
            v = values[i][~torch.isnan(values[i])]
            if len(v):
                row[col[name]] = v.mean()
        if len(i) > 1:
            pair = emb[i] @ emb[i].T
            row[col["dup_cos"]] = pair.masked_fill(torch.eye(len(i), dtype=torch.bool), -2.0).max()
    return out


class FaceFeatureExtractor:
    """Faces of videos and subject images through a frozen `FaceEmbedder`, cached.

    cache_dir: where per-file face data goes (keyed by path, size, mtime, frame count
    and recognizer); None keeps it in memory only.
    """

    def __init__(self, embedder=None, num_frames: int = 8, cache_dir: str | Path | None = None,
                 identity_threshold: float | None = None) -> None:
        from ipro.faces.embedder import FaceEmbedder
        from ipro.faces.thresholds import same_person_threshold

        self.embedder = embedder if embedder is not None else FaceEmbedder()
        self.num_frames = num_frames
        self.cache_dir = Path(cache_dir) if cache_dir else None
        rec = self.embedder.recognizer.name
        self.identity_threshold = identity_threshold if identity_threshold is not None else same_person_threshold(rec)
        self._memory: dict[str, Any] = {}

    @property
    def recognizer(self) -> str:
        return self.embedder.recognizer.name

    @torch.no_grad()
    def video_faces(self, frames: torch.Tensor) -> list[VideoFaceData]:
        """(B, F, 3, H, W) in [0, 1] -> faces of N evenly spaced frames of each video."""
        steps = sample_frames(frames.shape[1], self.num_frames).to(frames.device)
        faces = self.embedder(frames[:, steps].detach())
        out = []
        for b in range(frames.shape[0]):
            i = faces.sample == b
            out.append(VideoFaceData(faces.embeddings[i].float().cpu(), faces.frame[i].cpu(), faces.boxes[i].float().cpu(), len(steps)))
        return out

    @torch.no_grad()
    def image_faces(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, 3, H, W) -> embeddings (M, D) and the image index of each face (M,)."""
        faces = self.embedder(images[:, None].detach())
        return faces.embeddings.float().cpu(), faces.sample.cpu()

    def people(self, images: torch.Tensor) -> torch.Tensor:
        emb, image = self.image_faces(images)
        return subject_people(emb, image, self.identity_threshold)

    # -- files, with the cache --

    def _key(self, path: Path, what: str) -> str:
        st = path.stat()
        raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{what}|{self.recognizer}"
        return hashlib.sha1(raw.encode()).hexdigest()[:20]

    def _cached(self, path: Path, what: str, compute):
        key = self._key(path, what)
        if key in self._memory:
            return self._memory[key]
        file = self.cache_dir / f"{key}.pt" if self.cache_dir else None
        if file is not None and file.is_file():
            value = torch.load(file, weights_only=True)
        else:
            value = compute()
            if file is not None:
                from ipro.data.video import atomic_path

                with atomic_path(file) as tmp:
                    torch.save(value, tmp)
        self._memory[key] = value
        return value

    def video_file(self, path: str | Path) -> VideoFaceData:
        from ipro.data.video import read_media

        path = Path(path)

        def compute() -> dict:
            frames, _ = read_media(path)
            (faces,) = self.video_faces(to_tensor(frames)[None])
            return asdict(faces)

        return VideoFaceData(**self._cached(path, f"video{self.num_frames}", compute))

    def people_files(self, paths: list[str | Path]) -> torch.Tensor:
        from ipro.data.video import read_image

        embs, index = [], []
        for k, path in enumerate(paths):
            emb = self._cached(Path(path), "image", lambda p=Path(path): self.image_faces(to_tensor(read_image(p))[None])[0])
            embs.append(emb)
            index.append(torch.full((len(emb),), k, dtype=torch.long))
        dim = self.embedder.embedding_dim
        return subject_people(torch.cat(embs) if embs else torch.zeros(0, dim), torch.cat(index) if index else torch.zeros(0, dtype=torch.long), self.identity_threshold)

    def file_features(self, video: str | Path, subjects: list[str | Path]) -> torch.Tensor:
        return frame_features(self.video_file(video), self.people_files(subjects))

