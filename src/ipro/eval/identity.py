"""Identity metrics of a generated video: FaceSim, swaps, lost identities, coverage.

Everything works on one video's `VideoFaces` (from `ipro.faces.embedder`) and the
embeddings of the people it should show: the faces of the input image (`refs`) and,
when a ground-truth clip exists, its face pool.

- FaceSim (the paper's metric): in each frame, the generated faces are matched to the
  input image's people by Hungarian assignment on cosine (no threshold: a face that turned
  into someone else must lower the score, not drop out); FaceSim of a person is the
  mean cosine over the frames where they were matched; the video's FaceSim is the mean
  over people. Frames without a face are left out (reported as coverage).
- FaceSim vs pool (the paper's FSM): the same, but a matched face scores its mean
  cosine to all of that person's faces in the ground-truth clip.
- Swaps: faces are linked over time into tracks by box overlap. Each face is labelled
  with the input image's person it is most similar to, or "unknown" below the recognizer's
  same-person threshold; a track's person is its most common known label. A face whose
  label is another of its people is a swap; one labelled unknown on a known track
  has lost its identity.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from ipro.faces.identity import assign, cluster_identities


def embed_frames(embedder, frames: np.ndarray, chunk: int = 16):
    """Run a `FaceEmbedder` over (F, H, W, 3) uint8 frames in chunks; one `VideoFaces`,
    on the CPU whatever device the embedder runs on."""
    from ipro.faces.embedder import VideoFaces

    device = next(embedder.parameters()).device
    parts = []
    with torch.no_grad():
        for start in range(0, len(frames), chunk):
            video = torch.from_numpy(np.ascontiguousarray(frames[start : start + chunk])).to(device).permute(0, 3, 1, 2).float()
            faces = embedder((video / 255.0)[None])
            faces.frame = faces.frame + start
            parts.append(faces)
    cat = lambda name: torch.cat([getattr(p, name).cpu() for p in parts])  # noqa: E731
    return VideoFaces(
        sample=cat("sample"), frame=cat("frame"), boxes=cat("boxes"), scores=cat("scores"),
        landmarks=cat("landmarks"), embeddings=cat("embeddings"),
        has_face=torch.cat([p.has_face.cpu() for p in parts], dim=1), recognizer=parts[0].recognizer,
    )


def input_people(faces, max_people: int = 4) -> torch.Tensor:
    """Embeddings (P, D) of the faces in a one-frame `VideoFaces` (the input image),
    largest first; P is 0 when the image has no face."""
    area = (faces.boxes[:, 2] - faces.boxes[:, 0]) * (faces.boxes[:, 3] - faces.boxes[:, 1])
    order = area.argsort(descending=True)[:max_people]
    return faces.embeddings[order].detach().float()


def pool_people(faces, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Group a ground-truth clip's faces into people: (embeddings (M, D), person (M,))."""
    emb = faces.embeddings.detach().float()
    return emb, cluster_identities(emb, faces.frame, threshold)


def match_per_frame(faces, people: torch.Tensor) -> list[tuple[int, int, int]]:
    """Hungarian matching of each frame's faces to people: (face index, person, frame)."""
    out = []
    emb = faces.embeddings.detach().float()
    for f in faces.frame.unique(sorted=True).tolist():
        idx = torch.nonzero(faces.frame == f).flatten()
        for face, person in assign(emb[idx] @ people.T, threshold=-2.0):
            out.append((int(idx[face]), person, f))
    return out


def face_similarity(faces, people: torch.Tensor) -> dict:
    """FaceSim against the people's embeddings `people` (P, D); None when no face matched."""
    if people.shape[0] == 0:
        return {"face_sim": None, "per_person": [], "frames_scored": 0}
    emb = faces.embeddings.detach().float()
    per_person: list[list[float]] = [[] for _ in range(people.shape[0])]
    frames = set()
    for face, person, f in match_per_frame(faces, people):
        per_person[person].append(float(emb[face] @ people[person]))
        frames.add(f)
    means = [float(np.mean(s)) if s else None for s in per_person]
    scored = [m for m in means if m is not None]
    return {
        "face_sim": float(np.mean(scored)) if scored else None,
        "per_person": means,
        "frames_scored": len(frames),
    }


def pool_similarity(faces, pool_embeddings: torch.Tensor, pool_person: torch.Tensor) -> dict:
    """FaceSim against a ground-truth face pool, FSM style (mean cosine to the pool)."""
    people = pool_person.unique(sorted=True).tolist()
    if not people:
        return {"face_sim_pool": None, "per_person_pool": []}
    pool = pool_embeddings.detach().float()
    centroids = torch.nn.functional.normalize(torch.stack([pool[pool_person == p].mean(0) for p in people]), dim=-1)
    emb = faces.embeddings.detach().float()
    per_person: list[list[float]] = [[] for _ in people]
    for face, k, _ in match_per_frame(faces, centroids):
        per_person[k].append(float((pool[pool_person == people[k]] @ emb[face]).mean()))
    means = [float(np.mean(s)) if s else None for s in per_person]
    scored = [m for m in means if m is not None]
    return {"face_sim_pool": float(np.mean(scored)) if scored else None, "per_person_pool": means}


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix between boxes a (N, 4) and b (K, 4)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp(min=1e-6)


def track_faces(faces, min_iou: float = 0.3, max_gap: int = 5) -> torch.Tensor:
    """Track id (M,) for every face: linked to the previous frames' faces by box IoU
    (Hungarian), allowing up to `max_gap` frames without a detection."""
    ids = torch.full((faces.num_faces,), -1, dtype=torch.long)
    last_box: list[torch.Tensor] = []
    last_frame: list[int] = []
    boxes = faces.boxes.detach().float()
    for f in faces.frame.unique(sorted=True).tolist():
        idx = torch.nonzero(faces.frame == f).flatten()
        alive = [t for t in range(len(last_box)) if f - last_frame[t] <= max_gap]
        pairs = assign(_iou(boxes[idx], torch.stack([last_box[t] for t in alive])), min_iou) if alive else []
        for face, k in pairs:
            ids[idx[face]] = alive[k]
        for face in range(len(idx)):
            if ids[idx[face]] < 0:
                ids[idx[face]] = len(last_box)
                last_box.append(boxes[idx[face]])
                last_frame.append(f)
        for face in idx.tolist():
            last_box[ids[face]] = boxes[face]
            last_frame[ids[face]] = f
    return ids


def swaps_and_coverage(faces, people: torch.Tensor, threshold: float) -> dict:
    """Swap rate, identity-lost rate and coverage of one video (see the module doc)."""
    num_frames = int(faces.has_face.shape[1])
    coverage = float(faces.has_face.float().mean()) if num_frames else 0.0
    out = {"face_coverage": coverage, "swap_rate": None, "identity_lost_rate": None, "person_coverage": []}
    if people.shape[0] == 0 or faces.num_faces == 0:
        return out
    sim = faces.embeddings.detach().float() @ people.T
    best, label = sim.max(1)
    label = torch.where(best >= threshold, label, torch.full_like(label, -1))
    tracks = track_faces(faces)
    track_person = {}
    for t in tracks.unique().tolist():
        known = [p for p in label[tracks == t].tolist() if p >= 0]
        if known:
            track_person[t] = Counter(known).most_common(1)[0][0]
    judged, swapped, lost = set(), set(), set()
    for i in range(faces.num_faces):
        t, f, lab = int(tracks[i]), int(faces.frame[i]), int(label[i])
        if t not in track_person:
            continue
        judged.add(f)
        if lab == -1:
            lost.add(f)
        elif lab != track_person[t]:
            swapped.add(f)
    if judged:
        out["swap_rate"] = len(swapped) / len(judged)
        out["identity_lost_rate"] = len(lost) / len(judged)
    out["person_coverage"] = [
        len(set(faces.frame[label == p].tolist())) / num_frames for p in range(people.shape[0])
    ]
    return out
