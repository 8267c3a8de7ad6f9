"""`ipro eval --protocol consisid`: ConsisID's FaceSim-Arc / FaceSim-Cur protocol on known inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipro.errors import IproError
from ipro.eval.consisid import ConsisIDProtocol, clipped_mean, face_sim, largest_face, sample_indices

IPRO = str(Path(sys.executable).with_name("ipro"))


@pytest.fixture(scope="module")
def photo(astronaut) -> np.ndarray:
    return np.asarray(Image.fromarray(astronaut).resize((256, 256), Image.Resampling.LANCZOS))


@pytest.fixture(scope="module")
def dlib_protocol() -> ConsisIDProtocol:
    return ConsisIDProtocol()


def still_video(photo: np.ndarray, n: int) -> np.ndarray:
    """The photo on the 16 frames the protocol samples, plain gray (no face) everywhere else."""
    frames = np.full((n, *photo.shape), 128, dtype=np.uint8)
    frames[sample_indices(n)] = photo
    return frames


def test_frame_sampling_and_clipping_follow_consisid():
    # np.linspace(0, F - 1, 16, dtype=int): truncation, repeats for short videos.
    assert sample_indices(81) == [0, 5, 10, 16, 21, 26, 32, 37, 42, 48, 53, 58, 64, 69, 74, 80]
    assert sample_indices(9) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 8]
    assert clipped_mean([-0.3, 0.5]) == 0.25 and clipped_mean([]) == 0.0


def test_still_photo_scores_its_self_similarity(photo, carphone, dlib_protocol):
    scores = dlib_protocol(still_video(photo, 40), photo)
    # Every sampled frame is the photo itself: cosine 1; a frame between them would have no face.
    assert scores["face_sim_arc"] == pytest.approx(1.0, abs=1e-5) and scores["face_sim_arc_frames"] == 16
    assert dlib_protocol.recognizers == {"face_sim_arc": "dlib-resnet", "face_sim_cur": "dlib-resnet"}
    # Another person against the astronaut scores in dlib's different-people band.
    other = dlib_protocol(carphone[:40], photo)
    assert 0.5 < other["face_sim_arc"] < 0.9


def test_the_largest_face_of_a_frame_is_scored(astronaut, carphone, dlib_protocol):
    embedder = dlib_protocol.arc
    photo = np.asarray(Image.fromarray(astronaut).resize((384, 384), Image.Resampling.LANCZOS))  # face ~65 px wide
    input_face = largest_face(embedder, photo)
    small = carphone[0]  # a ~47 px face beside it
    canvas = np.full((384, 384 + small.shape[1], 3), 128, dtype=np.uint8)
    canvas[:, :384] = photo
    canvas[: small.shape[0], 384:] = small
    assert face_sim(embedder, canvas[None].repeat(16, 0), input_face)["face_sim"] > 0.98  # landmarks move a little on a wider canvas
    canvas[:, :384] = 128  # the astronaut gone: the other face is the largest
    assert face_sim(embedder, canvas[None].repeat(16, 0), input_face)["face_sim"] < 0.9


def test_curricularface_checkpoint_is_loaded_and_used(tmp_path, photo):
    from ipro.faces.curricularface import CurricularFaceIR

    torch.manual_seed(0)
    made = CurricularFaceIR(units=(1, 1, 1, 1))  # an IR net of our own; the real IR-101 does not ship
    torch.save(made.backbone.state_dict(), tmp_path / "cur.bin")
    loaded = CurricularFaceIR.from_checkpoint(tmp_path / "cur.bin")
    chips = torch.rand(2, 3, 112, 112)
    assert torch.equal(loaded(chips), made.eval()(chips)) and loaded(chips).shape == (2, 512)
    protocol = ConsisIDProtocol(curricularface=tmp_path / "cur.bin")
    assert protocol.recognizers == {"face_sim_arc": "dlib-resnet", "face_sim_cur": "curricularface-ir1-1-1-1"}
    scores = protocol(still_video(photo, 20), photo)
    assert scores["face_sim_cur"] == pytest.approx(1.0, abs=1e-5) and scores["face_sim_cur_frames"] == 16
    (tmp_path / "bad.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(IproError, match="CurricularFace checkpoint"):
        CurricularFaceIR.from_checkpoint(tmp_path / "bad.bin")
    with pytest.raises(IproError, match="ArcFace checkpoint .*does not exist"):
        ConsisIDProtocol(arcface=tmp_path / "missing.pth")


@pytest.mark.slow  # two CLI processes
def test_eval_cli_consisid_protocol(tmp_path, photo, carphone):
    from ipro.data.video import write_image, write_video

    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "astro.png", photo)
    write_image(tmp_path / "in" / "phone.png", photo)  # a video of someone else for this input
    write_video(tmp_path / "gen" / "astro.mp4", still_video(photo, 33), fps=16)
    write_video(tmp_path / "gen" / "phone.mp4", carphone[:33], fps=16)
    run = subprocess.run([IPRO, "eval", str(tmp_path / "gen"), "--inputs", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                          "--protocol", "consisid"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "FaceSim-Arc (dlib-resnet)" in run.stdout and "dlib stands in" in run.stderr
    result = json.loads((tmp_path / "out" / "consisid.json").read_text())
    videos = {v["name"]: v for v in result["videos"]}
    assert videos["astro"]["face_sim_arc"] > 0.97 and videos["astro"]["face_sim_arc_frames"] == 16  # H.264 is lossy
    assert videos["phone"]["face_sim_arc"] < 0.9
    assert result["recognizers"]["face_sim_arc"] == "dlib-resnet" and result["comparable_with_papers"]["face_sim_arc"] is False
    bad = subprocess.run([IPRO, "eval", str(tmp_path / "gen"), "--inputs", str(tmp_path / "in"), "--out", str(tmp_path / "o2"),
                          "--protocol", "vbench"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--protocol" in bad.stderr
