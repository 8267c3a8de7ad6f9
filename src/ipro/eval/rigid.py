"""A measurable stand-in for the paper's reward-hacking judge: is the face frozen?

The paper asks a VLM whether the face stays "too rigidly consistent with the first
frame": no expression change, no facial motion. Reward hacking copies the input face
and lets it ride on the head, so head motion alone does not clear a video. We measure,
for the main face (person 0, else the largest face), relative to the first frame
where it appears:

- expression motion: the 5 landmarks of each frame are mapped onto the first frame's
  by a least-squares similarity (this removes head translation, scale and in-plane
  rotation); what remains (mouth corners moving, the nose shifting against the eyes as
  the head turns) is averaged over the five points and divided by the first frame's
  inter-ocular distance. Per video: the 90th percentile over frames, so a face that
  moves for part of the clip counts and a single detector glitch does not.
- appearance change: 1 - normalized cross-correlation between the face chip of each
  frame and of the first frame, both aligned to the same template by their own
  landmarks (head motion removed again); per video, the 90th percentile.

A video is rigid when both stay below thresholds (`RIGID_*`), set between measured
cases (tests/test_eval.py, 60 frames of carphone at 144 px, faces ~50 px):

    case                                  expression  appearance
    carphone, a man talking and turning      0.046       0.66    (0.35-0.60 per 1 s)
    first frame repeated                     0.0001      0.0
    first frame zoomed and panned            0.022       0.074   (a pasted face riding
                                                                  on moving footage)

Appearance separates the cases by 2x or more each way; expression alone does not
(landmark jitter on small faces is ~0.02), which is why both must be low. These are
calibrated on one clip: on generated videos, read them with the report's frame strips.
"""

from __future__ import annotations

import numpy as np
import torch

from ipro.data.video import to_tensor
from ipro.faces.align import ARCFACE_TEMPLATE_112, similarity_transform, warp_faces

RIGID_EXPRESSION = 0.04  # landmark residual, in inter-ocular distances
RIGID_APPEARANCE = 0.15  # 1 - NCC of the aligned face chip
MIN_FACE_FRAMES = 4  # fewer face frames than this: not judged

CHIP = 64


def main_face_per_frame(faces, matches: list[tuple[int, int, int]] | None) -> dict[int, int]:
    """frame -> face index of the main face: the face matched to person 0 where the
    input image has a face, else the largest face of the frame."""
    if matches:
        return {f: face for face, person, f in matches if person == 0}
    area = (faces.boxes[:, 2] - faces.boxes[:, 0]) * (faces.boxes[:, 3] - faces.boxes[:, 1])
    out: dict[int, int] = {}
    for i in range(faces.num_faces):
        f = int(faces.frame[i])
        if f not in out or area[i] > area[out[f]]:
            out[f] = i
    return out


def rigid_face(frames: np.ndarray, faces, main_face: dict[int, int]) -> dict:
    """Rigid-face measures of one video; frames (F, H, W, 3) uint8, faces its VideoFaces."""
    order = sorted(main_face)
    out = {"expression_motion": None, "appearance_change": None, "rigid": None, "face_frames": len(order), "first_frame_face_sim": None}
    if len(order) < MIN_FACE_FRAMES:
        return out
    idx = torch.tensor([main_face[f] for f in order])
    lm = faces.landmarks[idx].detach().float().cpu()  # (N, 5, 2)
    # Landmarks of every frame mapped onto the first frame's by a similarity transform.
    m = similarity_transform(lm, lm[0])
    mapped = lm @ m[:, :, :2].transpose(1, 2) + m[:, None, :, 2]
    iod = max(float(torch.linalg.norm(lm[0, 1] - lm[0, 0])), 1.0)
    residual = (mapped - lm[0]).norm(dim=-1).mean(-1) / iod
    # Chips aligned by each frame's own landmarks, gray, compared to the first chip.
    images = to_tensor(frames[order])
    template = ARCFACE_TEMPLATE_112 * (CHIP / 112)
    chips = warp_faces(images, torch.arange(len(order)), lm, template, CHIP).mean(1).flatten(1)
    chips = chips - chips.mean(1, keepdim=True)
    chips = chips / chips.norm(dim=1, keepdim=True).clamp_min(1e-6)
    change = 1.0 - chips @ chips[0]
    expression = float(np.percentile(residual.numpy(), 90))
    appearance = float(np.percentile(change.numpy(), 90))
    emb = faces.embeddings[idx].detach().float()
    out.update(
        # Reported, not thresholded: identity similarity is high for natural faces too.
        first_frame_face_sim=float((emb @ emb[0]).mean()),
        expression_motion=expression,
        appearance_change=appearance,
        rigid=bool(expression < RIGID_EXPRESSION and appearance < RIGID_APPEARANCE),
    )
    return out
