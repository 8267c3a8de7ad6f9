"""The pixel-i2v family's overlapping output (model.architecture.overlap): each token's 16x16
patch, tent-weighted, so the 8-pixel token grid leaves no step in the picture."""

from __future__ import annotations

import numpy as np
import torch

from ipro.eval.blockiness import blockiness
from ipro.models import load_model
from ipro.models.pixel import CHANNELS, PixelI2V, overlap_add

SMALL = dict(dim=32, layers=1, heads=2, ffn=64)


def frames_of(change: torch.Tensor) -> np.ndarray:
    """The first 3 channels of latent frame 0 as one (1, H, W, 3) uint8 frame."""
    x = change[0, :3, 0].permute(1, 2, 0).clamp(0, 1)
    return (x.numpy()[None] * 255).round().astype(np.uint8)


def test_patches_sum_to_one_and_land_where_their_token_is():
    g = torch.Generator().manual_seed(0)
    level = torch.rand(1, generator=g).item()
    assert torch.allclose(overlap_add(torch.full((1, 4 * CHANNELS, 2, 32, 40), level)), torch.tensor(level), atol=1e-6)
    raw = torch.zeros(1, 4 * CHANNELS, 1, 32, 40)
    raw[..., 8:16, 16:24] = 1  # token (1, 2), all four quarters of its patch
    out = overlap_add(raw)[0, 0, 0]
    rows, cols = out.nonzero().T
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 19, 12, 27)  # 16 x 16, centred on its 8 x 8
    assert torch.allclose(out[4:20, 20], out[4:20, 20].flip(0)) and out[11, 20] == out[4:20, 20].max()


def test_token_grid_leaves_no_seams():
    # Every token writes one random level: a plain output is a mosaic with all its steps on the
    # grid lines; the overlapping one blends neighbours, so the steps are gone.
    g = torch.Generator().manual_seed(1)
    levels = torch.rand(1, 1, 1, 8, 10, generator=g)
    tokens = levels.repeat_interleave(8, -2).repeat_interleave(8, -1)  # (1, 1, 1, 64, 80)
    plain = blockiness(frames_of(tokens.expand(1, CHANNELS, 1, 64, 80)))
    overlapped = blockiness(frames_of(overlap_add(tokens.expand(1, 4 * CHANNELS, 1, 64, 80))))
    assert plain > 10 and overlapped < 1.5, (plain, overlapped)


def test_overlapping_model_saves_loads_and_starts_like_a_plain_one(tmp_path):
    torch.manual_seed(0)
    model = PixelI2V.from_config(overlap=True, **SMALL)
    assert model.overlap and model.transformer.config.out_channels == 4 * CHANNELS
    image = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(3))
    cond = model.prepare_condition(image, ["a face"], 5, 32, 40)
    x_t = torch.randn(model.latent_shape(1, 5, 32, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model.transformer.proj_out.weight.zero_()
        model.transformer.proj_out.bias.zero_()
        assert torch.equal(model.predict_x0(x_t, 600.0, cond), cond.image_latents.expand_as(x_t))  # change head at zero
        model.transformer.proj_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
        before = model.predict_x0(x_t, 600.0, cond)
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.overlap
    with torch.no_grad():
        assert torch.equal(loaded.predict_x0(x_t, 600.0, cond), before)
