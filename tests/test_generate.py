"""`ipro generate` end to end on a tiny model, its one-line errors, and the library `generate`."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

import ipro.cli.generate  # noqa: F401  (registers the command on the app)
from ipro.cli.main import app
from ipro.data.video import read_image, read_video, to_tensor, write_image
from ipro.errors import IproError
from ipro.generate import fit_image, generate, sample_videos
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


def test_batched_cli_run_with_a_prompts_file(tiny, images, tmp_path):
    """Batch independence is checked on the frames before encoding (below): H.264 is lossy."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a man smiles\n\na man talks\n")
    common = ["--model", tiny["wan2.2-ti2v"], "--prompts", prompts, "--num-frames", 5, "--height", 64, "--width", 64, "--steps", 2]
    result = run(*images, *common, "--batch-size", 2, "--seed", 3, "--out", tmp_path)
    assert result.exit_code == 0, result.output + repr(result.exception)
    for i, image in enumerate(images):
        frames, fps = read_video(tmp_path / f"{image.stem}.mp4")
        assert frames.shape == (5, 64, 64, 3) and fps == pytest.approx(24.0)  # Wan 2.2 runs at 24 fps
        settings = json.loads((tmp_path / f"{image.stem}.json").read_text())
        assert settings["seed"] == 3 + i and settings["prompt"] == ("a man smiles", "a man talks")[i]


def test_each_video_has_its_own_seed_whatever_the_batch(tiny, images):
    """A video depends on its image, prompt and seed only: not on the batch size or its place in the batch."""
    model = load_model(tiny["wan2.2-ti2v"])
    first = torch.stack([fit_image(read_image(p), 64, 64) for p in images])
    inputs = [(first[0], "a man smiles", 3), (first[1], "a man talks", 4), (first[0], "a man smiles", 5)]

    def videos(order, batch_size):
        frames = torch.stack([inputs[i][0] for i in order])
        out = sample_videos(model, frames, [inputs[i][1] for i in order], [inputs[i][2] for i in order],
                            num_frames=5, height=64, width=64, steps=2, batch_size=batch_size)
        return dict(zip(order, out))

    alone = {i: videos([i], 1)[i] for i in range(3)}
    for order, batch_size in (([0, 1, 2], 3), ([2, 0, 1], 2), ([1, 2, 0], 3)):
        for i, video in videos(order, batch_size).items():
            assert video.shape == (5, 3, 64, 64)
            # Float rounding only (batched matmuls; measured 2.4e-6); 1e-4 is 0.03 of a uint8 level.
            assert (video - alone[i]).abs().max() < 1e-4, (order, batch_size, i)
    assert (alone[0] - alone[2]).abs().mean() > 0.01  # same image and prompt, another seed: another video


def test_library_generate_writes_videos_and_settings(tiny, images, tmp_path):
    """`ipro.generate.generate` with a loaded model and image tensors; overwrite=False keeps what is there."""
    model = load_model(tiny["wan2.1-i2v"])
    first = [to_tensor(read_image(p)) for p in images]  # full-size tensors: fitted like files
    kwargs = dict(num_frames=5, height=32, width=48, steps=2, seeds=[7, 9], names=["a", "b"], metadata={"run": "x"})
    paths = generate(model, first, tmp_path, prompts=["one", "two"], **kwargs)
    assert [p.name for p in paths] == ["a.mp4", "b.mp4"]
    for path, seed, prompt in zip(paths, (7, 9), ("one", "two")):
        frames, fps = read_video(path)
        assert frames.shape == (5, 32, 48, 3) and fps == pytest.approx(model.fps)
        settings = json.loads(path.with_suffix(".json").read_text())
        assert settings["seed"] == seed and settings["prompt"] == prompt and settings["run"] == "x"
        assert settings["steps"] == 2 and settings["family"] == "wan2.1-i2v" and settings["ipro_version"]
    paths[0].unlink()
    kept = paths[1].stat().st_mtime_ns
    generate(model, first, tmp_path, prompts="again", overwrite=False, **kwargs)
    assert paths[0].is_file() and paths[1].stat().st_mtime_ns == kept
    assert json.loads(paths[0].with_suffix(".json").read_text())["prompt"] == "again"
    with pytest.raises(IproError, match="got 3 values for 2 videos"):
        generate(model, first, tmp_path, prompts=["a", "b", "c"], **kwargs)


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
        (["--subject", "{tmp}/three.txt"], "--subject: the wan2.1-i2v family takes no subject images"),
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


@pytest.mark.parametrize("options, message", [("--bogus 1", "No such option: --bogus"), ("--steps 0", "--steps"),
                                              ("--lora x.safetensors", "--lora cannot be given here")])
def test_eval_generate_options_are_checked_by_the_generate_parser(tmp_path, options, message):
    from ipro.cli.eval import _generate

    with pytest.raises(IproError, match=message) as e:
        _generate("builtin", None, tmp_path, tmp_path / "videos", options)
    assert "\n" not in str(e.value) and "--generate-options" in str(e.value)
