"""Face recognizers: the PyTorch port of dlib's face ResNet against native dlib, on real
faces; its gradients; and the ArcFace IResNet checkpoint loader.

Face chips come from dlib itself (HOG detector + 5-point shape predictor +
get_face_chip), so these tests do not depend on ipro's own detector.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import to_tensor

from ipro.errors import IproError
from ipro.faces.align import ARCFACE_TEMPLATE_112, DLIB_TEMPLATE_150
from ipro.faces.arcface import DEPTHS, ArcFaceIResNet, IResNet
from ipro.faces.dlib_resnet import DlibResNet, parse_dlib_net
from ipro.faces.embedder import load_recognizer
from ipro.faces.weights import dlib_recognition_weights

CARPHONE_FRAMES = [0, 15, 30, 45, 60, 75, 90, 105]


@pytest.fixture(scope="module")
def dlib_net() -> DlibResNet:
    return DlibResNet.from_package().eval()


@pytest.fixture(scope="module")
def dlib_chips(carphone, astronaut) -> dict:
    """150x150 uint8 chips cut by dlib: carphone frames (one man) and the astronaut."""
    dlib = pytest.importorskip("dlib", reason="dlib (dlib-bin, a test extra) is not installed")
    models = Path(list(importlib.util.find_spec("face_recognition_models").submodule_search_locations)[0]) / "models"
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))

    def chip(img: np.ndarray) -> np.ndarray:
        # Upsample once (carphone faces are ~45 px) and keep the most confident face: the
        # astronaut's photo also yields a weak false positive (score 0.12 vs 1.16).
        faces, scores, _ = detector.run(img, 1, 0.0)
        assert len(faces) >= 1
        face = faces[int(np.argmax(scores))]
        return dlib.get_face_chip(img, predictor(img, face), size=150, padding=0.25)

    return {
        "carphone": np.stack([chip(carphone[i]) for i in CARPHONE_FRAMES]),
        "astronaut": chip(astronaut)[None],
        "facerec": dlib.face_recognition_model_v1(str(dlib_recognition_weights())),
    }


def _astronaut_chip(astronaut: np.ndarray) -> torch.Tensor:
    """(1, 3, 150, 150) float64: the astronaut's face cropped and downscaled, no dlib."""
    crop = to_tensor(astronaut[40:220, 132:312])[None].double()
    return F.interpolate(crop, size=(150, 150), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _embed(net: DlibResNet, chips_uint8: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return net(to_tensor(chips_uint8))


# --- dlib port: structure and agreement with native dlib ---------------------------------


def test_structure_parsed_from_file(dlib_net):
    layers = parse_dlib_net(dlib_recognition_weights().read_bytes())
    kinds = Counter(layer["kind"] for layer in layers)
    assert layers[0]["kind"] == "input" and layers[-1]["kind"] == "fc"
    assert (kinds["con"], kinds["affine"], kinds["avg_pool"], kinds["max_pool"]) == (29, 29, 5, 1)
    # 14 residual additions: 4 downsampling (tag, skip, avg_pool) + 10 plain.
    assert (kinds["add_prev"], kinds["tag"], kinds["skip"]) == (14, 18, 4)
    assert layers[0]["mean"] == pytest.approx([122.782, 117.001, 104.298], abs=1e-3)
    assert (dlib_net.name, dlib_net.input_size, dlib_net.embedding_dim) == ("dlib-resnet", 150, 128)
    assert torch.equal(dlib_net.template, DLIB_TEMPLATE_150)


def test_port_matches_native_dlib(dlib_net, dlib_chips):
    chips = np.concatenate([dlib_chips["carphone"], dlib_chips["astronaut"]])
    native = np.array([dlib_chips["facerec"].compute_face_descriptor(c) for c in chips])
    ours = _embed(dlib_net, chips).numpy()
    # Measured: max |diff| 4.2e-7 over these 9 chips (float32 rounding only).
    assert np.abs(ours - native).max() < 1e-4
    norms = np.linalg.norm(ours, axis=1)  # measured 1.40..1.47 (dlib does not normalize)
    assert ((norms > 1.2) & (norms < 1.7)).all(), norms


def test_identity_separates_people(dlib_net, dlib_chips):
    emb = _embed(dlib_net, np.concatenate([dlib_chips["carphone"], dlib_chips["astronaut"]]))
    dist = torch.cdist(emb, emb)
    n = len(CARPHONE_FRAMES)
    same = dist[:n, :n][torch.triu_indices(n, n, 1).unbind()]
    other = dist[n, :n]
    # Measured: carphone pairs 0.18..0.475 (mean 0.31), carphone->astronaut 0.847..0.874.
    assert same.max() < 0.55  # below dlib's 0.6 same-person threshold
    assert other.min() > 0.75
    assert other.min() - same.max() > 0.25  # measured gap 0.37


# --- dlib port: gradients, dtype, device --------------------------------------------------


def test_autograd_matches_finite_differences(dlib_net, astronaut):
    net = DlibResNet.from_package().double().eval()
    # Faint noise breaks exact ties: flat image regions give equal values inside a max-pool
    # window, where the network is not differentiable (measured 4e-4 error without it).
    x0 = _astronaut_chip(astronaut) + 0.01 * torch.randn(1, 3, 150, 150, dtype=torch.float64)
    proj = torch.randn(128, 3, dtype=torch.float64)

    # gradcheck on 4 pixels (the full Jacobian of 67,500 inputs would be too slow).
    idx = torch.tensor([[0, 75, 75], [1, 40, 100], [2, 110, 60], [1, 20, 20]])

    def f(delta: torch.Tensor) -> torch.Tensor:
        x = x0.clone()
        x[0, idx[:, 0], idx[:, 1], idx[:, 2]] = x[0, idx[:, 0], idx[:, 1], idx[:, 2]] + delta
        return net(x) @ proj

    delta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (delta,), eps=1e-6, atol=1e-6, rtol=1e-4)

    # Directional derivative over the whole chip: <grad, v> vs central differences.
    w = torch.randn(128, dtype=torch.float64)
    v = torch.randn_like(x0)
    x = x0.clone().requires_grad_(True)
    (net(x)[0] @ w).backward()
    analytic = (x.grad * v).sum().item()
    # A small step: a random direction over 67,500 pixels moves many ReLU inputs, and at
    # h=1e-6 some cross zero (measured up to 5e-3 error); at 1e-7, 3e-9..2e-8 over 3 seeds.
    h = 1e-7
    with torch.no_grad():
        numeric = ((net(x0 + h * v)[0] - net(x0 - h * v)[0]) @ w).item() / (2 * h)
    assert numeric == pytest.approx(analytic, rel=1e-5)


def test_gradients_reach_the_chip(dlib_net, astronaut):
    net = DlibResNet.from_package().eval().requires_grad_(False)
    chip = _astronaut_chip(astronaut).float()
    target = F.normalize(net(chip).detach(), dim=-1)
    x = (chip + 0.05 * torch.randn_like(chip)).clamp(0, 1).requires_grad_(True)
    loss = 1 - F.cosine_similarity(net(x), target).mean()
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    # The 7x7/2 stem conv without padding sees rows/cols 0..148, so only row/col 149 is
    # dead; everything else should get gradient.
    assert (x.grad != 0).float().mean() > 0.9


def test_bfloat16_close_to_float32(dlib_net, astronaut):
    chip = _astronaut_chip(astronaut).float()
    with torch.no_grad():
        ref = dlib_net(chip)
    net16 = DlibResNet.from_package().to(torch.bfloat16).eval()
    with torch.no_grad():
        out = net16(chip)  # float32 chips are cast to the module's dtype
    assert out.dtype == torch.bfloat16
    assert F.cosine_similarity(out.float(), ref).item() > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(dlib_net, astronaut):
    chip = _astronaut_chip(astronaut).float()
    with torch.no_grad():
        cpu = dlib_net(chip)
        gpu = DlibResNet.from_package().cuda().eval()(chip.cuda()).cpu()
    assert (gpu - cpu).abs().max() < 5e-3  # cuDNN may use TF32 convolutions


# --- dlib port: bad weight files ------------------------------------------------------------


def test_bad_dat_files_raise(tmp_path):
    real = dlib_recognition_weights().read_bytes()
    cases = {
        "missing.dat": None,
        "truncated.dat": real[: len(real) // 3],
        "cut_in_header.dat": real[:200],
        "garbage.dat": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "empty.dat": b"",
        "compressed.dat.bz2": b"BZh91AY&SY" + bytes(100),
        "other_net.dat": real[:2] + b"\x01\x0bloss_mmod_2" + real[17:],  # a detector, not a recognizer
    }
    for name, data in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(IproError) as err:
            DlibResNet.from_file(path)
        msg = str(err.value)
        assert str(path) in msg and "\n" not in msg, msg


# --- ArcFace IResNet loader ---------------------------------------------------------------


def _random_iresnet(depth: int) -> IResNet:
    torch.manual_seed(depth)
    model = IResNet(DEPTHS[depth])
    for m in model.modules():  # non-trivial BatchNorm statistics and PReLU slopes
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
        if isinstance(m, torch.nn.PReLU):
            m.weight.data.uniform_(0.1, 0.3)
    return model.eval()


def test_arcface_loader_roundtrip(tmp_path):
    model = _random_iresnet(50)
    state = model.state_dict()
    raw, wrapped = tmp_path / "backbone.pth", tmp_path / "ddp.pth"
    torch.save(state, raw)
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, wrapped)
    chips = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        want = model((chips - 0.5) / 0.5)
        for path in (raw, wrapped):
            rec = ArcFaceIResNet.from_checkpoint(path)
            assert (rec.name, rec.input_size, rec.embedding_dim) == ("arcface-iresnet50", 112, 512)
            assert torch.equal(rec.template, ARCFACE_TEMPLATE_112)
            torch.testing.assert_close(rec(chips), want, rtol=0, atol=1e-6)

    rec = load_recognizer("arcface:" + str(raw))
    assert not rec.training and not any(p.requires_grad for p in rec.parameters())
    with torch.no_grad():
        torch.testing.assert_close(rec(chips), want, rtol=0, atol=1e-6)

    # Wrong shapes: a 256-d head on an IResNet-50 body; and a 1-d vector where a conv goes.
    bad_head = dict(state, **{"fc.weight": torch.zeros(256, 512 * 49), "fc.bias": torch.zeros(256)})
    bad_conv = dict(state, **{"conv1.weight": torch.zeros(64 * 27)})
    for name, bad in (("head.pth", bad_head), ("conv.pth", bad_conv)):
        torch.save(bad, tmp_path / name)
        with pytest.raises(IproError, match="does not match IResNet-50"):
            ArcFaceIResNet.from_checkpoint(tmp_path / name)


def test_arcface_infers_depth_100(tmp_path):
    path = tmp_path / "r100.pth"
    torch.save({"model": IResNet(DEPTHS[100]).state_dict()}, path)
    rec = ArcFaceIResNet.from_checkpoint(path)
    assert rec.name == "arcface-iresnet100" and len(rec.backbone.layer3) == 30


def test_arcface_bad_checkpoints_raise(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a checkpoint\n")
    other = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(4, 2).state_dict(), other)
    listed = tmp_path / "list.pth"
    torch.save([1, 2, 3], listed)
    for path in (tmp_path / "missing.pth", text, other, listed):
        with pytest.raises(IproError) as err:
            ArcFaceIResNet.from_checkpoint(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(IproError):
        load_recognizer("arcface:" + str(text))


def test_load_recognizer_dlib():
    rec = load_recognizer("dlib")
    assert isinstance(rec, DlibResNet) and not rec.training
    assert not any(p.requires_grad for p in rec.parameters())
    with torch.no_grad():
        assert rec(torch.rand(2, 3, 150, 150)).shape == (2, 128)
