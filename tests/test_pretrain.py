"""`method: pretrain` with a refiner (model.architecture.refiner_channels): it trains with the
transformer, in the optimizer, the EMA and the checkpoints, and lands in model/refiner."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ipro.models import load_model

from test_base_model import killed_after_two_steps_then_resumed, tiny_config

SETTINGS = {"optim.steps": 4, "run.checkpoint_every": 2, "optim.ema_decay": 0.9, "pretrain.edge_weight": 4.0,
            "model.architecture": {"dim": 16, "layers": 1, "heads": 1, "ffn": 32, "refiner_channels": 4}}


@pytest.fixture(scope="module")
def tiny_clips():
    from ipro.data.base_clips import BaseClips

    return BaseClips(32, 40, 5)


def test_the_refiner_trains_with_the_transformer_and_resumes_exactly(tiny_clips, tmp_path):
    from ipro.train.checkpoint import list_checkpoints, load_checkpoint
    from ipro.train.pretrain import PretrainTrainer

    straight = PretrainTrainer(tiny_config(tmp_path / "straight", **SETTINGS), dataset=tiny_clips)
    refiner = {k for k in straight.named_params if k.startswith("refiner.")}
    assert refiner == {"refiner.conv_in.weight", "refiner.conv_in.bias", "refiner.conv_out.weight", "refiner.conv_out.bias",
                       "refiner.across", "refiner.down"}
    assert len(straight.named_params) == len(refiner) + len(list(straight.model.transformer.parameters()))
    start = {k: p.detach().clone() for k, p in straight.named_params.items()}
    straight.train()
    # Every refiner tensor moved (the second convolution and the seam taps start at zero, so
    # the first convolution only gets a gradient once the second has, the taps once the
    # transformer's change head has left zero): the refiner is in the optimizer and the loss reaches it.
    assert all(not torch.equal(start[k], straight.named_params[k]) for k in refiner)
    assert not torch.equal(start["transformer.proj_out.weight"], straight.named_params["transformer.proj_out.weight"])
    assert refiner <= set(load_checkpoint(list_checkpoints(tmp_path / "straight")[-1])["ema"])

    resumed = killed_after_two_steps_then_resumed(tmp_path / "killed", tiny_clips, **SETTINGS)
    assert resumed.global_step == 4
    for k, p in straight.named_params.items():
        assert torch.equal(p, resumed.named_params[k]) and torch.equal(straight.ema[k], resumed.ema[k]), k

    # The saved folder holds the EMA refiner, which load_model brings back and runs.
    saved = load_file(tmp_path / "straight" / "model" / "refiner" / "refiner.safetensors")
    assert all(torch.equal(saved[k], straight.ema[f"refiner.{k}"]) for k in saved) and len(saved) == 6
    model = load_model(tmp_path / "straight" / "model")
    assert model.refiner is not None and model.refiner.channels == 4
    image = tiny_clips.clip(torch.Generator().manual_seed(5))[:1]
    cond = model.prepare_condition(image, [""], 5, 32, 40)
    x_t = torch.randn(model.latent_shape(1, 5, 32, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_refiner = model.predict_x0(x_t, 500.0, cond)
        model.refiner = None
        without = model.predict_x0(x_t, 500.0, cond)
    assert not torch.allclose(with_refiner, without)  # the trained refiner changes the prediction
