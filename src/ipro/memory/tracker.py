"""Count live tensor memory op by op, without computing anything (works on `meta` tensors).

`LiveMemory` is a `TorchDispatchMode`: every tensor an aten op returns adds the bytes of its
storage (once per storage, so views and in-place results are free) and a weakref finalizer
on the storage subtracts them when the last reference goes. The running total and its peak
are what a GPU's caching allocator would report as allocated bytes (torch.cuda.max_memory_allocated)
minus rounding to 512-byte blocks and fragmentation.

Fused attention. On a GPU, `F.scaled_dot_product_attention` runs a flash / memory-efficient
kernel that keeps only the output and a float32 log-sum-exp (B, heads, L) for backward: O(L)
memory. On `meta` (and for some masks on CPU) the dispatcher may decompose it into math
attention with an (L x L) score matrix per head, which would be O(L^2). Inside `LiveMemory`
with `fused_attention=True`, every SDPA call is replaced by an autograd function that
allocates exactly what the fused kernel does: output + log-sum-exp forward, and dq, dk, dv
backward (q, k, v, output and log-sum-exp are what it saves). It is only used on meta tensors.

    with LiveMemory(resident=weight_bytes) as mem:
        with mem.phase("forward"):
            y = model(x)
    mem.peak, mem.phases["forward"]
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


class _FusedAttention(torch.autograd.Function):
    """What a flash-attention kernel allocates, on meta tensors: out + logsumexp, then dq/dk/dv."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_sdpa = F.scaled_dot_product_attention


def _attention_as_fused(query, key, value, *args, **kwargs):
    if query.device.type == "meta":
        return _FusedAttention.apply(query, key, value)
    return _sdpa(query, key, value, *args, **kwargs)


class LiveMemory(TorchDispatchMode):
    """Live and peak bytes of the tensors ops create while active (see the module docstring).

    resident: bytes held before tracing starts that no tensor here stands for; `hold` counts
    existing tensors (weights, optimizer state), `add` and `remove` adjust by hand.
    """

    def __init__(self, resident: int = 0, fused_attention: bool = True) -> None:
        super().__init__()
        self.live = int(resident)
        self.peak = self.live
        self.phases: dict[str, int] = {}
        self._phase: str | None = None
        self._seen: dict[int, int] = {}
        self._windows: list[int] = []
        self.fused_attention = fused_attention

    # --- bookkeeping -------------------------------------------------------------------

    def _grow(self, nbytes: int) -> None:
        self.live += nbytes
        if self.live > self.peak:
            self.peak = self.live
        for i, local in enumerate(self._windows):
            if self.live > local:
                self._windows[i] = self.live
        if self._phase is not None and self.live > self.phases[self._phase]:
            self.phases[self._phase] = self.live

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.pop(key, None)
        self.live -= nbytes

    def add(self, nbytes: int) -> None:
        """Bytes that become resident outside any op (e.g. weights moved onto the device)."""
        self._grow(int(nbytes))

    def remove(self, nbytes: int) -> None:
        self.live -= int(nbytes)

    def hold(self, tensors) -> int:
        """Count tensors that already exist (weights, optimizer state) as live until freed;
        returns the bytes added. Views of them that ops return later then cost nothing."""
        before = self.live
        for t in tensors:
            if t is not None:
                self.track(t)
        return self.live - before

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata  # the StorageImpl's address: unique while it lives, dropped when it goes
        if key in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[key] = nbytes
        weakref.finalize(storage, self._freed, key, nbytes)
        self._grow(nbytes)

    def spike(self, nbytes: int) -> None:
        """A transient of nbytes above the live total that is gone again (a replayed call)."""
        self._grow(int(nbytes))
        self.live -= int(nbytes)

    @contextmanager
    def window(self) -> Iterator[list[int]]:
        """Yields a one-element list that holds, after the block, its peak above the live bytes at entry."""
        start = self.live
        self._windows.append(start)
        out = [0]
        try:
            yield out
        finally:
            out[0] = self._windows.pop() - start

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the peak of live bytes inside this block under `name` (the max if repeated)."""
        outer = self._phase
        self.phases[name] = max(self.phases.get(name, 0), self.live)
        self._phase = name
        try:
            yield
        finally:
            self._phase = outer
            if outer is not None:
                self.phases[outer] = max(self.phases[outer], self.phases[name])

    # --- the mode ----------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.track(out)
        elif isinstance(out, (tuple, list)):  # aten ops return a tensor, or a flat tuple/list of them
            for t in out:
                if isinstance(t, torch.Tensor):
                    self.track(t)
        return out

    # The swap is a module attribute, not a TorchFunctionMode: activation checkpointing
    # recomputes in backward, where function modes are not active but attribute lookups are.
    def __enter__(self):
        if self.fused_attention:
            F.scaled_dot_product_attention = _attention_as_fused
        return super().__enter__()

    def __exit__(self, *exc):
        if self.fused_attention:
            F.scaled_dot_product_attention = _sdpa
        return super().__exit__(*exc)


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind these tensors (parameters, buffers, states)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        key = (t.device.type, id(st)) if t.device.type == "meta" else (t.device.type, st.data_ptr())
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total
