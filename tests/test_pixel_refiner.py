"""The pixel-i2v family's optional refiner: off unless the model folder has one, a no-op when
new, saved and loaded with the model."""

from __future__ import annotations

import pytest
import torch

from ipro.errors import IproError
from ipro.models import load_model
from ipro.models.pixel import BUILTIN_PATH, PixelI2V

SMALL = dict(dim=32, layers=1, heads=2, ffn=64)


def x0(model, image, seed=0):
    cond = model.prepare_condition(image, ["a face"], 5, 32, 40)
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(model.latent_shape(1, 5, 32, 40), generator=g)
    with torch.no_grad():
        return model.predict_x0(x_t, torch.tensor(600.0), cond)


@pytest.fixture()
def image():
    return torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(3))


def test_committed_model_has_no_refiner():
    assert not (BUILTIN_PATH / "refiner").exists()
    assert load_model(BUILTIN_PATH).refiner is None


def test_new_refiner_changes_nothing_then_round_trips(tmp_path, image):
    torch.manual_seed(0)
    plain = PixelI2V.from_config(**SMALL)
    torch.manual_seed(0)
    refined = PixelI2V.from_config(refiner_channels=8, **SMALL)
    with torch.no_grad():
        refined.transformer.proj_out.weight.normal_(0, 0.05)  # a change for the refiner to see
        plain.transformer.proj_out.weight.copy_(refined.transformer.proj_out.weight)
    # Zero-initialised output convolution: identical predictions.
    assert torch.equal(x0(plain, image), x0(refined, image))
    with torch.no_grad():
        refined.refiner.conv_out.weight.normal_(0, 0.05)
    before = x0(refined, image)
    assert not torch.allclose(before, x0(plain, image), atol=1e-4)
    refined.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.refiner is not None and loaded.refiner.channels == 8
    assert torch.equal(x0(loaded, image), before)
    # A refiner folder that lost its weights is a one-line error, not a silent plain model.
    (tmp_path / "m" / "refiner" / "refiner.safetensors").unlink()
    with pytest.raises(IproError, match="refiner"):
        load_model(tmp_path / "m")


def test_refiner_stays_frozen_in_lora_finetuning(tmp_path, image):
    PixelI2V.from_config(refiner_channels=8, **SMALL).save_pretrained(tmp_path / "m")
    model = load_model(tmp_path / "m", finetune="lora", lora_rank=4)
    names = {id(p) for p in model.refiner.parameters()}
    assert all(id(p) not in names for p in model.trainable_parameters())
    assert not any(p.requires_grad for p in model.refiner.parameters())
