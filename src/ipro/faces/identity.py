"""Group the faces of a clip into people.

Used by data curation (to label the pool) and by the multi-person reward (to match
generated faces to people). Two faces in the same frame are never the same person, so
we track: each frame's faces are assigned to the people seen so far by Hungarian
assignment on cosine similarity; a face with no match above the threshold starts a new
person. Finally, people who never share a frame and whose mean embeddings agree are
merged (a person who left and came back).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def assign(similarity: torch.Tensor, threshold: float) -> list[tuple[int, int]]:
    """Hungarian matching maximizing similarity; pairs below the threshold are dropped.

    similarity: (faces, people). Returns (face, person) pairs.
    """
    if similarity.numel() == 0:
        return []
    sim = similarity.detach().float().cpu().numpy()
    rows, cols = linear_sum_assignment(-sim)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if sim[r, c] >= threshold]


def cluster_identities(embeddings: torch.Tensor, frame: torch.Tensor, threshold: float) -> torch.Tensor:
    """Person id (0..P-1, by first appearance) for each of M faces.

    embeddings: (M, D); frame: (M,) frame index of each face (any order).
    """
    m = embeddings.shape[0]
    ids = torch.full((m,), -1, dtype=torch.long)
    if m == 0:
        return ids
    emb = F.normalize(embeddings.detach().float().cpu(), dim=-1)
    frame = frame.detach().cpu()
    sums: list[torch.Tensor] = []
    for f in frame.unique(sorted=True):
        idx = torch.nonzero(frame == f).flatten()
        pairs = []
        if sums:
            centroids = F.normalize(torch.stack(sums), dim=-1)
            pairs = assign(emb[idx] @ centroids.T, threshold)
        matched = {face for face, _ in pairs}
        for face, person in pairs:
            ids[idx[face]] = person
            sums[person] = sums[person] + emb[idx[face]]
        for face in range(len(idx)):
            if face not in matched:
                ids[idx[face]] = len(sums)
                sums.append(emb[idx[face]].clone())
    # Merge people who never co-occur and look alike, most similar pairs first.
    people = len(sums)
    frames_of = [set(frame[ids == p].tolist()) for p in range(people)]
    parent = list(range(people))
    centroids = F.normalize(torch.stack(sums), dim=-1)
    sim = (centroids @ centroids.T).numpy()
    order = sorted(((sim[a, b], a, b) for a in range(people) for b in range(a + 1, people)), reverse=True)
    for s, a, b in order:
        if s < threshold:
            break
        ra, rb = _root(parent, a), _root(parent, b)
        if ra != rb and not (frames_of[ra] & frames_of[rb]):
            parent[rb] = ra
            frames_of[ra] |= frames_of[rb]
    roots = np.array([_root(parent, int(p)) for p in ids.tolist()])
    # Renumber by first appearance so ids are stable and dense.
    first = {}
    for r in roots[np.argsort(frame.numpy(), kind="stable")]:
        first.setdefault(int(r), len(first))
    return torch.tensor([first[int(r)] for r in roots], dtype=torch.long)


def _root(parent: list[int], x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x
