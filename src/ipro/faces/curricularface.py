"""CurricularFace's IR backbone (IR-50 / IR-101), loaded from a user's checkpoint.

ConsisID's FaceSim-Cur (reused by OpenS2V-Eval) embeds faces with CurricularFace's
IR-101 trained on Glint360K (`glint360k_curricular_face_r101_backbone.bin`), whose
weights do not ship with ipro. The network is written out here with the module names of
the CurricularFace / face.evoLVe `model_irse.py` Backbone, so such a state dict loads as
is: input_layer (conv, BN, PReLU), body (improved residual units), output_layer (BN,
dropout, flatten, linear, BN1d). 112x112 RGB chips aligned to the ArcFace template,
normalized to [-1, 1] -> 512-d embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ipro.errors import IproError
from ipro.faces.align import ARCFACE_TEMPLATE_112
from ipro.faces.recognizer import FaceRecognizer
from ipro.faces.weights import torch_state_dict

DEPTHS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}  # units per stage; the "IR_101" model is depth 100
WIDTHS = (64, 128, 256, 512)


class UnitIR(nn.Module):
    """BN -> conv3x3 -> PReLU -> conv3x3(stride) -> BN, plus a shortcut (1x1 subsampling
    when the width is kept, else conv1x1 + BN)."""

    def __init__(self, cin: int, depth: int, stride: int) -> None:
        super().__init__()
        if cin == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)  # a strided identity
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(cin, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRBackbone(nn.Module):
    def __init__(self, units: tuple[int, ...], affine_features: bool = False) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        body, cin = [], 64
        for depth, n in zip(WIDTHS, units):
            body += [UnitIR(cin, depth, 2)] + [UnitIR(depth, depth, 1) for _ in range(n - 1)]
            cin = depth
        self.body = nn.Sequential(*body)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512), nn.Dropout(0.4), nn.Flatten(), nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512, affine=affine_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.body(self.input_layer(x)))


def _units(state: dict) -> tuple[int, ...]:
    """Units per stage, read from which body units change width (they have a conv shortcut)."""
    n = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("body.")), default=-1)
    widths = [state[f"body.{i}.res_layer.1.weight"].shape[0] for i in range(n) if f"body.{i}.res_layer.1.weight" in state]
    return tuple(widths.count(w) for w in WIDTHS)


class CurricularFaceIR(FaceRecognizer):
    """CurricularFace IR-50 / IR-101: 112x112 RGB chips -> 512-d embeddings."""

    input_size = 112
    embedding_dim = 512

    def __init__(self, units: tuple[int, ...] = DEPTHS[100], affine_features: bool = False) -> None:
        super().__init__()
        depth = {v: k for k, v in DEPTHS.items()}.get(tuple(units))
        self.name = f"curricularface-ir{depth}" if depth else f"curricularface-ir{'-'.join(map(str, units))}"
        self.template.copy_(ARCFACE_TEMPLATE_112)
        self.backbone = IRBackbone(tuple(units), affine_features)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "CurricularFaceIR":
        path = Path(path).expanduser()
        hint = "pass CurricularFace's IR-101 backbone (e.g. glint360k_curricular_face_r101_backbone.bin)"
        state = torch_state_dict(path, "CurricularFace checkpoint", hint)
        units = _units(state)
        if not all(units):
            raise IproError(f"CurricularFace checkpoint {path} has no IR body (units per stage {units}); {hint}")
        model = cls(units, affine_features="output_layer.4.weight" in state)
        try:
            result = model.backbone.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a tensor of the wrong shape
            raise IproError(f"CurricularFace checkpoint {path} does not match the IR backbone ({str(e).splitlines()[1].strip()[:160]}); {hint}") from None
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            bad = (missing or result.unexpected_keys)[0]
            raise IproError(f"CurricularFace checkpoint {path} does not match the IR backbone ({'missing' if missing else 'unexpected'} {bad}); {hint}")
        return model.eval()  # BatchNorm must use the stored statistics

    def embed_chips(self, chips: torch.Tensor) -> torch.Tensor:
        x = chips.to(self.backbone.input_layer[0].weight.dtype)
        return self.backbone((x - 0.5) / 0.5)
