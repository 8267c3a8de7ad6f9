"""Keeping the accelerator for what the current phase uses: a frozen module runs from CPU
weights one transformer block at a time (diffusers' group offloading), and the activations
autograd saves for backward can wait in CPU memory (`ActivationsOnCPU`)."""

from __future__ import annotations

import contextlib

import torch


def offload_blockwise(module: torch.nn.Module, device: torch.device, onloaded_to: torch.device | None) -> torch.device:
    """Keep `module`'s weights on the CPU and run it on `device` block by block. `onloaded_to`
    is the device it was set up for before (None: never); returns the new one."""
    if onloaded_to == device:
        return device
    if onloaded_to is not None:  # onloading elsewhere now: drop the old hooks first
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.group_offloading import _GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING

        registry = HookRegistry.check_if_exists_or_initialize(module)
        for name in (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING):
            registry.remove_hook(name, recurse=True)
    module.to("cpu")
    cuda = device.type == "cuda"
    module.enable_group_offload(
        onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
        num_blocks_per_group=1, use_stream=cuda, non_blocking=cuda,
    )
    return device


class ActivationsOnCPU(torch.autograd.graph.saved_tensors_hooks):
    """Inside this block, what autograd saves for backward waits in CPU memory instead of on the
    accelerator, and comes back when backward needs it (like `torch.autograd.graph.save_on_cpu`,
    with two differences). Weights are not copied: a saved tensor that shares storage with one
    of `keep`'s parameters stays where it is (copying 14B weights per step would be the cost
    of nothing). On the `meta` device, used by `ipro plan`, a saved tensor is dropped and
    re-created empty when backward unpacks it, so the trace counts exactly what the GPU holds.

    IPRO's K gradient steps with gradient checkpointing save one input per transformer block
    and step (13.4 GB per step for a 14B model at 81 x 480 x 832): that is what this moves off.
    """

    def __init__(self, keep: torch.nn.Module | None = None, pin_memory: bool = True) -> None:
        kept = {p.untyped_storage()._cdata for p in keep.parameters()} if keep is not None else set()
        pin = pin_memory and torch.cuda.is_available()

        def pack(t: torch.Tensor):
            if t.device.type == "cpu" or t.untyped_storage()._cdata in kept:
                return t
            if t.device.type == "meta":
                return ("meta", t.size(), t.stride(), t.dtype)
            host = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, pin_memory=pin)
            host.copy_(t, non_blocking=pin)
            return (t.device, host)

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            if packed[0] == "meta":
                _, size, stride, dtype = packed
                return torch.empty_strided(size, stride, dtype=dtype, device="meta")
            device, host = packed
            return host.to(device, non_blocking=pin)

        super().__init__(pack, unpack)


def activations_on_cpu(model, enabled: bool = True):
    """`ActivationsOnCPU` keeping the model's trained weights in place, or a no-op when not enabled."""
    return ActivationsOnCPU(model.trainable_module) if enabled else contextlib.nullcontext()
