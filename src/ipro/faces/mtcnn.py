"""Batched MTCNN face detector (Zhang et al., 2016) in plain PyTorch.

Runs the pretrained P-, R- and O-Net weights shipped by facenet-pytorch 2.6.0 (MIT),
with every stage batched: P-Net once per pyramid scale over all images, R-Net and O-Net
once over the candidate crops of all images together. Box arithmetic (integer crops
[trunc(x1) - 1, trunc(x2)), +1 widths in box regression and the final 'min' NMS) follows
the original MATLAB release that the weights were trained with.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ipro.errors import IproError
from ipro.faces.types import Detections

# Inputs slightly outside [0, 1] (resampling overshoot, bf16 rounding) are clamped.
_RANGE_TOLERANCE = 1e-2
# Largest (groups x boxes x boxes) overlap block NMS builds at once (~16 MB of float32).
_NMS_BLOCK = 1 << 22
# Crops resampled at once (at 48x48, ~55 MB per float64 gather).
_CROP_CHUNK = 2048


def _normalize(x255: torch.Tensor, net: nn.Module) -> torch.Tensor:
    # channels_last: the nets' small convolutions run ~2x faster on CPU in this layout.
    # The nets may be cast to bfloat16 (faster on CPUs with bf16 units); geometry and
    # NMS stay in float32, so only the conv stacks run at low precision.
    x = (x255 - 127.5) * 0.0078125
    return x.to(net.conv1.weight.dtype).contiguous(memory_format=torch.channels_last)


def _flatten_caffe(x: torch.Tensor) -> torch.Tensor:
    # The dense weights were converted from Caffe, which flattens in (W, H, C) order.
    return x.permute(0, 3, 2, 1).flatten(1)


class PNet(nn.Module):
    """Fully convolutional proposal net: a 12x12 window per output cell, stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns face probability (N, h, w) and box offsets (N, 4, h, w)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_1(x).float().softmax(1)[:, 1], self.conv4_2(x).float()


class RNet(nn.Module):
    """Refines 24x24 crops: face probability (K,) and box offsets (K, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu4(self.dense4(_flatten_caffe(self.prelu3(self.conv3(x)))))
        return self.dense5_1(x).float().softmax(1)[:, 1], self.dense5_2(x).float()


class ONet(nn.Module):
    """Scores 48x48 crops: probability (K,), box offsets (K, 4), landmarks (K, 10) as
    five x then five y, relative to the crop."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu5(self.dense5(_flatten_caffe(self.prelu4(self.conv4(x)))))
        return self.dense6_1(x).float().softmax(1)[:, 1], self.dense6_2(x).float(), self.dense6_3(x).float()


class MTCNN(nn.Module):
    """Three-stage cascade face detector with 5-point landmarks.

    Args:
        min_face_size: smallest face side, in pixels, the image pyramid looks for.
        thresholds: probability each stage (P-, R-, O-Net) needs to pass a candidate.
        factor: scale step between pyramid levels.
        min_score: faces scoring below this after the last stage are dropped.
        max_candidates: P-Net windows kept per image (highest probability first), per
            pyramid level and again across levels; bounds time and memory on big or
            busy frames without touching ordinary ones.
    """

    def __init__(
        self,
        min_face_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        min_score: float = 0.0,
        max_candidates: int = 2000,
    ) -> None:
        super().__init__()
        if min_face_size <= 0:
            raise ValueError(f"min_face_size must be positive, got {min_face_size}")
        if len(thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(f"thresholds must be three probabilities (P-, R-, O-Net), got {thresholds}")
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be at least 1, got {max_candidates}")
        self.min_face_size = min_face_size
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = factor
        self.min_score = min_score
        self.max_candidates = max_candidates
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        self.requires_grad_(False).eval()

    @classmethod
    def from_files(cls, pnet: str | Path, rnet: str | Path, onet: str | Path, **kw) -> "MTCNN":
        """Build from three state-dict files (facenet-pytorch's pnet.pt, rnet.pt, onet.pt)."""
        model = cls(**kw)
        for name, net, path in (("pnet", model.pnet, pnet), ("rnet", model.rnet, rnet), ("onet", model.onet, onet)):
            path = Path(path)
            hint = f"pass facenet-pytorch 2.6.0's data/{name}.pt (`pip install --no-deps facenet-pytorch==2.6.0`)"
            if not path.is_file():
                raise IproError(f"MTCNN {name} weights file {path} is missing; {hint}")
            try:
                net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as e:  # unpickling and key/shape mismatches raise many types
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise IproError(f"{path} is not a valid MTCNN {name} state dict ({reason}); {hint}") from e
        return model.to(memory_format=torch.channels_last)

    @classmethod
    def from_package(cls, **kw) -> "MTCNN":
        """Build from the weights inside the installed facenet-pytorch package."""
        from ipro.faces.weights import mtcnn_weights

        return cls.from_files(mtcnn_weights("pnet"), mtcnn_weights("rnet"), mtcnn_weights("onet"), **kw)

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> list[Detections]:
        """Faces in each image of a (N, 3, H, W) float RGB batch in [0, 1].

        Returns one `Detections` per image, on the input's device, sorted by score
        (highest first); an image without faces gets an empty one.
        """
        x = self._check(images)
        n = x.shape[0]
        if n == 0:
            return []
        boxes, img = self._propose(x)
        scores, landmarks = boxes.new_zeros(0), boxes.new_zeros(0, 5, 2)
        if len(boxes):
            # Summed-area tables make every crop's area resampling a few gathers.
            integral = F.pad(x.permute(0, 2, 3, 1).double().cumsum(1).cumsum(2), (0, 0, 1, 0, 1, 0))
            boxes, scores, img = self._refine(integral, boxes, img)
        if len(boxes):
            boxes, scores, landmarks, img = self._output(integral, boxes, img)
        keep = scores >= self.min_score
        boxes, scores, landmarks, img = boxes[keep], scores[keep], landmarks[keep], img[keep]
        # NMS returns candidates grouped by image, best first, so a split suffices.
        counts = torch.bincount(img, minlength=n).tolist()
        return [
            Detections(b, s, p) if len(b) else Detections.empty(x.device)
            for b, s, p in zip(boxes.split(counts), scores.split(counts), landmarks.split(counts))
        ]

    @torch.no_grad()
    def detect_video(
        self, frames: torch.Tensor, keyframe_every: int = 8, margin: float = 0.1, confirm_score: float = 0.0
    ) -> list[Detections]:
        """Faces in consecutive frames of ONE video, mostly without the image pyramid.

        The full cascade runs on every `keyframe_every`-th frame. On the frames in
        between, O-Net alone re-examines the nearest earlier keyframe's faces (boxes
        squared and grown by `margin` on each side) and refines them, which is what the
        cascade's last stage would do anyway. A frame where O-Net does not confirm every
        tracked face, or whose keyframe had none, gets the full cascade, so faces that
        leave are not invented; a face that *enters* between keyframes is found at the
        next keyframe. A tracked face counts as confirmed only with an O-Net score of at
        least `confirm_score` (pass the threshold you will filter with). Returns one
        `Detections` per frame, like `detect`.
        """
        if keyframe_every < 1:
            raise ValueError(f"keyframe_every must be at least 1, got {keyframe_every}")
        x = self._check(frames)
        n = x.shape[0]
        keys = list(range(0, n, keyframe_every))
        out: list[Detections | None] = [None] * n
        for k, det in zip(keys, self.detect(frames[keys])):
            out[k] = det
        boxes, img, expected = [], [], {}
        for k in keys:
            tracked = out[k]
            for f in range(k + 1, min(k + keyframe_every, n)):
                if len(tracked):
                    side = (tracked.boxes[:, 2:] - tracked.boxes[:, :2]).amax(1, keepdim=True)
                    boxes.append(_square(tracked.boxes) + side * margin * x.new_tensor([-1.0, -1.0, 1.0, 1.0]))
                    img.append(torch.full((len(tracked),), f, dtype=torch.long, device=x.device))
                    expected[f] = len(tracked)
        redo = [f for f in range(n) if out[f] is None and f not in expected]
        if boxes:
            integral = F.pad(x.permute(0, 2, 3, 1).double().cumsum(1).cumsum(2), (0, 0, 1, 0, 1, 0))
            b, s, p, i = self._output(integral, torch.cat(boxes), torch.cat(img))
            keep = s >= max(self.min_score, confirm_score)
            b, s, p, i = b[keep], s[keep], p[keep], i[keep]
            counts = torch.bincount(i, minlength=n).tolist()
            for f, bb, ss, pp in zip(range(n), b.split(counts), s.split(counts), p.split(counts)):
                if f in expected:
                    if counts[f] == expected[f]:
                        out[f] = Detections(bb, ss, pp)
                    else:
                        redo.append(f)
        if redo:
            redo.sort()
            for f, det in zip(redo, self.detect(frames[redo])):
                out[f] = det
        return out

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        """Validated images as float32 in [0, 255] (the nets' pixel units)."""
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor (N, 3, H, W), got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a (N, 3, H, W) RGB batch, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(
                f"images must be float RGB in [0, 1], got dtype {images.dtype}; convert uint8 pixels with x.float() / 255"
            )
        weight = self.pnet.conv1.weight
        if weight.device != images.device:
            raise ValueError(f"images are on {images.device} but the MTCNN weights on {weight.device}; call .to({images.device}) on the detector")
        x = images.detach().float()
        if x.numel():
            if not torch.isfinite(x).all():
                raise ValueError("images contain NaN or infinite values")
            lo, hi = (float(v) for v in x.aminmax())
            if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
                raise ValueError(
                    f"images must be RGB in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
                    "divide 0..255 pixels by 255, map [-1, 1] with (x + 1) / 2"
                )
        return x.clamp(0, 1) * 255

    def _scales(self, h: int, w: int) -> list[float]:
        scale = 12.0 / self.min_face_size
        side = min(h, w) * scale
        scales = []
        while side >= 12:
            scales.append(scale)
            scale *= self.factor
            side *= self.factor
        return scales

    def _propose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """P-Net over the pyramid: square candidate boxes (K, 4) and their image index."""
        n, _, h, w = x.shape
        boxes, scores, offsets, img, level = [], [], [], [], []
        corner = x.new_tensor([1.0, 1.0, 12.0, 12.0])  # 12x12 cell, 1-based like the original
        for i, scale in enumerate(self._scales(h, w)):
            level_img = F.interpolate(x, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            prob, reg = self.pnet(_normalize(level_img, self.pnet))
            b, r, c = (prob >= self.thresholds[0]).nonzero(as_tuple=True)
            score = prob[b, r, c]
            top = _top_per_group(score, b, self.max_candidates)
            b, r, c, score = b[top], r[top], c[top], score[top]
            cells = torch.stack([c, r, c, r], 1).to(x.dtype) * 2 + corner
            boxes.append((cells / scale).floor())
            scores.append(score)
            offsets.append(reg[b, :, r, c])
            img.append(b)
            level.append(torch.full_like(b, i))
        if not boxes:
            return x.new_zeros(0, 4), torch.zeros(0, dtype=torch.long, device=x.device)
        boxes, scores, offsets, img, level = map(torch.cat, (boxes, scores, offsets, img, level))
        keep = _nms(boxes, scores, level * n + img, 0.5)
        keep = keep[_top_per_group(scores[keep], img[keep], self.max_candidates)]
        keep = keep[_nms(boxes[keep], scores[keep], img[keep], 0.7)]
        boxes, offsets, img = boxes[keep], offsets[keep], img[keep]
        return _square(_regress(boxes, offsets, plus_one=False)), img

    def _refine(self, integral: torch.Tensor, boxes: torch.Tensor, img: torch.Tensor):
        """R-Net: drops non-faces, returns refined square boxes, scores, image index."""
        boxes, img = _drop_empty(boxes, img)
        prob, reg = self.rnet(_normalize(_crop_resize(integral, boxes, img, 24), self.rnet))
        keep = prob > self.thresholds[1]
        boxes, prob, reg, img = boxes[keep], prob[keep], reg[keep], img[keep]
        keep = _nms(boxes, prob, img, 0.7)
        return _square(_regress(boxes[keep], reg[keep], plus_one=True)), prob[keep], img[keep]

    def _output(self, integral: torch.Tensor, boxes: torch.Tensor, img: torch.Tensor):
        """O-Net: final boxes, scores, landmarks (K, 5, 2) and image index."""
        boxes, img = _drop_empty(boxes, img)
        prob, reg, points = self.onet(_normalize(_crop_resize(integral, boxes, img, 48), self.onet))
        keep = prob > self.thresholds[2]
        boxes, prob, reg, points, img = boxes[keep], prob[keep], reg[keep], points[keep], img[keep]
        size = boxes[:, 2:] - boxes[:, :2] + 1
        landmarks = torch.stack([points[:, :5], points[:, 5:]], -1) * size[:, None] + boxes[:, None, :2] - 1
        boxes = _regress(boxes, reg, plus_one=True)
        keep = _nms(boxes, prob, img, 0.7, mode="min")
        return boxes[keep], prob[keep], landmarks[keep], img[keep]


def _regress(boxes: torch.Tensor, offsets: torch.Tensor, plus_one: bool) -> torch.Tensor:
    size = boxes[:, 2:] - boxes[:, :2] + (1.0 if plus_one else 0.0)
    return boxes + offsets * size.repeat(1, 2)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow each box to a square around its centre (the nets expect square crops)."""
    size = boxes[:, 2:] - boxes[:, :2]
    side = size.amax(1, keepdim=True)
    corner = boxes[:, :2] + (size - side) / 2
    return torch.cat([corner, corner + side], 1)


def _drop_empty(boxes: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Degenerate boxes (regression flipped them) would give crops with no pixels."""
    keep = (boxes[:, 2:].trunc() >= boxes[:, :2].trunc()).all(1)
    return boxes[keep], img[keep]


def _crop_resize(integral: torch.Tensor, boxes: torch.Tensor, img: torch.Tensor, size: int) -> torch.Tensor:
    """Crops resampled to (K, 3, size, size) exactly as F.interpolate(mode="area") would
    resample each crop after zero-padding where it leaves the image.

    integral: (N, H + 1, W + 1, 3) float64 summed-area tables of the [0, 255] images.
    The crop of box (x1, y1, x2, y2) spans pixels [trunc(x1) - 1, trunc(x2)) (the
    original's 1-based inclusive crop); area resampling averages, for each output pixel,
    the input pixels [floor(i * L / size), ceil((i + 1) * L / size)).
    """
    if len(boxes) > _CROP_CHUNK:  # bounds the float64 gathers on big batches
        parts = zip(boxes.split(_CROP_CHUNK), img.split(_CROP_CHUNK))
        return torch.cat([_crop_resize(integral, b, i, size) for b, i in parts])
    h, w = integral.shape[1] - 1, integral.shape[2] - 1
    start = boxes[:, :2].trunc().long() - 1  # (K, 2) x, y
    length = boxes[:, 2:].trunc().long() - start
    i = torch.arange(size + 1, device=boxes.device)
    lo = start[:, :, None] + (i[:-1] * length[:, :, None]) // size  # (K, 2, size)
    hi = start[:, :, None] + (i[1:] * length[:, :, None] + size - 1) // size
    count = (hi[:, 0, None, :] - lo[:, 0, None, :]) * (hi[:, 1, :, None] - lo[:, 1, :, None])  # (K, y, x)
    # Clamping to the image leaves out the zero padding from the sums, not from the count.
    x0, y0 = lo[:, 0].clamp(0, w)[:, None, :], lo[:, 1].clamp(0, h)[:, :, None]
    x1, y1 = hi[:, 0].clamp(0, w)[:, None, :], hi[:, 1].clamp(0, h)[:, :, None]
    b = img[:, None, None]
    total = integral[b, y1, x1] - integral[b, y0, x1] - integral[b, y1, x0] + integral[b, y0, x0]
    return (total / count[..., None]).permute(0, 3, 1, 2).float()


def _group_order(scores: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order by group, then score (highest first); compact group id and rank within it."""
    order = scores.argsort(descending=True, stable=True)
    order = order[groups[order].argsort(stable=True)]
    _, group = torch.unique_consecutive(groups[order], return_inverse=True)
    counts = torch.bincount(group)
    rank = torch.arange(len(order), device=order.device) - (counts.cumsum(0) - counts)[group]
    return order, group, rank


def _top_per_group(scores: torch.Tensor, groups: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best-scoring entries of each group."""
    if len(scores) <= k:
        return torch.arange(len(scores), device=scores.device)
    order, _, rank = _group_order(scores, groups)
    return order[rank < k]


def _overlap(boxes: torch.Tensor, mode: str) -> torch.Tensor:
    """(G, K, K) pairwise overlap of (G, K, 4) boxes: IoU, or intersection over the
    smaller area for "min" (which, like the original's last stage, counts +1 pixel)."""
    pad = 1.0 if mode == "min" else 0.0
    x1, y1, x2, y2 = (t.unsqueeze(2) for t in boxes.unbind(-1))
    area = (x2 - x1 + pad) * (y2 - y1 + pad)
    iw = (torch.minimum(x2, x2.mT) - torch.maximum(x1, x1.mT) + pad).clamp_min(0)
    ih = (torch.minimum(y2, y2.mT) - torch.maximum(y1, y1.mT) + pad).clamp_min(0)
    inter = iw * ih
    denom = torch.minimum(area, area.mT) if mode == "min" else area + area.mT - inter
    return inter / denom.clamp_min(1e-6)


def _nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, threshold: float, mode: str = "union") -> torch.Tensor:
    """Greedy non-maximum suppression within each group, all groups at once.

    Returns kept indices ordered by group, then score (highest first). Boxes are laid
    out as a padded (groups, K) grid; "keep j unless an earlier kept box overlaps it"
    is iterated to its fixed point, which is exactly the greedy result (after t rounds
    the first t boxes of each group are settled) and usually takes a few rounds.
    """
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order, group, rank = _group_order(scores, groups)
    n_groups, k = int(group[-1]) + 1, int(rank.max()) + 1
    grid = boxes.new_zeros(n_groups, k, 4)
    grid[group, rank] = boxes[order]
    valid = torch.zeros(n_groups, k, dtype=torch.bool, device=boxes.device)
    valid[group, rank] = True
    earlier = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(1)  # [i, j]: i before j
    kept = torch.zeros_like(valid)
    step = max(1, _NMS_BLOCK // (k * k))
    for a in range(0, n_groups, step):
        suppresses = (_overlap(grid[a : a + step], mode) > threshold) & earlier
        alive = valid[a : a + step]
        while True:
            new = valid[a : a + step] & ~(suppresses & alive[:, :, None]).any(1)
            if torch.equal(new, alive):
                break
            alive = new
        kept[a : a + step] = alive
    return order[kept[group, rank]]
