"""Follow the generated faces of one video through time, and count identity swaps.

What is "the same person" across generated frames? Not the face that looks the same:
a swap is exactly the case where the person standing on the left (same place, moving
continuously) suddenly shows the other person's face. Following faces by embedding
would follow the face to its new owner and hide the swap. So we track by position:
a face continues the track whose last box is nearest (centre distance in units of face
size, Hungarian over all faces of the frame), within `max_shift` face sizes and at most
`max_gap` scored frames after the track was last seen. Everything else starts a track.

Each face also gets an identity per frame (Hungarian assignment to the pool's people).
A swap is one track changing identity between two consecutive appearances (frames
where the face matched nobody are passed over, not counted). Two people trading faces
therefore counts 2 swaps at the frame where it happens.

Limits: when two faces cross or overlap, position alone can mix up their tracks, and
with sparse frame selection fast motion can break a track (a new track starts: no swap
is counted, none is invented).
"""

from __future__ import annotations

from collections import Counter

import torch
from scipy.optimize import linear_sum_assignment


def track_faces(step: torch.Tensor, boxes: torch.Tensor, max_shift: float = 1.5, max_gap: int = 2) -> torch.Tensor:
    """Track id (0..T-1, by first appearance) for each face of one video.

    step: (N,) frame position of each face (any order); boxes: (N, 4) x1, y1, x2, y2.
    """
    n = int(step.shape[0])
    track = torch.full((n,), -1, dtype=torch.long)
    if n == 0:
        return track
    step = step.cpu()
    boxes = boxes.detach().float().cpu()
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    size = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1).prod(1).sqrt()
    last_face: list[int] = []  # per track: index of its most recent face
    for s in step.unique(sorted=True).tolist():
        faces = torch.nonzero(step == s).flatten()
        alive = [t for t, f in enumerate(last_face) if s - int(step[f]) <= max_gap + 1]
        matched = set()
        if alive:
            prev = torch.tensor([last_face[t] for t in alive])
            dist = torch.cdist(centre[faces], centre[prev])
            scale = (size[faces][:, None] + size[prev][None, :]) / 2
            cost = (dist / scale).numpy()
            rows, cols = linear_sum_assignment(cost)
            for r, c in zip(rows, cols):
                if cost[r, c] <= max_shift:
                    track[faces[r]] = alive[c]
                    last_face[alive[c]] = int(faces[r])
                    matched.add(int(r))
        for r in range(len(faces)):
            if r not in matched:
                track[faces[r]] = len(last_face)
                last_face.append(int(faces[r]))
    return track


def count_swaps(track: torch.Tensor, step: torch.Tensor, identity: torch.Tensor) -> int:
    """Number of times a track's identity changes between consecutive matched
    appearances. identity: (N,) person id per face, -1 for unmatched faces."""
    swaps = 0
    for t in track.unique().tolist():
        idx = torch.nonzero((track == t) & (identity >= 0)).flatten()
        ids = identity[idx[step[idx].argsort()]]
        swaps += int((ids[1:] != ids[:-1]).sum())
    return swaps


def track_identity(track: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """Each face gets the identity its track was matched to most often (-1 if never).

    Scoring a face against its track's identity rather than its own per-frame match is
    what makes a swap cost reward: after the swap, the face no longer looks like the
    person this track is. Ties go to the identity the track showed first.
    """
    out = torch.full_like(identity, -1)
    for t in track.unique().tolist():
        in_track = track == t
        ids = [i for i in identity[in_track].tolist() if i >= 0]
        if ids:
            out[in_track] = Counter(ids).most_common(1)[0][0]
    return out
