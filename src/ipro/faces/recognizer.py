"""The interface every face recognizer implements (`load_recognizer` in `embedder` builds one by name).

A recognizer maps aligned face chips to identity embeddings. It declares the chip
size, the 5-point template the chip must be aligned to, and the embedding size, so the
aligner and the embedder need nothing model-specific.
"""

from __future__ import annotations

import torch
from torch import nn


class FaceRecognizer(nn.Module):
    """Base class. Subclasses set the class attributes and implement `embed_chips`.

    Input chips are (N, 3, S, S) RGB floats in [0, 1], aligned to `template`.
    Output embeddings are (N, D) and not normalized; compare them with cosine.
    """

    name: str = "recognizer"
    input_size: int = 112
    embedding_dim: int = 512

    def __init__(self) -> None:
        super().__init__()
        # (5, 2) x, y in chip pixels: left eye, right eye, nose, left/right mouth corner.
        # A plain float32 CPU tensor, not a buffer: casting the network to bfloat16 must
        # not round the template (47.549 -> 47.5 would shift every chip).
        self.template = torch.zeros(5, 2)

    def embed_chips(self, chips: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        if chips.ndim != 4 or chips.shape[1] != 3 or chips.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"{self.name} expects chips (N, 3, {self.input_size}, {self.input_size}), got {tuple(chips.shape)}"
            )
        return self.embed_chips(chips)
