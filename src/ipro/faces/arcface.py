"""arcface_torch's IResNet-50/100 (insightface), loaded from a user's `backbone.pth`.

The ArcFace weights are not redistributable with ipro (insightface's models are for
non-commercial research), so the user points at their own checkpoint. The network is
written out here with the same module names as arcface_torch's `iresnet.py`, so its
state dict loads as is: conv1, bn1, prelu, layer1..4 of IBasicBlock, bn2, dropout,
fc, features. 112x112 RGB chips normalized to [-1, 1] -> 512-d embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ipro.errors import IproError
from ipro.faces.align import ARCFACE_TEMPLATE_112
from ipro.faces.recognizer import FaceRecognizer
from ipro.faces.weights import torch_state_dict

DEPTHS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv -> BN -> PReLU -> conv(stride) -> BN, plus the (downsampled) input.
    There is no activation after the addition (the "improved" residual unit)."""

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3x3(cin, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """arcface_torch's IResNet for 112x112 input (four stride-2 stages -> 7x7x512)."""

    def __init__(self, layers: tuple[int, int, int, int], num_features: int = 512) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        cin = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            stage = [IBasicBlock(cin, planes, stride=2)] + [IBasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
            cin = planes
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=0.0)  # arcface_torch's default; kept for the module list
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def _blocks_per_stage(keys) -> tuple[int, ...]:
    """How many IBasicBlocks each of layer1..4 has, from keys like 'layer3.13.conv1.weight'."""
    counts = []
    for i in range(1, 5):
        idx = {int(k.split(".")[1]) for k in keys if k.startswith(f"layer{i}.") and k.split(".")[1].isdigit()}
        counts.append(max(idx) + 1 if idx else 0)
    return tuple(counts)


class ArcFaceIResNet(FaceRecognizer):
    """ArcFace IResNet-50/100: 112x112 RGB chips -> 512-d embeddings."""

    input_size = 112
    embedding_dim = 512

    def __init__(self, depth: int = 50) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"IResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        self.depth = depth
        self.name = f"arcface-iresnet{depth}"
        self.template.copy_(ARCFACE_TEMPLATE_112)
        self.backbone = IResNet(DEPTHS[depth])

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ArcFaceIResNet:
        path = Path(path)
        hint = "pass an arcface_torch IResNet-50/100 backbone.pth"
        state = torch_state_dict(path, "ArcFace checkpoint", hint)
        depth = {v: k for k, v in DEPTHS.items()}.get(_blocks_per_stage(state))
        if depth is None:
            raise IproError(
                f"ArcFace checkpoint {path} is not an IResNet-50/100 (blocks per stage "
                f"{_blocks_per_stage(state)}, expected {DEPTHS[50]} or {DEPTHS[100]}); {hint}"
            )
        model = cls(depth)
        expected = model.backbone.state_dict()
        # num_batches_tracked only counts training steps; older checkpoints may lack it.
        missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in expected]
        wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            detail = "; ".join(
                f"{what} {keys[0]}" + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if keys
            )
            raise IproError(f"ArcFace checkpoint {path} does not match IResNet-{depth} ({detail}); {hint}")
        model.backbone.load_state_dict(state, strict=False)
        return model.eval()  # BatchNorm must use the stored statistics

    def embed_chips(self, chips: torch.Tensor) -> torch.Tensor:
        x = chips.to(self.backbone.conv1.weight.dtype)
        return self.backbone((x - 0.5) / 0.5)
