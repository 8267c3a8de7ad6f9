"""Training-time logging: accelerate's trackers (`trackers`) and a reward-hacking monitor
(`HackingMonitor`): how many rollouts have a frozen ("copy-paste") face.

Every `run.log_every` steps the trainer hands over the frames its method already decoded
(IPRO's reward frames, GRPO's group videos), and this logs, beside reward and KL:

- hacking/rigid_rate: the share of the step's videos whose main (largest) face is rigid,
  judged by exactly the measure `ipro eval` reports (`ipro.eval.rigid`: landmark motion
  after removing head pose, and aligned-chip appearance change, both below thresholds);
  videos with fewer than `rigid.MIN_FACE_FRAMES` face frames are not judged.
- hacking/face_coverage: the share of frames with a detected face.
- hacking/judged: how many videos the rate is over.

It runs without gradient on detached frames. When the rigid rate rises above
`run.rigid_warn_rate`, it prints one warning line, once per run.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ipro.errors import IproError
from ipro.eval import identity, rigid


def trackers(log_with: list[str], output_dir: Path) -> list[str]:
    """accelerate trackers for run.log_with. wandb never needs the network: without an API key
    or WANDB_MODE it runs offline and writes its run folder under output_dir/wandb
    (`wandb sync` uploads it later)."""
    if "wandb" in log_with:
        if importlib.util.find_spec("wandb") is None:
            raise IproError("run.log_with: wandb is not installed; `pip install wandb` or log with tensorboard")
        if "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_DIR", str(output_dir))
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    return list(log_with)


class HackingMonitor:
    def __init__(self, threshold: float, embedder=None, device="cpu") -> None:
        self.threshold = threshold
        self._embedder = embedder
        self.device = device
        self.warned = False

    @property
    def embedder(self):
        if self._embedder is None:  # the reward has none (a learned or feature reward): dlib's, built once
            from ipro.faces.embedder import FaceEmbedder

            self._embedder = FaceEmbedder("dlib").to(self.device)
        return self._embedder

    @torch.no_grad()
    def __call__(self, videos: list[torch.Tensor], step: int | None = None) -> dict[str, float]:
        """videos: (B, F, 3, H, W) tensors in [0, 1]; returns the hacking/* scalars."""
        verdicts, covered, frames_seen = [], 0, 0
        for batch in videos:
            uint8 = (batch.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()
            for frames in uint8:
                faces = identity.embed_frames(self.embedder, frames)
                covered += int(faces.has_face.sum())
                frames_seen += len(frames)
                r = rigid.rigid_face(frames, faces, rigid.main_face_per_frame(faces, None))
                if r["rigid"] is not None:
                    verdicts.append(r["rigid"])
        rate = float(np.mean(verdicts)) if verdicts else float("nan")
        if verdicts and rate > self.threshold and not self.warned:
            self.warned = True
            at = f" at step {step}" if step is not None else ""
            print(f"warning: reward hacking{at}: {rate:.0%} of rollouts have a rigid (copy-paste) face, above run.rigid_warn_rate="
                  f"{self.threshold:g}; raise kl.weight, use reward.mode: pool, or stop at an earlier checkpoint", file=sys.stderr)
        return {
            "hacking/rigid_rate": rate,
            "hacking/face_coverage": covered / frames_seen if frames_seen else float("nan"),
            "hacking/judged": float(len(verdicts)),
        }
