"""Running a frozen module from CPU weights: diffusers' group offloading, one transformer
block on the accelerator at a time (on CUDA the next block is copied while one runs)."""

from __future__ import annotations

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
