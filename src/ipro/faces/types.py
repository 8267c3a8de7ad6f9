"""Plain containers shared by the face toolkit."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Detections:
    """Faces found in one image, in input pixel coordinates.

    boxes: (N, 4) float32 x1, y1, x2, y2.
    scores: (N,) detector confidence in [0, 1].
    landmarks: (N, 5, 2) float32 (x, y): left eye, right eye, nose, left mouth
        corner, right mouth corner (left/right as seen in the image).
    N is 0 for an image without faces.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> "Detections":
        return Detections(
            boxes=torch.zeros(0, 4, device=device),
            scores=torch.zeros(0, device=device),
            landmarks=torch.zeros(0, 5, 2, device=device),
        )

    def to(self, device: torch.device | str) -> "Detections":
        return Detections(self.boxes.to(device), self.scores.to(device), self.landmarks.to(device))
