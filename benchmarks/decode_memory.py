"""Memory of a differentiable Wan VAE decode: ipro's checkpointed decode vs diffusers' `vae.decode`.

Two numbers per clip length, both for the same latents and the same VAE:
- kept: bytes autograd holds for backward once the decode has run, counted with
  `torch.autograd.graph.saved_tensors_hooks` (every saved tensor's storage, once);
- peak: the most tensor bytes alive at any moment of forward + backward, counted op by op with
  a TorchDispatchMode (a storage is added when an op returns it, removed when it is freed),
  i.e. what a GPU's `max_memory_allocated` reports, without allocator rounding.

CPU part: the real Wan 2.1 VAE architecture (diffusers' default `AutoencoderKLWan()`, base_dim
96, random weights) in float32 at 16x16 pixels, 17 / 33 / 81 frames; it also checks that both
decodes give the same frames and latent gradients. Meta part (`--meta`): the same VAE in bf16
at 480x832, 81 frames, on the `meta` device (nothing computed).

    python benchmarks/decode_memory.py [--meta] [--size 32]
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


def measure(decode, z: torch.Tensor, projection: torch.Tensor):
    """(kept bytes, peak bytes, latent gradient, frames) for a reward-like scalar <decode(z), projection>."""
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        kept[storage._cdata] = storage.nbytes()  # one entry per storage: views and repeats are free
        return t

    z = z.detach().requires_grad_(True)
    with PeakBytes() as mem:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            video = decode(z)
        (video.float() * projection).sum().backward()
    return sum(kept.values()), mem.peak, z.grad, video.detach()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16, help="CPU part: frame side in pixels (multiple of 16)")
    parser.add_argument("--meta", action="store_true", help="also the real size (480x832, 81 frames, bf16) on the meta device")
    args = parser.parse_args()
    from diffusers import AutoencoderKLWan

    torch.set_num_threads(2)
    torch.manual_seed(0)
    vae = AutoencoderKLWan().eval().requires_grad_(False)  # the Wan 2.1 VAE architecture, random weights
    naive = lambda z: vae.decode(z, return_dict=False)[0]  # noqa: E731
    ours = lambda z: decode_wan_vae(vae, z)  # noqa: E731
    s = args.size // 8
    print(f"Wan 2.1 VAE (base_dim 96), float32, {args.size}x{args.size}, CPU; MB = 1e6 bytes")
    print("frames | kept naive MB | kept ours MB | kept ratio | peak naive MB | peak ours MB | peak ratio | s naive | s ours | grad rel err")
    for frames in (17, 33, 81):
        z = torch.randn(1, 16, (frames - 1) // 4 + 1, s, s)
        projection = torch.randn(1, 3, frames, args.size, args.size)
        t0 = time.perf_counter()
        kept_n, peak_n, grad_n, video_n = measure(naive, z, projection)
        t1 = time.perf_counter()
        kept_o, peak_o, grad_o, video_o = measure(ours, z, projection)
        t2 = time.perf_counter()
        assert torch.equal(video_n, video_o), "the decodes differ"
        err = float((grad_o - grad_n).norm() / grad_n.norm())
        print(f"{frames} | {kept_n / 1e6:.1f} | {kept_o / 1e6:.1f} | {kept_o / kept_n:.4f} | {peak_n / 1e6:.1f} | {peak_o / 1e6:.1f} | "
              f"{peak_o / peak_n:.4f} | {t1 - t0:.1f} | {t2 - t1:.1f} | {err:.1e}", flush=True)
    if args.meta:
        with torch.device("meta"):
            vae = AutoencoderKLWan().requires_grad_(False)
        vae = vae.to(torch.bfloat16)
        z = torch.empty(1, 16, 21, 60, 104, device="meta", dtype=torch.bfloat16)
        projection = torch.empty(1, 3, 81, 480, 832, device="meta", dtype=torch.bfloat16)
        kept_n, peak_n, _, _ = measure(naive, z, projection)
        kept_o, peak_o, _, _ = measure(ours, z, projection)
        print("meta, Wan 2.1 VAE bf16 480x832x81 | kept naive GB | kept ours GB | ratio | peak naive GB | peak ours GB | ratio")
        print(f"81 | {kept_n / 1e9:.1f} | {kept_o / 1e9:.2f} | {kept_o / kept_n:.4f} | {peak_n / 1e9:.1f} | {peak_o / 1e9:.2f} | {peak_o / peak_n:.4f}")


if __name__ == "__main__":
    main()
