"""ipro: keep people who they are in image-to-video diffusion models."""

__version__ = "0.1.0"
