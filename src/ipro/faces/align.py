"""Differentiable 5-point face alignment.

A least-squares similarity transform (Umeyama) maps detected landmarks onto the
recognizer's template; the face is then resampled with `affine_grid`/`grid_sample`, so
gradients flow from the chip back to the input pixels. Landmarks come from the
detector under no_grad and are treated as constants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# (x, y) in output pixels. Order: left eye, right eye, nose, left mouth, right mouth.
ARCFACE_TEMPLATE_112 = torch.tensor(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
# dlib's 150x150 chip with padding 0.25, the same five points taken from dlib's mean face.
DLIB_TEMPLATE_150 = torch.tensor(
    [[47.549, 46.599], [100.476, 46.599], [74.013, 76.562], [50.415, 103.023], [97.610, 103.023]]
)


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation) from src to dst.

    src: (N, K, 2) points, dst: (K, 2) or (N, K, 2). Returns (N, 2, 3) matrices M with
    dst ~= M[:, :, :2] @ src + M[:, :, 2]. Umeyama's closed form, reflection excluded.
    """
    src = src.to(torch.float64)
    dst = dst.to(torch.float64).expand_as(src)
    mu_s, mu_d = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    s, d = src - mu_s, dst - mu_d
    # For 2-D similarity the optimum has a closed form in terms of two sums.
    a = (s * d).sum((1, 2))  # sum(sx*dx + sy*dy)
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(1)  # sum(sx*dy - sy*dx)
    var = (s**2).sum((1, 2)).clamp_min(1e-12)
    c, si = a / var, b / var  # scale*cos, scale*sin
    rot = torch.stack([torch.stack([c, -si], -1), torch.stack([si, c], -1)], -2)  # (N, 2, 2)
    t = mu_d.squeeze(1) - (rot @ mu_s.transpose(1, 2)).squeeze(-1)
    return torch.cat([rot, t.unsqueeze(-1)], -1).to(torch.float32)


def warp_faces(
    images: torch.Tensor,
    image_index: torch.Tensor,
    landmarks: torch.Tensor,
    template: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """Cut aligned face chips out of a batch of images, differentiably.

    images: (B, 3, H, W) float; image_index: (N,) which image each face is in;
    landmarks: (N, 5, 2) in image pixels; template: (5, 2) in chip pixels.
    Returns (N, 3, size, size) in the dtype of `images`.
    """
    n = landmarks.shape[0]
    _, c, h, w = images.shape
    if n == 0:
        return images.new_zeros(0, c, size, size)
    m = similarity_transform(landmarks.detach().float().cpu(), template.float().cpu()).to(images.device)
    # Invert image->chip to get chip->image, then convert both pixel frames to the
    # [-1, 1] normalized frame grid_sample uses (align_corners=False: pixel centres).
    rot, t = m[:, :, :2], m[:, :, 2:]
    inv_rot = torch.linalg.inv(rot)
    inv = torch.cat([inv_rot, -inv_rot @ t], -1)  # chip pixel -> image pixel
    out_to_px = torch.tensor([[size / 2, 0, size / 2 - 0.5], [0, size / 2, size / 2 - 0.5], [0, 0, 1]], device=images.device)
    px_to_in = torch.tensor([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]], device=images.device)
    inv3 = torch.cat([inv, inv.new_tensor([0, 0, 1]).expand(n, 1, 3)], 1)
    theta = (px_to_in @ inv3 @ out_to_px)[:, :2]
    # Resample in at least float32 (half-precision grids lose sub-pixel accuracy), and in
    # float64 when the images are, so finite-difference checks stay exact.
    work = torch.promote_types(images.dtype, torch.float32)
    src = images[image_index].to(work)
    grid = F.affine_grid(theta.to(work), [n, c, size, size], align_corners=False)
    chips = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return chips.to(images.dtype)
