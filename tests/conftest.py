"""Shared fixtures: one thread, fixed seeds, and the real footage that ships in packages."""

from __future__ import annotations

import os
import random
import socket
import sys
from pathlib import Path

# Subprocesses (`ipro ...` CLI runs, scripts) inherit this and run on one thread too. With
# the default two threads on a busy 2-core machine, OpenMP's waiting threads burned CPU:
# `ipro reward-model pairs` took 23.6 s of CPU against 2.8 s on one thread, same work.
os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process: without a reset, a test that asks for
    another mixed precision fails when it runs after a trainer test in the same (xdist) worker."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture(scope="session")
def carphone() -> np.ndarray:
    """(120, 144, 176, 3) uint8: a man talking on a phone, head turning."""
    from ipro.data.footage import carphone

    return carphone()


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """(512, 512, 3) uint8: one face, public domain."""
    from ipro.data.footage import astronaut

    return astronaut()


def free_port() -> str:
    """A TCP port nobody listens on now, for a gloo rendezvous: fixed ports collide when
    tests run in parallel (pytest-xdist) or beside another run on the same machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def randomize_lora(model, seed=1, scale=0.1):
    """peft starts LoRA B at zero (a no-op); give it weights so the adapter changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.trainable_module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def prepared(folder, face, frames=9, size=64, prompt="a man talks on the phone", **options):
    """A model loaded from `folder` and its condition for the 64 x 64 face fixture (negative prompt for CFG)."""
    from ipro.models import load_model

    model = load_model(folder, **options)
    return model, model.prepare_condition(face[1], [prompt], frames, size, size, negative_prompt="blurry")


def crop(image: np.ndarray, rows, cols, size) -> np.ndarray:
    """image[rows, cols] resized to size (w, h) with Lanczos, uint8."""
    from PIL import Image

    return np.asarray(Image.fromarray(image[rows, cols]).resize(size, Image.Resampling.LANCZOS))


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 in [0, 1]."""
    t = torch.from_numpy(np.array(frames, copy=True)).float() / 255.0
    return t.movedim(-1, -3)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """The tiny random-weight Wan presets, saved in diffusers format once per session."""
    from ipro.models import TINY_FAMILIES, build_tiny

    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_tiny(family, root / family, seed=0) for family in TINY_FAMILIES}


@pytest.fixture(scope="session")
def face(astronaut):
    """The astronaut photo at 64 x 64: uint8 (H, W, 3) and float (1, 3, H, W)."""
    from PIL import Image

    small = np.asarray(Image.fromarray(astronaut).resize((64, 64), Image.Resampling.LANCZOS))
    return small, torch.from_numpy(small.copy()).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """Carphone through `ipro prepare` with the tiny preset: 3 kept 17-frame clips."""
    import shutil

    from ipro.data.footage import carphone_path
    from ipro.data.prepare import load_config, prepare

    root = tmp_path_factory.mktemp("curated")
    (root / "in").mkdir()
    shutil.copy(carphone_path(), root / "in" / "carphone.mp4")
    summary = prepare(root / "in", root / "data", load_config("configs/prepare-tiny.yaml"))
    assert summary["kept"] >= 2
    return root / "data"


PREPARE = "fps: 30\nframes: 17\nheight: 128\nwidth: 160\nmax_clips_per_video: 8\n"


def prepare_carphone(root: Path, extra: str = "", frames=None) -> Path:
    from ipro.data.footage import carphone
    from ipro.data.prepare import load_config, prepare
    from ipro.data.video import write_video

    (root / "in").mkdir(parents=True)
    write_video(root / "in" / "carphone.mp4", carphone() if frames is None else frames, fps=30)
    (root / "prepare.yaml").write_text(PREPARE + extra)
    prepare(root / "in", root / "data", load_config(root / "prepare.yaml"))
    return root / "data"


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory) -> Path:
    """7 curated 17-frame carphone clips -> synthetic pairs; 2 clips and 1/4 of the donors held out."""
    from ipro.data.pairs import make_synthetic_pairs

    root = tmp_path_factory.mktemp("rm")
    data = prepare_carphone(root)
    make_synthetic_pairs(data, root / "pairs", variants=4, ties=1, seed=0)
    return root / "pairs"


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    """A Qwen2.5-VL with random weights (2 text and 2 vision layers, width 32) and a
    word-level tokenizer, saved as a transformers folder: it stands in for the 3B
    checkpoint we cannot download here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ipro.rewards.vlm import PROMPT

    path = tmp_path_factory.mktemp("tiny-qwen2.5-vl")
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    words = sorted(set(PROMPT.replace("<|im_end|>", " ").split()) | {"user", "assistant"})
    vocab = {t: i for i, t in enumerate([*special, "[UNK]", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>", additional_special_tokens=special[1:])
    ids = {k: vocab[f"<|{k}|>"] for k in ("image_pad", "video_pad", "vision_start", "vision_end", "endoftext", "im_end")}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=512, bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"],
                         rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"],
    )
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
