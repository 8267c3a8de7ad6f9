"""What every learned identity reward model shares, whatever its backbone (face tracks in
`rewards.learned`, a VLM in `rewards.vlm`): the Bradley-Terry-with-ties loss (Rao-Kupper),
the tie margin, score normalization, the saved-folder format and the pair metrics."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ipro.errors import IproError, read_format_json
from ipro.rewards.base import Normalization


FORMAT = "ipro-identity-reward-1"


def sample_frames(num_frames: int, n: int) -> torch.Tensor:
    """n frame indices evenly spaced over a video, first and last included; a video
    shorter than n repeats frames, so every video gives exactly n tokens."""
    return torch.linspace(0, max(num_frames - 1, 0), n).round().long()


def rao_kupper_nll(d: torch.Tensor, target: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Per-pair negative log-likelihood of Bradley-Terry with ties (Rao-Kupper).

    d = s_a - s_b; target 1 (a better), 0 (b better), 0.5 (tie); tau > 0 the tie margin.
    """
    log_a = F.logsigmoid(d - tau)
    log_b = F.logsigmoid(-d - tau)
    log_tie = F.logsigmoid(tau - d) + F.logsigmoid(tau + d) + torch.log(-torch.expm1(-2 * tau))
    return -torch.where(target == 1, log_a, torch.where(target == 0, log_b, log_tie))


def outcome_probs(d: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """(..., 3) probabilities of a better, b better, tie."""
    pa, pb = torch.sigmoid(d - tau), torch.sigmoid(-d - tau)
    return torch.stack([pa, pb, (1 - pa - pb).clamp_min(0)], -1)


class PreferenceModel(nn.Module):
    """What every reward-model backbone has: its settings (saved in reward_model.json),
    the Rao-Kupper tie margin tau, the normalization of its scores and its metrics."""

    backbone = ""

    def __init__(self, settings: dict) -> None:
        super().__init__()
        self.settings = settings
        self.tie_raw = nn.Parameter(torch.tensor(0.5))  # tau = softplus(tie_raw)
        self.normalization = Normalization()
        self.metrics: dict = {}

    @property
    def num_frames(self) -> int:
        return int(self.settings["num_frames"])

    @property
    def tau(self) -> torch.Tensor:
        return F.softplus(self.tie_raw) + 1e-4


def read_meta(directory: str | Path) -> dict:
    directory = Path(directory)
    file = directory / "reward_model.json"
    if not file.is_file():
        raise IproError(f"{directory}: not a reward model (no reward_model.json); train one with `ipro reward-model train`")
    return read_format_json(file, FORMAT, "an ipro identity reward model", "retrain it with `ipro reward-model train`")


def accuracy_from_scores(d: torch.Tensor, target: torch.Tensor, tau: torch.Tensor, kinds: list[str]) -> dict:
    """accuracy: decisive pairs whose better side scores higher; tie_accuracy: ties
    whose most likely outcome is a tie; per kind as well."""
    decisive = target != 0.5
    right = torch.where(target == 1, d > 0, d < 0)
    predicted = outcome_probs(d, tau).argmax(-1)
    tie_right = predicted == 2
    out: dict = {"pairs": len(target), "decisive": int(decisive.sum())}
    out["accuracy"] = float(right[decisive].float().mean()) if decisive.any() else float("nan")
    out["tie_accuracy"] = float(tie_right[~decisive].float().mean()) if (~decisive).any() else float("nan")
    by_kind = {}
    for kind in sorted(set(kinds)):
        m = torch.tensor([k == kind for k in kinds])
        by_kind[kind] = float(right[m & decisive].float().mean() if (m & decisive).any() else tie_right[m].float().mean())
    out["by_kind"] = by_kind
    return out


