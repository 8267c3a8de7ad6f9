"""Face edits for synthetic preference pairs: donor faces of other people, and distortions
that paste, blend, warp or duplicate a face along a clip using its 5 landmarks per frame
(see `ipro.data.pairs` for how pairs are built from them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ipro.data.video import to_tensor


# --- Faces to paste ------------------------------------------------------------------


@dataclass
class Donor:
    """A face of another person: an RGB image (H, W, 3) uint8 and its 5 landmarks."""

    name: str
    image: np.ndarray
    landmarks: np.ndarray  # (5, 2) x, y


def detect_donors(images: dict[str, np.ndarray], embedder=None) -> list[Donor]:
    """The largest face of each image as a donor; images without a face are skipped."""
    from ipro.faces.embedder import FaceEmbedder

    embedder = embedder or FaceEmbedder()
    donors = []
    for name, img in images.items():
        x = to_tensor(img)[None]
        (det,) = embedder.detect(x)
        if len(det):
            size = (det.boxes[:, 2:] - det.boxes[:, :2]).prod(1)
            donors.append(Donor(name, img, det.landmarks[int(size.argmax())].numpy().astype(np.float32)))
    return donors


def builtin_donor_images() -> dict[str, np.ndarray]:
    """Faces that ship with scikit-image: astronaut, cameraman, the 100 LFW faces (4x)."""
    import cv2

    from ipro.data.video import read_image
    from ipro.faces.weights import package_file

    out = {"astronaut": read_image(package_file("skimage", "data", "astronaut.png")),
           "cameraman": read_image(package_file("skimage", "data", "camera.png"))}
    # lfw_subset: 100 faces then 100 non-faces, 25x25 grey; upscaled so MTCNN finds them.
    lfw = np.load(package_file("skimage", "data", "lfw_subset.npy"))[:100]
    for i, face in enumerate(lfw):
        big = cv2.resize((face * 255).astype(np.uint8), (100, 100), interpolation=cv2.INTER_CUBIC)
        out[f"lfw{i:03d}"] = np.repeat(big[..., None], 3, axis=2)
    return out


# --- Distortions -------------------------------------------------------------------------
# All work on uint8 (F, H, W, 3) frames with per-frame landmarks (F, 5, 2) of one person.

# dlib's 150x150 chip template (see ipro.faces.align) and a face ellipse in that frame,
# brows to chin.
_TEMPLATE = np.array([[47.549, 46.599], [100.476, 46.599], [74.013, 76.562], [50.415, 103.023], [97.610, 103.023]], np.float32)
_FACE_ELLIPSE = ((74, 84), (42, 54))  # centre, semi-axes in template pixels


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 similarity matrix taking points src (5, 2) onto dst (5, 2)."""
    import torch

    from ipro.faces.align import similarity_transform

    return similarity_transform(torch.from_numpy(src[None]).float(), torch.from_numpy(dst).float())[0].numpy()


def face_mask(shape: tuple[int, int], landmarks: np.ndarray) -> np.ndarray:
    """(H, W) float32 in [0, 1]: a feathered ellipse over the face with these landmarks."""
    import cv2

    canvas = np.zeros((150, 150), np.float32)
    cv2.ellipse(canvas, _FACE_ELLIPSE[0], _FACE_ELLIPSE[1], 0, 0, 360, 1.0, -1)
    canvas = cv2.GaussianBlur(canvas, (0, 0), 6.0)  # feather, in template pixels
    m = _similarity(_TEMPLATE, landmarks)
    return cv2.warpAffine(canvas, m, (shape[1], shape[0]), flags=cv2.INTER_LINEAR)


def paste_face(frame: np.ndarray, landmarks: np.ndarray, donor: Donor, alpha: float = 1.0) -> np.ndarray:
    """The donor's face aligned onto `landmarks` in `frame`, colour-matched, mixed in by alpha."""
    import cv2

    if alpha <= 0:
        return frame
    h, w = frame.shape[:2]
    m = _similarity(donor.landmarks, landmarks)
    warped = cv2.warpAffine(donor.image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT).astype(np.float32)
    mask = face_mask((h, w), landmarks)
    inside = mask > 0.5
    target = frame.astype(np.float32)
    if inside.sum() > 8:
        # Match each channel's mean and spread to the face it covers (grey donors get skin tones).
        mu_d, sd_d = warped[inside].mean(0), warped[inside].std(0) + 1e-3
        mu_t, sd_t = target[inside].mean(0), target[inside].std(0) + 1e-3
        warped = (warped - mu_d) * np.clip(sd_t / sd_d, 0.5, 2.0) + mu_t
    a = (alpha * mask)[..., None]
    return np.clip(target * (1 - a) + warped * a, 0, 255).round().astype(np.uint8)


def warp_face(frame: np.ndarray, landmarks: np.ndarray, amount: float) -> np.ndarray:
    """Change the face's proportions: wider and flatter around its centre by `amount` (0..~0.5)."""
    import cv2

    if amount <= 0:
        return frame
    h, w = frame.shape[:2]
    centre = landmarks.mean(0)
    radius = max(2.0, float(np.linalg.norm(landmarks[1] - landmarks[0]))) * 1.2
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xs - centre[0], ys - centre[1]
    weight = np.exp(-(dx**2 + dy**2) / (2 * radius**2))
    # Sampling closer to the centre magnifies: horizontally by amount, vertically squashed.
    map_x = centre[0] + dx * (1 - amount * weight)
    map_y = centre[1] + dy * (1 + 0.5 * amount * weight)
    return cv2.remap(frame, map_x.astype(np.float32), map_y.astype(np.float32), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def photometric(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same video with another exposure, contrast, gamma and maybe a slight blur."""
    import cv2

    x = frames.astype(np.float32) / 255
    gain, shift, gamma = rng.uniform(0.85, 1.15), rng.uniform(-0.06, 0.06), rng.uniform(0.85, 1.15)
    x = np.clip((x - 0.5) * gain + 0.5 + shift, 0, 1) ** gamma
    out = (x * 255).round().astype(np.uint8)
    if rng.random() < 0.5:
        out = np.stack([cv2.GaussianBlur(f, (0, 0), 0.6) for f in out])
    return out


def identity_swap(frames, landmarks, donor: Donor, onset: int) -> np.ndarray:
    return np.stack([paste_face(f, landmarks[i], donor) if i >= onset else f for i, f in enumerate(frames)])


def progressive_blend(frames, landmarks, donor: Donor, strength: float, onset: int = 1) -> np.ndarray:
    span = max(1, len(frames) - 1 - onset)
    alphas = [strength * min(1.0, max(0.0, (i - onset + 1) / span)) if i >= onset else 0.0 for i in range(len(frames))]
    return np.stack([paste_face(f, landmarks[i], donor, a) for i, (f, a) in enumerate(zip(frames, alphas))])


def progressive_warp(frames, landmarks, strength: float, onset: int = 1) -> np.ndarray:
    span = max(1, len(frames) - 1 - onset)
    amounts = [strength * min(1.0, (i - onset + 1) / span) if i >= onset else 0.0 for i in range(len(frames))]
    return np.stack([warp_face(f, landmarks[i], a) for i, (f, a) in enumerate(zip(frames, amounts))])


def identity_flicker(frames, landmarks, donor: Donor, rng: np.random.Generator, fraction: float = 0.4) -> np.ndarray:
    n = len(frames) - 1  # frame 0 is the input image: never touched
    k = max(1, round(fraction * n))
    hit = set((1 + rng.choice(n, size=k, replace=False)).tolist())
    return np.stack([paste_face(f, landmarks[i], donor) if i in hit else f for i, f in enumerate(frames)])


def duplicate_person(frames, landmarks_src, landmarks_dst, onset: int) -> np.ndarray:
    """Person dst shows person src's face (taken from the same frame) from `onset` on."""
    out = []
    for i, f in enumerate(frames):
        if i >= onset:
            f = paste_face(f, landmarks_dst[i], Donor("self", f.copy(), landmarks_src[i]))
        out.append(f)
    return np.stack(out)
