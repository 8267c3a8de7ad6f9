"""The checkpointed Wan VAE decode (ipro.models.vae_decode) against diffusers' own decodes."""

from __future__ import annotations

import math

import pytest
import torch

from ipro.errors import IproError
from ipro.models.vae_decode import decode_wan_vae, tile_geometry

FAMILIES = ("wan2.1-i2v", "wan2.2-ti2v")
LATENT_FRAMES = 5  # 17 output frames: two segments of the checkpointed decode (sqrt(5) -> 3 + 2)


def load_vae(tiny, family):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(tiny[family], subfolder="vae").eval()


def latents(vae, h=4, w=5, t=LATENT_FRAMES, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, vae.config.z_dim, t, h, w, generator=g)


def value_and_grad(decode, z, frames):
    """Decoded frames and the gradient w.r.t. z of a reward-like scalar: a fixed random projection of them."""
    z = z.clone().requires_grad_(True)
    video = decode(z)
    projection = torch.randn(video.shape, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((video * projection).sum(), z)
    return video.detach(), grad


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("frames", [[0], [0, 1, 2, 3, 4], None], ids=["1 frame", "5 frames", "all frames"])
def test_gradient_equals_the_full_decode(tiny, family, frames):
    vae = load_vae(tiny, family)
    z = latents(vae)

    def naive(z):
        video = vae.decode(z, return_dict=False)[0]
        return video if frames is None else video[:, :, frames]

    ref_video, ref_grad = value_and_grad(naive, z, frames)
    video, grad = value_and_grad(lambda z: decode_wan_vae(vae, z, frames), z, frames)
    assert video.shape == ref_video.shape
    torch.testing.assert_close(video, ref_video, rtol=0, atol=1e-6)
    assert ref_grad.abs().sum() > 0 and rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_spatial_tiles_equal_diffusers_tiled_decode(tiny, family):
    vae = load_vae(tiny, family)
    scale = vae.config.scale_factor_spatial
    tile = 2 * scale  # 2x2 latent pixels per tile, stride 1: every tile overlaps and the edge tiles are cut
    size, stride, blend = tile_geometry(vae, tile)
    assert (size, stride) == (2, 1) and blend > 0
    z = latents(vae, h=3, w=4)
    vae.enable_tiling(tile, tile, stride * scale, stride * scale)
    ref_video, ref_grad = value_and_grad(lambda z: vae.tiled_decode(z, return_dict=False)[0], z, None)
    vae.disable_tiling()
    video, grad = value_and_grad(lambda z: decode_wan_vae(vae, z, tile=tile), z, None)
    whole, _ = value_and_grad(lambda z: decode_wan_vae(vae, z), z, None)
    assert (video - whole).abs().max() > 1e-3  # tiling changed the picture: the comparison is not vacuous
    torch.testing.assert_close(video, ref_video, rtol=0, atol=1e-6)
    assert rel_err(grad, ref_grad) <= 1e-5
    # A subset of frames from the tiled decode is the same subset of the tiled video.
    some, _ = value_and_grad(lambda z: decode_wan_vae(vae, z, [6, 0], tile=tile), z, None)
    torch.testing.assert_close(some, video[:, :, [6, 0]], rtol=0, atol=1e-6)


def test_latent_frames_after_the_last_requested_frame_are_not_decoded(tiny):
    vae = load_vae(tiny, "wan2.1-i2v")
    calls = []
    vae.decoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[2]))
    z = latents(vae)
    with torch.no_grad():
        decode_wan_vae(vae, z, frames=[3, 1])  # output frames 1..4 come from latent frame 1
    assert len(calls) == 2

    calls.clear()
    z.requires_grad_(True)
    video = decode_wan_vae(vae, z, frames=[5, 2])  # frame 5 is in latent frame 2
    assert len(calls) == 3 and video.shape[2] == 2
    video.square().sum().backward()
    assert len(calls) == 3 * 3  # backward recomputes the segment, then each latent frame: never beyond frame 2
    assert z.grad[:, :, :3].abs().sum() > 0 and torch.equal(z.grad[:, :, 3:], torch.zeros_like(z.grad[:, :, 3:]))


def saved_bytes(fn) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.slow  # keeps the fast subset under 3 minutes
def test_runs_on_meta_and_keeps_a_small_share_of_the_naive_decode():
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        vae = AutoencoderKLWan().requires_grad_(False)  # the real Wan 2.1 VAE architecture, nothing allocated

    def kept(decode, frames):
        z = torch.empty(1, 16, (frames - 1) // 4 + 1, 4, 4, device="meta", requires_grad=True)
        return saved_bytes(lambda: decode(z))

    ours = {f: kept(lambda z: decode_wan_vae(vae, z), f) for f in (17, 81)}
    naive = kept(lambda z: vae.decode(z, return_dict=False)[0], 81)
    assert ours[81] <= 0.1 * naive
    # 17 frames (5 latent frames, segments of 3 + 2) keep one causal cache; 81 frames (21 latent
    # frames) must keep at most ~sqrt(21) of them, not one per latent frame.
    assert ours[81] <= math.ceil(math.sqrt(21)) * ours[17]
    z = torch.empty(1, 16, 3, 4, 4, device="meta", requires_grad=True)
    video = decode_wan_vae(vae, z, frames=[0, 8], tile=16)
    video.sum().backward()
    assert video.shape == (1, 3, 2, 32, 32) and z.grad.shape == z.shape


def test_bad_tile_size_names_the_config_field(tiny):
    vae = load_vae(tiny, "wan2.2-ti2v")
    with pytest.raises(IproError, match="model.decode_tile=24: must be a multiple of the VAE's spatial factor 16"):
        tile_geometry(vae, 24)
    with pytest.raises(IproError, match="at least 32"):
        tile_geometry(vae, 16)


def test_backward_recomputes_under_the_callers_autocast(tiny):
    # accelerate's bf16 mixed precision runs the forward in autocast and backward outside it:
    # the recompute must use the forward's autocast (in float32 it would be off by ~10%).
    vae = load_vae(tiny, "wan2.1-i2v")
    z = latents(vae)

    def autocast(decode):
        def run(z):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return decode(z)
        return run

    ref_video, ref_grad = value_and_grad(autocast(lambda z: vae.decode(z, return_dict=False)[0]), z, None)
    video, grad = value_and_grad(autocast(lambda z: decode_wan_vae(vae, z)), z, None)
    assert video.dtype == ref_video.dtype == torch.bfloat16
    torch.testing.assert_close(video, ref_video, rtol=0, atol=1e-6)
    assert rel_err(grad, ref_grad) <= 1e-5
