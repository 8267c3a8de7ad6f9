"""Face toolkit: detection (MTCNN), alignment, recognition (dlib ResNet, ArcFace) and
the batched, differentiable `FaceEmbedder` that rewards and metrics build on."""

from ipro.faces.types import Detections

__all__ = ["Detections"]
