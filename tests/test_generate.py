"""`ipro generate` end to end on a tiny model, and its one-line errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

import ipro.cli.generate  # noqa: F401  (registers the command on the app)
from ipro.cli.main import app
from ipro.data.video import read_video, write_image
from ipro.errors import IproError
from ipro.models import build_tiny, load_model

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {f: build_tiny(f, root / f, seed=0) for f in ("wan2.1-i2v", "wan2.2-ti2v")}


@pytest.fixture(scope="module")
def images(tmp_path_factory, astronaut, carphone):
    root = tmp_path_factory.mktemp("images")
    write_image(root / "astronaut.png", astronaut)
    write_image(root / "carphone.png", carphone[0])  # 176 x 144: not square, gets center-cropped
    return [root / "astronaut.png", root / "carphone.png"]


def run(*args):
    return runner.invoke(app, ["generate", *map(str, args)])


def test_generate_writes_playable_videos_with_settings(tiny, images, tmp_path):
    out = tmp_path / "out"
    result = run(*images, "--model", tiny["wan2.1-i2v"], "--prompt", "a person talks", "--num-frames", 9,
                 "--height", 64, "--width", 48, "--steps", 3, "--guidance", 1, "--seed", 11, "--out", out)
    assert result.exit_code == 0, result.output + repr(result.exception)
    for i, image in enumerate(images):
        frames, fps = read_video(out / f"{image.stem}.mp4")
        assert frames.shape == (9, 64, 48, 3) and fps == pytest.approx(16.0)
        assert frames.std() > 0
        settings = json.loads((out / f"{image.stem}.json").read_text())
        assert settings["seed"] == 11 + i and settings["steps"] == 3 and settings["guidance"] == 1.0
        assert settings["family"] == "wan2.1-i2v" and settings["prompt"] == "a person talks" and settings["num_frames"] == 9


def test_batching_does_not_change_videos_and_prompts_file(tiny, images, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a man smiles\n\na man talks\n")
    common = ["--model", tiny["wan2.2-ti2v"], "--prompts", prompts, "--num-frames", 5, "--height", 64, "--width", 64, "--steps", 2]
    assert run(*images, *common, "--batch-size", 1, "--out", tmp_path / "one").exit_code == 0
    assert run(*images, *common, "--batch-size", 2, "--out", tmp_path / "two").exit_code == 0
    for image in images:
        one, fps = read_video(tmp_path / "one" / f"{image.stem}.mp4")
        two, _ = read_video(tmp_path / "two" / f"{image.stem}.mp4")
        assert one.shape == (5, 64, 64, 3) and fps == pytest.approx(24.0)  # Wan 2.2 runs at 24 fps
        assert np.abs(one.astype(int) - two.astype(int)).mean() < 1.0
    assert json.loads((tmp_path / "one" / "carphone.json").read_text())["prompt"] == "a man talks"


def test_generate_with_a_lora(tiny, images, tmp_path):
    model = load_model(tiny["wan2.1-i2v"], finetune="lora", lora_rank=4)
    file = model.save_lora(tmp_path / "lora")
    result = run(images[0], "--model", tiny["wan2.1-i2v"], "--lora", file, "--num-frames", 5, "--height", 32,
                 "--width", 32, "--steps", 2, "--out", tmp_path / "out")
    assert result.exit_code == 0, repr(result.exception)
    assert json.loads((tmp_path / "out" / "astronaut.json").read_text())["lora"] == str(file)


@pytest.mark.parametrize(
    "args, message",
    [
        (["{img}", "missing.png"], "missing.png: no such image"),
        (["--model", "{tmp}/nowhere"], "model folder does not exist"),
        (["--num-frames", "10"], r"num_frames=10: wan2.1-i2v needs 4k\+1 frames"),
        (["--height", "40", "--width", "64"], "height=40: wan2.1-i2v needs a multiple of 16"),
        (["--height", "64"], "--height and --width: pass both or neither"),
        (["--prompt", "x", "--prompts", "{tmp}/p.txt"], "pass one of them, not both"),
        (["--prompts", "{tmp}/nope.txt"], "nope.txt: no such prompts file"),
        (["--prompts", "{tmp}/three.txt"], "has 3 prompts for 1 images"),
        (["--lora", "{tmp}/lora.safetensors"], "--lora file not found"),
        (["--family", "sora"], "--family 'sora': unknown"),
        (["--reference", "{tmp}/three.txt"], "--reference: the wan2.1-i2v family takes no reference images"),
    ],
)
def test_bad_inputs_give_one_line_errors(tiny, images, tmp_path, args, message):
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    defaults = {"--model": str(tiny["wan2.1-i2v"]), "--num-frames": "5", "--out": str(tmp_path / "out")}
    args = [a.format(img=images[0], tmp=tmp_path) for a in args]
    positional = [a for a in args if a.endswith(".png")] or [str(images[0])]
    options = [a for a in args if not a.endswith(".png")]
    for key, value in defaults.items():
        if key not in options:
            options += [key, value]
    result = runner.invoke(app, ["generate", *positional, *options])
    assert isinstance(result.exception, IproError), result.output
    assert "\n" not in str(result.exception)
    assert re.search(message, str(result.exception)), str(result.exception)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.mp4"))


def test_wan22_needs_multiples_of_32(tiny, images, tmp_path):
    result = run(images[0], "--model", tiny["wan2.2-ti2v"], "--num-frames", 5, "--height", 48, "--width", 64, "--out", tmp_path)
    assert isinstance(result.exception, IproError) and "multiple of 32" in str(result.exception)


def test_builtin_model_with_its_own_defaults(images, tmp_path):
    """`--model builtin` without size options: the embedded model's 9 frames at its
    128x160 area (carphone's 176x144 aspect kept, multiples of 8), not Wan's 81 at 480p."""
    result = run(images[1], "--model", "builtin", "--out", tmp_path)
    assert result.exit_code == 0, result.output + repr(result.exception)
    frames, _ = read_video(tmp_path / "carphone.mp4")
    assert frames.shape == (9, 128, 152, 3)
    settings = json.loads((tmp_path / "carphone.json").read_text())
    assert settings["family"] == "pixel-i2v" and settings["steps"] == 4
