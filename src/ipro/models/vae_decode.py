"""A differentiable decode of diffusers' `AutoencoderKLWan` whose autograd memory does not hold the clip.

`vae.decode` under autograd keeps every activation of every latent frame for backward
(338 GB for the Wan 2.1 VAE at 480x832x81 in bf16). The Wan decoder is causal in time:
it already runs one latent frame ("chunk") at a time, and each causal conv carries the last
two frames of its input to the next chunk in a cache list that it fills in place. Here each
chunk is one autograd node,

    (latent chunk, incoming cache tensors) -> (decoded frames, outgoing cache tensors),

run without autograd in forward and recomputed with autograd in its backward. The gradient
reaches earlier latents through the cache tensors, and backward rebuilds one chunk's
activations at a time. One node per chunk would still keep one cache (the last two frames at
each causal conv, ~1.9 GB for Wan 2.1 at 480x832 in bf16) per latent frame, so chunks are
grouped into ~sqrt(n) segments, each itself such a node whose backward recomputes it as
per-chunk nodes: autograd keeps ~sqrt(n) caches after forward, ~2 sqrt(n) during backward,
and the decode runs forward three times instead of twice.

Optional spatial tiles (side in pixels, overlap a quarter of the side) are decoded and
blended exactly like diffusers' `tiled_decode`; each tile has its own cache and segments.
Chunks after the last requested frame are never decoded. Everything depends on shapes only
(no `.item()`, no branch on values), so it also runs on `meta` tensors for memory planning.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch

from ipro.errors import IproError

TENSOR = "tensor"  # layout marker: this cache slot holds a tensor (others hold None or diffusers' "Rep")


def tile_geometry(vae, tile: int) -> tuple[int, int, int]:
    """(tile side, stride) in latent pixels and the blend width in decoder-output pixels, for a tile side in pixels.

    Tiles overlap by a quarter of their side (diffusers' default is 256 / 192), rounded down to
    whole latent pixels and at least one.
    """
    scale = vae.config.scale_factor_spatial
    if tile % scale or tile < 2 * scale:
        raise IproError(f"model.decode_tile={tile}: must be a multiple of the VAE's spatial factor {scale} and at least {2 * scale}; e.g. {max(2 * scale, tile // scale * scale)}")
    overlap = max(scale, tile // 4 // scale * scale)
    patch = vae.config.patch_size or 1
    return tile // scale, (tile - overlap) // scale, tile // patch - (tile - overlap) // patch


def _num_causal_convs(vae) -> int:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())


def _decode_chunk(vae, z: torch.Tensor, cache: list, first: bool, keep: list[int]) -> tuple[torch.Tensor, list]:
    """One latent frame through the decoder; returns its frames at local indices `keep` and the new cache list."""
    cache = list(cache)  # the decoder writes the outgoing cache into this list
    out = vae.decoder(vae.post_quant_conv(z), feat_cache=cache, feat_idx=[0], first_chunk=first)
    if len(keep) != out.shape[2]:
        out = out[:, :, keep]
    return out, cache


def _split(cache: list) -> tuple[tuple, list[torch.Tensor]]:
    layout = tuple(TENSOR if isinstance(c, torch.Tensor) else c for c in cache)
    return layout, [c for c in cache if isinstance(c, torch.Tensor)]


def _join(layout: tuple, tensors: Sequence[torch.Tensor]) -> list:
    it = iter(tensors)
    return [next(it) if kind == TENSOR else kind for kind in layout]


class _Recomputed(torch.autograd.Function):
    """`run(z, cache, nested) -> (frames, cache)` as one autograd node that saves only its inputs.

    Forward runs it without autograd; backward runs it again with autograd (`nested=True`: a
    segment then builds one such node per chunk, so its recompute keeps only their caches) and
    backpropagates the incoming gradients to the latents and the incoming cache.
    """

    @staticmethod
    def forward(ctx, run, layout, result, z, *cache):
        ctx.run, ctx.layout = run, layout
        # Backward runs outside the caller's autocast (e.g. accelerate's bf16): recompute under the same one.
        device = z.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) if torch.amp.is_autocast_available(device) else None
        ctx.save_for_backward(z, *cache)
        ctx.set_materialize_grads(False)  # outputs nothing reads (the last cache) get no gradient: skip them
        out, new_cache = run(z, _join(layout, cache), False)
        new_layout, new_tensors = _split(new_cache)
        result.append(new_layout)  # the caller needs the outgoing layout (None / "Rep" / tensor per slot)
        return (out, *new_tensors)

    @staticmethod
    def backward(ctx, grad_out, *grad_cache):
        needs = ctx.needs_input_grad[3:]
        autocast = torch.autocast(ctx.autocast[0], dtype=ctx.autocast[2], enabled=ctx.autocast[1]) if ctx.autocast else contextlib.nullcontext()
        with torch.enable_grad(), autocast:
            inputs = [t.detach().requires_grad_(n) for t, n in zip(ctx.saved_tensors, needs)]
            out, new_cache = ctx.run(inputs[0], _join(ctx.layout, inputs[1:]), True)
        pairs = [(o, g) for o, g in zip([out, *_split(new_cache)[1]], [grad_out, *grad_cache]) if g is not None]
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True) if pairs and wanted else [])
        return (None, None, None, *[next(grads) if t.requires_grad else None for t in inputs])


def _node(run, z: torch.Tensor, cache: list) -> tuple[torch.Tensor, list]:
    result: list = []
    layout, tensors = _split(cache)
    out, *new_tensors = _Recomputed.apply(run, layout, result, z, *tensors)
    return out, _join(result[0], new_tensors)


def _decode_chunks(vae, z: torch.Tensor, cache: list, first: int, keeps: list[list[int]], nodes: bool) -> tuple[torch.Tensor, list]:
    """Latent frames first, first+1, ... (z holds them) one after the other; `nodes`: each one its own autograd node."""
    kept = []
    for i, keep in enumerate(keeps):
        def run(z_k, cache_k, _nested, first_chunk=first + i == 0, keep=keep):
            return _decode_chunk(vae, z_k, cache_k, first_chunk, keep)

        z_k = z[:, :, i : i + 1]
        out, cache = _node(run, z_k, cache) if nodes else run(z_k, cache, False)
        if out.shape[2] != len(keep):
            raise RuntimeError(f"latent frame {first + i} decoded to {out.shape[2]} frames, expected {len(keep)}: unsupported Wan VAE layout")
        kept.append(out)
    return torch.cat(kept, dim=2), cache


def _decode_tile(vae, z: torch.Tensor, wanted: set[int], checkpoint: bool) -> torch.Tensor:
    """Decode latent frame after latent frame with a private causal cache; keep only the `wanted` output frames.

    With `checkpoint`, consecutive latent frames form about sqrt(n) segments: each segment is one
    node that keeps only the cache it received, and whose recompute in backward makes one node
    per latent frame. Autograd then holds ~sqrt(n) caches after forward and ~2 sqrt(n) during
    backward, for one extra decode forward.
    """
    t_scale = vae.config.scale_factor_temporal
    n = max(0 if f == 0 else (f - 1) // t_scale + 1 for f in wanted) + 1  # latent frames to decode
    keeps = [[i for i in range(1 if k == 0 else t_scale) if (0 if k == 0 else 1 + (k - 1) * t_scale) + i in wanted] for k in range(n)]
    cache: list = [None] * _num_causal_convs(vae)
    if not checkpoint:
        return _decode_chunks(vae, z, cache, 0, keeps, nodes=False)[0]
    size = math.ceil(math.sqrt(n))
    kept = []
    for first in range(0, n, size):
        def run(z_s, cache_s, nested, first=first):
            return _decode_chunks(vae, z_s, cache_s, first, keeps[first : first + size], nodes=nested)

        out, cache = _node(run, z[:, :, first : first + size], cache)
        kept.append(out)
    return torch.cat(kept, dim=2)


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """b with its first `extent` rows along `dim` cross-faded from a's last rows (diffusers' blend_v / blend_h)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return b
    shape = [1] * b.ndim
    shape[dim] = extent
    w = (torch.arange(extent, dtype=torch.float64, device=b.device) / extent).view(shape)  # as diffusers: y / extent in double
    head = a.narrow(dim, a.shape[dim] - extent, extent) * (1 - w).to(b.dtype) + b.narrow(dim, 0, extent) * w.to(b.dtype)
    return torch.cat([head, b.narrow(dim, extent, b.shape[dim] - extent)], dim)


def decode_wan_vae(vae, z: torch.Tensor, frames: Sequence[int] | None = None, tile: int | None = None) -> torch.Tensor:
    """Decode raw (unnormalized) Wan latents (B, C, T, h, w) -> video (B, 3, F, H, W) in [-1, 1], like `vae.decode`.

    frames: output frames to return, in this order (None: all 4(T-1)+1). Latent frames after the
        last requested one are not decoded.
    tile: spatial tile side in pixels (None: whole frames), see `tile_geometry`.
    With autograd on and `z.requires_grad`, each tile is decoded as checkpointed segments of
    latent frames (module docstring); otherwise without autograd. The VAE's weights get no gradient.
    """
    t_scale = vae.config.scale_factor_temporal
    num_frames = (z.shape[2] - 1) * t_scale + 1
    frames = list(range(num_frames)) if frames is None else [int(f) for f in frames]
    if not frames or min(frames) < 0 or max(frames) >= num_frames:
        raise ValueError(f"frames must be in [0, {num_frames}), got {frames}")
    wanted = sorted(set(frames))
    checkpoint = torch.is_grad_enabled() and z.requires_grad
    patch = vae.config.patch_size or 1
    scale = vae.config.scale_factor_spatial
    h, w = z.shape[-2:]
    geometry = tile_geometry(vae, tile) if tile is not None else None
    with torch.set_grad_enabled(checkpoint):
        if tile is None or (h * scale <= tile and w * scale <= tile):
            video = _decode_tile(vae, z, set(wanted), checkpoint)
        else:
            size, stride, blend = geometry
            out_stride = stride * scale // patch  # decoder-output pixels per tile step
            rows: list[list[torch.Tensor]] = []
            for i in range(0, h, stride):
                row: list[torch.Tensor] = []
                for j in range(0, w, stride):
                    t = _decode_tile(vae, z[:, :, :, i : i + size, j : j + size], set(wanted), checkpoint)
                    if rows:  # blend with the already blended tiles above and to the left, as diffusers does
                        t = _blend(rows[-1][len(row)], t, blend, 3)
                    if row:
                        t = _blend(row[-1], t, blend, 4)
                    row.append(t)
                rows.append(row)
            video = torch.cat([torch.cat([t[:, :, :, :out_stride, :out_stride] for t in row], dim=4) for row in rows], dim=3)
            video = video[:, :, :, : h * scale // patch, : w * scale // patch]
        if patch > 1:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            video = unpatchify(video, patch_size=patch)
        video = video.clamp(-1.0, 1.0)
        if frames != wanted:
            video = video[:, :, [wanted.index(f) for f in frames]]
    return video
