"""The identity reward model and its preference pairs, on real footage: carphone curated
into 7 clips, distorted with faces that ship with scikit-image (the astronaut, the
cameraman, LFW), through the real MTCNN + dlib face stack. Numbers in comments were
measured on this CPU with one thread."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import prepare_carphone, to_tensor

from ipro.data.pairs import load_pairs, make_synthetic_pairs
from ipro.errors import IproError
from ipro.rewards.learned import (
    FEATURES,
    FaceFeatureExtractor,
    IdentityRewardModel,
    LearnedIdentityReward,
    evaluate_reward_model,
    outcome_probs,
    rao_kupper_nll,
    train_reward_model,
)

IPRO = str(Path(sys.executable).with_name("ipro"))
@pytest.fixture(scope="module")
def extractor(tmp_path_factory) -> FaceFeatureExtractor:
    return FaceFeatureExtractor(num_frames=8, cache_dir=tmp_path_factory.mktemp("face-cache"))


@pytest.fixture(scope="module")
def model(pairs_dir, extractor) -> IdentityRewardModel:
    return train_reward_model(load_pairs(pairs_dir / "train.jsonl"), extractor=extractor)


def test_pairs_are_balanced_and_split_without_leakage(pairs_dir):
    summary = json.loads((pairs_dir / "summary.json").read_text())
    train, held = load_pairs(pairs_dir / "train.jsonl"), load_pairs(pairs_dir / "heldout.jsonl")
    assert summary["clips"] == 7 and len(summary["heldout_groups"]) == 2
    assert not {p.group for p in train} & {p.group for p in held}  # no clip on both sides
    # no video or subject image on both sides either
    files = lambda ps: {f for p in ps for f in (p.video_a, p.video_b, *p.subjects)}
    assert not files(train) & files(held)
    held_donors = set(summary["heldout_donors"])
    assert held_donors and len(held_donors) < summary["donors"]
    for split in (train, held):
        labels = [p.label for p in split]
        assert abs(labels.count("a") - labels.count("b")) <= 1 and labels.count("tie") > 0
        kinds = {p.kind for p in split}
        assert {"swap", "blend", "blend-mild", "warp", "warp-mild", "flicker", "tie"} <= kinds
        assert all(f.is_file() for f in files(split))
    # Single-person clips: no duplicate-person pairs.
    assert "duplicate" not in {p.kind for p in train}


def test_heldout_swap_accuracy_is_at_least_90_percent(model, pairs_dir, extractor):
    held = load_pairs(pairs_dir / "heldout.jsonl")
    swaps = [p for p in held if p.kind == "swap"]
    metrics = evaluate_reward_model(model, swaps, extractor)
    everything = evaluate_reward_model(model, held, extractor)
    # Measured: 8/8 held-out swap pairs (1.000); all 32 decisive held-out pairs 1.000, ties 1/2.
    assert metrics["decisive"] == len(swaps) >= 8
    assert metrics["accuracy"] >= 0.9, metrics
    assert everything["accuracy"] >= 0.9, everything


def test_learned_reward_scores_the_original_above_its_swap(model, pairs_dir):
    from ipro.data.video import read_image, read_video
    from ipro.rewards import RewardBatch

    pair = next(p for p in load_pairs(pairs_dir / "heldout.jsonl") if p.kind == "swap")
    better, worse = (pair.video_a, pair.video_b) if pair.label == "a" else (pair.video_b, pair.video_a)
    frames = torch.stack([to_tensor(read_video(v)[0]) for v in (better, worse)]).requires_grad_(True)
    image = to_tensor(read_image(pair.subjects[0]))[None].expand(2, -1, -1, -1)
    reward = LearnedIdentityReward(model)
    out = reward(frames, RewardBatch(input_frames=image))
    assert out.score[0] > out.score[1] and out.valid.all()
    assert out.per_frame.shape == (2, 8) and out.coverage.min() == 1.0  # a face in every scored frame
    out.mean().backward()  # connected to the frames, with zero gradient: GRPO needs none
    assert frames.grad is not None and frames.grad.abs().sum() == 0
    # The learned score is normalized by the training videos' scores.
    assert torch.allclose(out.score, (out.raw - model.normalization.mean) / model.normalization.std)


def test_save_and_load_give_the_same_scores(model, tmp_path, pairs_dir, extractor):
    model.save(tmp_path / "rm")
    loaded = IdentityRewardModel.load(tmp_path / "rm")
    pair = load_pairs(pairs_dir / "heldout.jsonl")[0]
    feats = torch.stack([extractor.file_features(v, pair.subjects) for v in (pair.video_a, pair.video_b)])
    with torch.no_grad():
        assert torch.equal(model(feats), loaded(feats))
    assert loaded.normalization == model.normalization and loaded.num_frames == 8
    with pytest.raises(IproError, match="not a reward model"):
        IdentityRewardModel.load(tmp_path)


def test_rao_kupper_probabilities_and_loss():
    d = torch.linspace(-4, 4, 9)
    tau = torch.tensor(0.7)
    probs = outcome_probs(d, tau)
    assert torch.allclose(probs.sum(-1), torch.ones(9), atol=1e-6)
    nll = lambda t: rao_kupper_nll(d, torch.full_like(d, t), tau)
    assert torch.allclose((-nll(1.0)).exp(), probs[:, 0], atol=1e-6)
    assert torch.allclose((-nll(0.0)).exp(), probs[:, 1], atol=1e-6)
    assert torch.allclose((-nll(0.5)).exp(), probs[:, 2], atol=1e-6)
    assert int(nll(0.5).argmin()) == 4  # a tie is most likely at equal scores
    assert (nll(1.0).diff() < 0).all() and (nll(0.0).diff() > 0).all()


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"video_a": "a.mp4", "video_b": "b.mp4", "subject": "r.png", "label": "a"', "not valid JSON"),
        ('["a.mp4", "b.mp4"]', "expected a JSON object"),
        ('{"video_a": "a.mp4", "video_b": "b.mp4", "label": "a"}', "missing key 'subject'"),
        ('{"video_a": "a.mp4", "video_b": "b.mp4", "subject": "r.png", "label": "A"}', "label must be"),
        ('{"video_a": "a.mp4", "video_b": "nope.mp4", "subject": "r.png", "label": "tie"}', "video_b file not found"),
        ('{"video_a": "a.mp4", "video_b": "a.mp4", "subject": "r.png", "label": "b"}', "the same file"),
        ('{"video_a": "a.mp4", "video_b": "b.mp4", "subject": [], "label": "b"}', "empty list"),
        ('{"video_a": "a.mp4", "video_b": "b.mp4", "subject": "r.png", "label": "b", "weight": -1}', "weight must be"),
    ],
)
def test_bad_annotation_file_names_the_file_and_line(tmp_path, line, message):
    for name in ("a.mp4", "b.mp4", "r.png"):
        (tmp_path / name).write_bytes(b"x")
    good = '{"video_a": "a.mp4", "video_b": "b.mp4", "subject": "r.png", "label": "a"}'
    path = tmp_path / "ann.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(IproError) as err:
        load_pairs(path)
    text = str(err.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text, text


def test_good_annotation_file_loads(tmp_path):
    for name in ("a.mp4", "b.mp4", "r1.png", "r2.png"):
        (tmp_path / name).write_bytes(b"x")
    path = tmp_path / "ann.jsonl"
    # The second line uses the key's name before the rename ("reference"): read the same.
    path.write_text('{"video_a": "a.mp4", "video_b": "b.mp4", "subject": ["r1.png", "r2.png"], "label": "tie", "annotator": 7}\n'
                    '{"video_a": "a.mp4", "video_b": "b.mp4", "reference": ["r1.png", "r2.png"], "label": "tie"}\n')
    pair, old = load_pairs(path)
    assert pair.label == "tie" and pair.target == 0.5 and pair.kind == "human"
    assert pair.video_a == tmp_path / "a.mp4" and pair.subjects == old.subjects == (tmp_path / "r1.png", tmp_path / "r2.png")
    assert "subject" in pair.to_json(tmp_path) and "reference" not in pair.to_json(tmp_path)
    with pytest.raises(IproError, match="pairs file not found"):
        load_pairs(tmp_path / "missing.jsonl")


def test_split_keeps_each_group_on_one_side(pairs_dir):
    from ipro.data.pairs import split_pairs

    pairs = load_pairs(pairs_dir / "train.jsonl")
    train, held = split_pairs(pairs, 0.4, seed=1)
    assert train and held and len(train) + len(held) == len(pairs)
    assert not {p.group for p in train} & {p.group for p in held}
    assert split_pairs(pairs, 0.4, seed=1) == (train, held)  # seeded


@pytest.mark.slow  # a CLI run in a subprocess, or many: the fast subset stays under 3 minutes
def test_cli_bad_annotation_is_one_line_exit_2(tmp_path):
    path = tmp_path / "ann.jsonl"
    path.write_text('{"video_a": 1}\n')
    res = subprocess.run(_cli("train", "--pairs", str(path), "--out", str(tmp_path / "rm")), capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [f"error: {path}:1: missing key 'video_b'; a pair needs video_a, video_b, subject and label"]


def test_duplicate_person_in_a_two_person_clip(tmp_path, carphone, astronaut):
    """Two people side by side; the duplicate distortion gives person 2 person 1's face."""
    import cv2

    face = cv2.resize(astronaut[20:260, 130:370], (144, 144), interpolation=cv2.INTER_AREA)
    two = np.stack([np.concatenate([f, face], axis=1) for f in carphone[:40]])
    data = prepare_carphone(tmp_path, "width: 256\nmax_face_size: null\nmax_clips_per_video: 1\n", frames=two)
    make_synthetic_pairs(data, tmp_path / "pairs", kinds=("duplicate",), variants=2, ties=0, seed=1)
    pairs = load_pairs(tmp_path / "pairs" / "train.jsonl")  # one clip: nothing can be held out
    assert {p.kind for p in pairs} == {"duplicate"} and len(pairs) == 2
    extractor = FaceFeatureExtractor(num_frames=8)
    p = pairs[0]
    original, dup = (p.video_a, p.video_b) if p.label == "a" else (p.video_b, p.video_a)
    f_orig, f_dup = (extractor.file_features(v, p.subjects) for v in (original, dup))
    own, dup_cos = FEATURES.index("own_cos"), FEATURES.index("dup_cos")
    # Measured (frames after the onset): own_cos 0.99 -> 0.95, the two faces' cosine 0.84 -> 0.88-0.93.
    assert f_dup[-1, dup_cos] > f_orig[-1, dup_cos] + 0.02
    assert f_dup[-1, own] < f_orig[-1, own] - 0.02
    assert (f_orig[:, FEATURES.index("coverage")] == 1).all()  # both people found in every frame


def test_grpo_uses_the_learned_reward(model, tmp_path):
    from ipro.data.footage import carphone_path
    from ipro.data.prepare import load_config, prepare
    from ipro.rewards import WeightedReward
    from ipro.train.config import load_config as train_config
    from ipro.train.grpo import GRPOTrainer

    (tmp_path / "in").mkdir()
    import shutil

    shutil.copy(carphone_path(), tmp_path / "in" / "carphone.mp4")
    prepare(tmp_path / "in", tmp_path / "data", load_config("configs/prepare-tiny.yaml"))
    model.save(tmp_path / "rm")
    cfg = train_config("configs/tiny-cpu-grpo.yaml", {
        "data.dataset": str(tmp_path / "data"), "data.height": 64, "data.width": 64, "grpo.group_size": 2,
        "grpo.reward_model": str(tmp_path / "rm"), "run.output_dir": str(tmp_path / "run"), "run.log_with": [], "optim.steps": 1,
    })
    trainer = GRPOTrainer(cfg)
    assert isinstance(trainer.reward, WeightedReward)
    face, learned = trainer.reward.rewards
    assert learned.extractor.embedder is face.embedder  # one face stack in memory
    logs = trainer.step()
    # The tiny model's videos have no faces: the learned model still scores them (low).
    assert "reward/identity_rm/raw" in logs and logs["valid_fraction"] == 1.0
    with pytest.raises(IproError, match="not a reward model"):
        GRPOTrainer(train_config("configs/tiny-cpu-grpo.yaml", {"data.dataset": str(tmp_path / "data"), "grpo.reward_model": str(tmp_path),
                                                             "run.output_dir": str(tmp_path / "run2"), "run.log_with": []}))


def _cli(*args: str) -> list[str]:
    """`ipro reward-model ...` through the installed console script."""
    return [IPRO, "reward-model", *args]


@pytest.mark.slow  # a CLI run in a subprocess, or many: the fast subset stays under 3 minutes
def test_cli_pairs_train_eval_score(tmp_path, pairs_dir):
    data = pairs_dir.parent / "data"
    out = subprocess.run(_cli("pairs", str(data), "--out", str(tmp_path / "pairs"), "--kinds", "swap,flicker", "--variants", "1",
                              "--ties", "1", "--seed", "2"), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "7 clips" in out.stdout
    rm = tmp_path / "rm"
    out = subprocess.run(_cli("train", "--pairs", str(tmp_path / "pairs" / "train.jsonl"), "--eval", str(tmp_path / "pairs" / "heldout.jsonl"),
                              "--out", str(rm), "--epochs", "60"), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "eval: accuracy" in out.stdout and (rm / "reward_model.json").is_file() and (rm / "face-cache").is_dir()
    out = subprocess.run(_cli("eval", str(rm), "--pairs", str(tmp_path / "pairs" / "heldout.jsonl"), "--cache", str(rm / "face-cache"), "--json"),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["decisive"] > 0
    clip = next((tmp_path / "pairs" / "videos").iterdir())
    videos = [str(clip / "original.mp4"), str(clip / "swap0.mp4")]
    out = subprocess.run(_cli("score", str(rm), "-s", str(tmp_path / "pairs" / "subjects" / f"{clip.name}.png"), *videos, "--json"),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    scores = [json.loads(line)["score"] for line in out.stdout.splitlines()]
    assert scores[0] > scores[1]
