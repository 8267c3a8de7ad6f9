"""Tiny random-weight Wan models for tests, benchmarks and offline demos.

`build_tiny(family, out_dir)` writes a diffusers-format folder with the real component
classes at toy sizes (a 2-block transformer, a 3-channel VAE, a 1-layer UMT5 with an
in-memory vocabulary), so every code path of the real checkpoints runs in well under a
second on a CPU, and nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ipro.models.base import quiet_loading

# The image-to-video presets (what the shared test fixtures build and run through WanImageToVideoPipeline).
TINY_FAMILIES = ("wan2.1-i2v", "wan2.2-ti2v", "wan2.2-i2v-a14b")
# Built on request only: subject-to-video presets (VACE, Phantom), driven by WanVACEPipeline / WanPipeline instead.
TINY_SUBJECT_FAMILIES = ("wan-vace", "phantom")


def _tokenizer():
    from transformers import T5Tokenizer

    # A SentencePiece-style unigram vocabulary: specials, word-initial and inner letters, digits.
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = ["<pad>", "</s>", "<unk>", "▁"] + [f"▁{c}" for c in letters] + letters + list("0123456789.,")
    vocab = [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _text_encoder(vocab_size: int, dim: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=vocab_size, d_model=dim, d_kv=8, d_ff=dim, num_layers=1, num_heads=2, relative_attention_num_buckets=8)
    return UMT5EncoderModel(config)


def _transformer(in_channels: int, out_channels: int, text_dim: int, image_dim: int | None = None, vace_layers: list[int] | None = None):
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

    heads, head_dim = 2, 12
    # VACE: a control branch on the given blocks, fed inactive + reactive video latents and the 8x8 mask.
    vace = dict(vace_layers=vace_layers, vace_in_channels=2 * out_channels + 64) if vace_layers is not None else {}
    return (WanVACETransformer3DModel if vace else WanTransformer3DModel)(
        **vace,
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=text_dim,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        image_dim=image_dim,
        # Wan 2.1 I2V attends to image tokens through extra k/v projections of the full width.
        added_kv_proj_dim=heads * head_dim if image_dim is not None else None,
    )


def _vae(z_dim: int):
    from diffusers import AutoencoderKLWan

    # Non-trivial latent statistics so that (de)normalization is exercised.
    stats = dict(latents_mean=torch.linspace(-0.5, 0.5, z_dim).tolist(), latents_std=torch.linspace(0.5, 1.5, z_dim).tolist())
    common = dict(base_dim=3, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    if z_dim == 16:  # Wan 2.1 VAE: x8 spatial, x4 temporal
        return AutoencoderKLWan(**common, **stats)
    # Wan 2.2 VAE: 2x2 pixel patches on channels, residual blocks, x16 spatial
    return AutoencoderKLWan(
        **common, **stats, in_channels=12, out_channels=12, is_residual=True, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4
    )


def _clip():
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, projection_dim=4)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModel(config), processor


def build_tiny(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build a random tiny model of `family` (TINY_FAMILIES or TINY_SUBJECT_FAMILIES), save it to out_dir, return out_dir."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline, WanVACEPipeline

    if family not in TINY_FAMILIES + TINY_SUBJECT_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; use one of {TINY_FAMILIES + TINY_SUBJECT_FAMILIES}")
    out_dir = Path(out_dir)
    text_dim = 32
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
        torch.manual_seed(seed)
        tokenizer = _tokenizer()
        parts = dict(tokenizer=tokenizer, text_encoder=_text_encoder(len(tokenizer), text_dim))
        if family == "wan2.1-i2v":
            image_encoder, image_processor = _clip()
            pipe = WanImageToVideoPipeline(
                **parts,
                vae=_vae(16),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                image_encoder=image_encoder,
                image_processor=image_processor,
                transformer=_transformer(36, 16, text_dim, image_dim=4),
            )
        elif family == "wan2.2-ti2v":
            # Saved as a WanPipeline with expand_timesteps, like Wan-AI/Wan2.2-TI2V-5B-Diffusers.
            pipe = WanPipeline(
                **parts,
                vae=_vae(48),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                transformer=_transformer(48, 48, text_dim),
                expand_timesteps=True,
            )
        elif family == "wan2.2-i2v-a14b":
            pipe = WanImageToVideoPipeline(
                **parts,
                vae=_vae(16),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                transformer=_transformer(36, 16, text_dim),
                transformer_2=_transformer(36, 16, text_dim),
                boundary_ratio=0.9,
            )
        elif family == "phantom":  # Phantom-Wan: a plain 16-channel T2V transformer, saved as WanPipeline
            pipe = WanPipeline(**parts, vae=_vae(16), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=_transformer(16, 16, text_dim))
        else:  # Wan 2.1 VACE: a 16-channel T2V transformer plus a control branch on both blocks
            pipe = WanVACEPipeline(
                **parts,
                vae=_vae(16),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                transformer=_transformer(16, 16, text_dim, vace_layers=[0, 1]),
            )
    with quiet_loading():
        pipe.save_pretrained(out_dir)
    if family == "phantom":  # what `ipro convert phantom` writes: the marker that tells Phantom from plain Wan T2V
        from ipro.models.phantom import mark_phantom

        mark_phantom(out_dir)
    return out_dir
