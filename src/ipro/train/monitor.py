"""Training-time logging: accelerate's trackers (`trackers`) and a reward-hacking monitor
(`HackingMonitor`): how many rollouts have a frozen ("copy-paste") face.

Every `run.log_every` steps the trainer hands over the frames its method already decoded
(IPRO's reward frames, GRPO's group videos), and this logs, beside reward and KL:

- hacking/rigid_rate: the share of the step's videos whose main (largest) face is rigid,
  judged by exactly the measure `ipro eval` reports (`ipro.eval.rigid`: landmark motion
  after removing head pose, and aligned-chip appearance change, both below thresholds);
  videos with fewer than `rigid.MIN_FACE_FRAMES` face frames are not judged.
- hacking/rigid_rate_start and hacking/rigid_rate_recent: the rate over the run's first
  `WINDOW` judged videos and over the last `WINDOW` (once there are that many).
- hacking/face_coverage: the share of frames with a detected face.
- hacking/judged: how many videos the step's rate is over.

It runs without gradient on detached frames. The warning compares the recent window with
the start, not one step with a fixed rate: a base model's own rollouts are often judged
rigid (on the embedded model's 9-frame training clips, about half of them, from step 1), so
an absolute rate warned on every run at step 1, and with one video a step, every step's rate
is 0 or 1. It prints one line, once per run, when the recent rate exceeds the starting rate
by more than `run.rigid_warn_rise`. The verdicts go into checkpoints (`state_dict`), so a
resumed run keeps its start.
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


WINDOW = 16  # judged videos per window: the start, and the recent rate compared with it


class HackingMonitor:
    def __init__(self, rise: float, embedder=None, device="cpu", window: int = WINDOW) -> None:
        self.rise = rise
        self.window = window
        self._embedder = embedder
        self.device = device
        self.verdicts: list[bool] = []  # every judged video of the run, in order
        self.warned = False

    @property
    def embedder(self):
        if self._embedder is None:  # the reward has none (a learned or feature reward): dlib's, built once
            from ipro.faces.embedder import FaceEmbedder

            self._embedder = FaceEmbedder("dlib").to(self.device)
        return self._embedder

    def state_dict(self) -> dict:
        return {"verdicts": [int(v) for v in self.verdicts], "warned": self.warned}

    def load_state_dict(self, state: dict) -> None:
        self.verdicts = [bool(v) for v in state.get("verdicts", [])]
        self.warned = bool(state.get("warned", False))

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
                    verdicts.append(bool(r["rigid"]))
        self.verdicts += verdicts
        logs = {
            "hacking/rigid_rate": float(np.mean(verdicts)) if verdicts else float("nan"),
            "hacking/face_coverage": covered / frames_seen if frames_seen else float("nan"),
            "hacking/judged": float(len(verdicts)),
        }
        w = self.window
        if len(self.verdicts) >= w:
            start = float(np.mean(self.verdicts[:w]))
            logs["hacking/rigid_rate_start"] = start
            # the recent window starts after the first: until 2w videos it is shorter
            recent = self.verdicts[max(w, len(self.verdicts) - w):]
            if len(recent) >= w // 2:
                logs["hacking/rigid_rate_recent"] = rate = float(np.mean(recent))
                if rate - start > self.rise and not self.warned:
                    self.warned = True
                    at = f" at step {step}" if step is not None else ""
                    print(f"warning: reward hacking{at}: {rate:.0%} of the last {len(recent)} rollouts have a rigid (copy-paste) face, "
                          f"{start:.0%} of the run's first {w}: more than run.rigid_warn_rise={self.rise:g} above; raise kl.weight, "
                          "use reward.mode: pool, or stop at an earlier checkpoint", file=sys.stderr)
        return logs
