"""Memory of a differentiable Wan VAE decode: ipro's checkpointed decode vs diffusers' `vae.decode`.

Two numbers per clip length, both for the same latents and the same VAE:
- kept: bytes autograd holds for backward once the decode has run, counted with
  `torch.autograd.graph.saved_tensors_hooks` (every saved tensor's storage, once; not the
  VAE's weights, which are resident anyway);
- peak: the most tensor bytes alive at any moment of forward + backward, counted op by op with
  a TorchDispatchMode (a storage is added when an op returns it, removed when it is freed),
  i.e. what a GPU's `max_memory_allocated` reports, without allocator rounding.

CPU part: the Wan 2.1 VAE architecture (diffusers' `AutoencoderKLWan`) narrowed to base_dim 32
(the real one: 96; random weights) in float32 at 16x16 pixels, 17 / 33 / 81 frames; it also
checks that both decodes give the same frames and latent gradients. Meta part: the real Wan
2.1 VAE in bf16 at 480x832, 17 / 33 / 81 frames, on the `meta` device (nothing computed).

    python benchmarks/decode_memory.py [--no-meta] [--size 16] [--base-dim 32]
"""

from __future__ import annotations

import argparse
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ipro.models.vae_decode import decode_wan_vae


class PeakBytes(TorchDispatchMode):
    """Live bytes of the storages ops return while active, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _free(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self._seen:
                storage = t.untyped_storage()
                self._seen[storage] = storage.nbytes()
                weakref.finalize(storage, self._free, storage.nbytes())
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
        return out


def measure(decode, z: torch.Tensor, projection: torch.Tensor, weights):
    """(kept bytes, peak bytes, latent gradient, frames) for a reward-like scalar <decode(z), projection>."""
    kept, resident = {}, {w.untyped_storage()._cdata for w in weights}  # weights exist anyway: not counted

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in resident:
            kept[storage._cdata] = storage.nbytes()  # one entry per storage: views and repeats are free
        return t

    z = z.detach().requires_grad_(True)
    with PeakBytes() as mem:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            video = decode(z)
        (video.float() * projection).sum().backward()
    return sum(kept.values()), mem.peak, z.grad, video.detach()


def main(size: int = 16, base_dim: int = 32, meta: bool = True) -> list[dict]:
    """CPU part: frame side `size` (multiple of 8), VAE width `base_dim`; meta: add the real size on the meta device."""
    from diffusers import AutoencoderKLWan

    torch.set_num_threads(2)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=base_dim).eval().requires_grad_(False)  # the Wan 2.1 VAE architecture, random weights
    naive = lambda z: vae.decode(z, return_dict=False)[0]  # noqa: E731
    ours = lambda z: decode_wan_vae(vae, z)  # noqa: E731
    s, rows = size // 8, []
    print(f"Wan 2.1 VAE architecture with base_dim {base_dim}, float32, {size}x{size}, CPU; MB = 1e6 bytes")
    print("frames | kept naive MB | kept ours MB | kept ratio | peak naive MB | peak ours MB | peak ratio | s naive | s ours | max frame diff | grad rel err")
    for frames in (17, 33, 81):
        z = torch.randn(1, 16, (frames - 1) // 4 + 1, s, s)
        projection = torch.randn(1, 3, frames, size, size)
        t0 = time.perf_counter()
        kept_n, peak_n, grad_n, video_n = measure(naive, z, projection, list(vae.parameters()))
        t1 = time.perf_counter()
        kept_o, peak_o, grad_o, video_o = measure(ours, z, projection, list(vae.parameters()))
        t2 = time.perf_counter()
        diff = float((video_o - video_n).abs().max())  # per-chunk post_quant_conv: float rounding only
        err = float((grad_o - grad_n).norm() / grad_n.norm())
        assert diff < 1e-4 and err < 1e-4, (diff, err)
        print(f"{frames} | {kept_n / 1e6:.1f} | {kept_o / 1e6:.1f} | {kept_o / kept_n:.4f} | {peak_n / 1e6:.1f} | {peak_o / 1e6:.1f} | "
              f"{peak_o / peak_n:.4f} | {t1 - t0:.1f} | {t2 - t1:.1f} | {diff:.1e} | {err:.1e}", flush=True)
        rows.append(dict(name=f"autograd-kept bytes, {frames} frames {size}px", ours=kept_o, reference=kept_n, ratio=kept_o / kept_n, unit="bytes"))
        rows.append(dict(name=f"peak bytes fwd+bwd, {frames} frames {size}px", ours=peak_o, reference=peak_n, ratio=peak_o / peak_n, unit="bytes"))
    if meta:
        with torch.device("meta"):
            vae = AutoencoderKLWan().requires_grad_(False)
        vae = vae.to(torch.bfloat16)
        print("the real Wan 2.1 VAE (base_dim 96), bf16, 480x832, on meta; GB = 1e9 bytes")
        print("frames | kept naive GB | kept ours GB | kept ratio | peak naive GB | peak ours GB | peak ratio")
        for frames in (17, 33, 81):
            z = torch.empty(1, 16, (frames - 1) // 4 + 1, 60, 104, device="meta", dtype=torch.bfloat16)
            projection = torch.empty(1, 3, frames, 480, 832, device="meta", dtype=torch.bfloat16)
            kept_n, peak_n, _, _ = measure(naive, z, projection, list(vae.parameters()))
            kept_o, peak_o, _, _ = measure(ours, z, projection, list(vae.parameters()))
            print(f"{frames} | {kept_n / 1e9:.1f} | {kept_o / 1e9:.2f} | {kept_o / kept_n:.4f} | {peak_n / 1e9:.1f} | {peak_o / 1e9:.2f} | {peak_o / peak_n:.4f}", flush=True)
            rows.append(dict(name=f"autograd-kept bytes, meta 480x832x{frames} bf16", ours=kept_o, reference=kept_n, ratio=kept_o / kept_n, unit="bytes"))
            rows.append(dict(name=f"peak bytes fwd+bwd, meta 480x832x{frames} bf16", ours=peak_o, reference=peak_n, ratio=peak_o / peak_n, unit="bytes"))
        # Spatial tiles (model.decode_tile) shrink what one latent frame's recompute holds.
        tiled = lambda z: decode_wan_vae(vae, z, tile=256)  # noqa: E731
        kept_t, peak_t, _, _ = measure(tiled, z, projection, list(vae.parameters()))
        print(f"81, tile 256 | {kept_n / 1e9:.1f} | {kept_t / 1e9:.2f} | {kept_t / kept_n:.4f} | {peak_n / 1e9:.1f} | {peak_t / 1e9:.2f} | {peak_t / peak_n:.4f}", flush=True)
        rows.append(dict(name="peak bytes fwd+bwd, meta 480x832x81 bf16, tile 256", ours=peak_t, reference=peak_n, ratio=peak_t / peak_n, unit="bytes"))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16, help="CPU part: frame side in pixels (multiple of 8)")
    parser.add_argument("--base-dim", type=int, default=32, help="CPU part: the VAE's base_dim (the real Wan 2.1 VAE: 96)")
    parser.add_argument("--no-meta", action="store_true", help="skip the real size (480x832, 81 frames, bf16) on the meta device")
    args = parser.parse_args()
    main(args.size, args.base_dim, not args.no_meta)
