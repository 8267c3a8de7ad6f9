"""`method: pretrain` with the embedded model's options (model.architecture.overlap and
pretrain.edge_weight): it trains, resumes exactly, and saves a model that loads with its
overlapping output."""

from __future__ import annotations

import pytest
import torch

from ipro.errors import IproError
from ipro.models import load_model

from test_base_model import killed_after_two_steps_then_resumed, tiny_config

SETTINGS = {"optim.steps": 4, "run.checkpoint_every": 2, "optim.ema_decay": 0.9, "pretrain.edge_weight": 4.0,
            "model.architecture": {"dim": 16, "layers": 1, "heads": 1, "ffn": 32, "overlap": True}}


@pytest.fixture(scope="module")
def tiny_clips():
    from ipro.data.base_clips import BaseClips

    return BaseClips(32, 40, 5)


def test_overlapping_model_trains_resumes_exactly_and_loads_back(tiny_clips, tmp_path):
    from ipro.train.pretrain import PretrainTrainer

    straight = PretrainTrainer(tiny_config(tmp_path / "straight", **SETTINGS), dataset=tiny_clips)
    assert straight.model.overlap and straight.named_params["proj_out.weight"].shape == (8 * 8 * 4 * 12, 16)
    start = {k: p.detach().clone() for k, p in straight.named_params.items()}
    straight.train()
    # The change head starts at zero and leaves it: the loss reaches every patch quarter.
    # Its rows are (pixel in the 8x8 patch, patch quarter, channel).
    moved = (straight.named_params["proj_out.weight"] - start["proj_out.weight"]).detach().reshape(64, 4, 12, 16).abs().sum((0, 2, 3))
    assert not torch.equal(start["proj_out.weight"], straight.named_params["proj_out.weight"]) and (moved > 0).all()

    resumed = killed_after_two_steps_then_resumed(tmp_path / "killed", tiny_clips, **SETTINGS)
    assert resumed.global_step == 4
    for k, p in straight.named_params.items():
        assert torch.equal(p, resumed.named_params[k]) and torch.equal(straight.ema[k], resumed.ema[k]), k

    model = load_model(tmp_path / "straight" / "model")
    assert model.overlap
    image = tiny_clips.clip(torch.Generator().manual_seed(5))[:1]
    cond = model.prepare_condition(image, [""], 5, 32, 40)
    x_t = torch.randn(model.latent_shape(1, 5, 32, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(model.predict_x0(x_t, 500.0, cond), cond.image_latents.expand_as(x_t))

    # A folder from the refiner trials (a refiner/ folder beside the transformer) is refused
    # in one line, not silently run without its refiner.
    (tmp_path / "straight" / "model" / "refiner").mkdir()
    with pytest.raises(IproError, match="refiner/ folder"):
        load_model(tmp_path / "straight" / "model")
