"""FaceEmbedder and `ipro faces` on real footage (carphone video, astronaut photo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import to_tensor

from ipro.errors import IproError


@pytest.fixture(scope="module")
def embedder():
    from ipro.faces.embedder import FaceEmbedder

    return FaceEmbedder("dlib")


def mean_identity(faces) -> torch.Tensor:
    return F.normalize(faces.embeddings.mean(0), dim=0)


def test_carphone_and_astronaut_detected_and_separated(embedder, carphone, astronaut):
    video = to_tensor(carphone[::10])[None]  # 12 frames
    faces = embedder(video)
    assert faces.has_face.float().mean() >= 0.9
    assert faces.embeddings.shape == (faces.num_faces, 128)
    astro = embedder(to_tensor(astronaut)[None, None])
    assert astro.num_faces == 1
    # Every carphone frame against every other carphone frame, and against the astronaut.
    sim = faces.embeddings @ faces.embeddings.T
    same = sim[~torch.eye(len(sim), dtype=torch.bool)]
    cross = faces.embeddings @ astro.embeddings[0]
    # Measured (MTCNN + our alignment + dlib port, 12 frames): same person min 0.942,
    # mean 0.978; carphone vs astronaut max 0.829, mean 0.821. A gap of 0.11 on dlib's
    # narrow cosine band.
    assert same.min() > 0.92
    assert cross.max() < 0.85
    assert same.min() - cross.max() > 0.08


def test_records_and_frame_lookup(embedder, carphone):
    faces = embedder(to_tensor(carphone[:2])[None])
    records = faces.to_records()
    assert len(records) == 1 and len(records[0]) == 2
    for f, frame in enumerate(records[0]):
        assert len(frame) == len(faces.frame_faces(0, f))
        for face in frame:
            x1, y1, x2, y2 = face["box"]
            assert 0 <= x1 < x2 <= 176 and 0 <= y1 < y2 <= 144
            assert len(face["landmarks"]) == 5


def test_gradients_reach_pixels(embedder, carphone):
    video = to_tensor(carphone[:3])[None].requires_grad_(True)
    faces = embedder(video)
    faces.embeddings.sum().backward()
    g = video.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # Pixels far from every face get no gradient: the chip is a local resample.
    x1, y1, x2, y2 = faces.boxes[0].tolist()
    assert g[0, 0, :, : max(0, int(y1) - 30), :].abs().sum() == 0


def test_finite_differences_match_autograd_float64(embedder, carphone):
    """Directional derivative through alignment + recognizer, in float64.

    The recognizer is piecewise linear (ReLU, max-pool): a step along a random direction
    over all pixels crosses kinks unless it is tiny, so we use 1e-7, where float64
    round-off is still ~1e-9. Measured: FD -3.24576518 vs autograd -3.24576517.
    """
    import copy

    rec64 = copy.deepcopy(embedder.recognizer).double()
    from ipro.faces.embedder import FaceEmbedder

    emb64 = FaceEmbedder(rec64, detector=embedder.detector)
    video = to_tensor(carphone[:1])[None].double()
    dets = emb64.detect(video[0].float())
    direction = torch.randn_like(video)
    probe = torch.randn(128, dtype=torch.float64)

    def f(v):
        return emb64.embed(v, dets).embeddings[0] @ probe

    v = video.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(v), v)
    eps = 1e-7
    with torch.no_grad():
        fd = (f(video + eps * direction) - f(video - eps * direction)) / (2 * eps)
    analytic = (grad * direction).sum()
    assert analytic.abs() > 0.1
    assert torch.allclose(fd, analytic, rtol=1e-6, atol=1e-8), (fd, analytic)


def test_no_face_video_gives_empty_result(embedder, carphone):
    # A grey video and a face-free corner of carphone (the car's interior, top-left).
    grey = torch.full((1, 3, 3, 96, 96), 0.5)
    corner = to_tensor(carphone[:3, :48, :48])[None]
    for video in (grey, corner):
        v = video.clone().requires_grad_(True)
        faces = embedder(v)
        assert faces.num_faces == 0 and not faces.has_face.any()
        faces.embeddings.sum().backward()  # no exception, zero gradient
        assert v.grad is not None and v.grad.abs().sum() == 0


def test_bfloat16_input(embedder, carphone):
    video = to_tensor(carphone[:2])[None]
    ref = embedder(video)
    low = embedder(video.bfloat16())
    assert low.num_faces == ref.num_faces
    assert (low.embeddings * ref.embeddings).sum(-1).min() > 0.99


def test_value_range_minus_one_to_one(carphone):
    from ipro.faces.embedder import FaceEmbedder

    e01 = FaceEmbedder("dlib")
    e11 = FaceEmbedder(e01.recognizer, detector=e01.detector, value_range=(-1, 1))
    video = to_tensor(carphone[:2])[None]
    a, b = e01(video), e11(video * 2 - 1)
    assert torch.allclose(a.embeddings, b.embeddings, atol=1e-5)


@pytest.mark.parametrize(
    "video, message",
    [
        (torch.rand(2, 3, 64, 64), "(B, F, 3, H, W)"),
        ((torch.rand(1, 2, 3, 64, 64) * 255).to(torch.uint8), "float"),
        (torch.rand(1, 2, 3, 64, 64) * 255, "outside the declared range"),
        (torch.full((1, 2, 3, 64, 64), float("nan")), "NaN"),
    ],
)
def test_bad_input_is_rejected(embedder, video, message):
    with pytest.raises(ValueError, match=re_escape(message)):
        embedder(video)


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


def test_missing_weights_file_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.util

    from ipro.faces import weights

    real = importlib.util.find_spec

    class FakeSpec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: FakeSpec() if name == "face_recognition_models" else real(name))
    with pytest.raises(IproError, match="dlib_face_recognition_resnet_model_v1.dat"):
        weights.dlib_recognition_weights()
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(IproError, match="pip install --no-deps facenet-pytorch==2.6.0"):
        weights.mtcnn_weights("pnet")


def ipro_cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("ipro")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=None)


@pytest.mark.slow  # a CLI run in a subprocess, or many: the fast subset stays under 3 minutes
def test_cli_faces_json_and_compare(tmp_path):
    from ipro.data.footage import astronaut_path, carphone_path
    from ipro.data.video import read_video, write_video

    clip = tmp_path / "carphone_a.mp4"
    frames, _ = read_video(carphone_path(), max_frames=12)
    write_video(clip, frames, fps=15)
    clip_b = tmp_path / "carphone_b.mp4"
    write_video(clip_b, read_video(carphone_path())[0][60:72], fps=15)
    out = ipro_cli("faces", str(astronaut_path()), str(clip), str(clip_b), "--json", "--compare")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    inputs, sim = data["inputs"], np.array(data["similarity"])
    assert [Path(i["path"]).name for i in inputs] == ["astronaut.png", "carphone_a.mp4", "carphone_b.mp4"]
    assert len(inputs[0]["frames"]) == 1 and len(inputs[1]["frames"]) == 12
    face = inputs[0]["frames"][0]["faces"][0]
    assert set(face) == {"box", "score", "landmarks"} and len(face["box"]) == 4
    assert np.allclose(np.diag(sim), 1, atol=1e-3) and np.allclose(sim, sim.T)
    # The two halves of carphone are the same man; the astronaut is not.
    assert sim[1, 2] > sim[0, 1] + 0.05 and sim[1, 2] > sim[0, 2] + 0.05


@pytest.mark.slow  # a CLI run in a subprocess, or many: the fast subset stays under 3 minutes
def test_cli_faces_table_and_bad_paths(tmp_path):
    from ipro.data.footage import astronaut_path

    out = ipro_cli("faces", str(astronaut_path()))
    assert out.returncode == 0 and "astronaut.png" in out.stdout
    missing = ipro_cli("faces", str(tmp_path / "nope.mp4"))
    assert missing.returncode == 2 and "nope.mp4: no such file" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    bogus = tmp_path / "notes.mp4"
    bogus.write_text("not a video")
    bad = ipro_cli("faces", str(bogus))
    assert bad.returncode == 2 and "notes.mp4: not a readable video" in bad.stderr
    txt = tmp_path / "notes.txt"
    txt.write_text("hi")
    wrong = ipro_cli("faces", str(txt))
    assert wrong.returncode == 2 and "unsupported file type" in wrong.stderr
