"""Sampler cost: truncated backprop (DRaFT-K) vs the full chain, and the adapter's overhead.

A tiny random Wan 2.1 I2V model (`ipro.models.tiny`, 2 blocks, width 24) with a rank-4
LoRA, one video of 33 frames at 128x128 (9 x 16 x 16 latents, 576 tokens), T = 8 Euler
steps, guidance 1. The loss is the mean square of the final latents, so the numbers are
the sampler's alone (a reward's decode + recognizer cost is the same for every K).

- time: rollout + backward, best of REPEATS.
- memory: bytes autograd keeps for backward (every tensor saved by the graph, counted once
  per storage, via torch.autograd.graph.saved_tensors_hooks). This is the activation memory
  that truncation saves; it is exact and independent of the allocator and of other jobs on
  the machine. On CUDA the peak of torch.cuda.max_memory_allocated is reported as well.
- overhead: `ipro.sampling.sample` (no grad) vs a plain diffusers loop (transformer call +
  FlowMatchEulerDiscreteScheduler.step) on the same model, inputs and steps; target <= 1.05.

    python benchmarks/sampling.py [--device cuda]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

import torch

T = 8
KS = (1, 2, 4)
FRAMES, SIZE = 33, 128
REPEATS = 3
OVERHEAD_REPEATS = 7


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def saved_bytes(fn) -> int:
    """Run fn() and count the bytes of the tensors autograd saved for backward (once per storage)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def main(device: str | None = None) -> list[dict]:
    from ipro.models import build_tiny, load_model
    from ipro.sampling import sample

    torch.set_num_threads(1)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    folder = build_tiny("wan2.1-i2v", tempfile.mkdtemp(prefix="ipro_bench_"), seed=0)
    model = load_model(folder, finetune="lora", lora_rank=4, device=device)
    with torch.no_grad():  # give LoRA B weights, so the adapter is not a no-op
        for name, p in model.trainable_module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    cond = model.prepare_condition(image, ["a person talks"], FRAMES, SIZE, SIZE)

    def rollout(k: int) -> torch.Tensor:
        return sample(model, cond, T, grad_steps=k, seed=0, guidance_scale=1.0).latents.square().mean()

    def train_step(k: int) -> float:
        model.trainable_module.zero_grad(set_to_none=True)
        sync(device)
        t0 = time.perf_counter()
        rollout(k).backward()
        sync(device)
        return time.perf_counter() - t0

    def cuda_peak(k: int) -> int:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        rollout(k).backward()
        return torch.cuda.max_memory_allocated() - base

    train_step(T)  # warm-up
    times = {k: min(train_step(k) for _ in range(REPEATS)) for k in (*KS, T)}
    memory = {k: saved_bytes(lambda k=k: rollout(k)) for k in (*KS, T)}

    rows = []
    for k in KS:
        rows.append({"name": f"truncated backprop K={k} vs full chain K={T}: time (rollout + backward)",
                     "ours": times[k], "reference": times[T], "ratio": times[k] / times[T], "unit": "s"})
        rows.append({"name": f"truncated backprop K={k} vs full chain K={T}: autograd saved activations",
                     "ours": memory[k] / 2**20, "reference": memory[T] / 2**20, "ratio": memory[k] / memory[T], "unit": "MiB"})
    if torch.device(device).type == "cuda":
        peaks = {k: cuda_peak(k) for k in (*KS, T)}
        for k in KS:
            rows.append({"name": f"truncated backprop K={k} vs K={T}: CUDA peak allocated above baseline",
                         "ours": peaks[k] / 2**20, "reference": peaks[T] / 2**20, "ratio": peaks[k] / peaks[T], "unit": "MiB"})

    # Adapter overhead: the same 8 steps through VideoModel + sample() vs a raw diffusers loop.
    base = load_model(folder, device=device)
    cond = base.prepare_condition(image, ["a person talks"], FRAMES, SIZE, SIZE)
    noise = torch.randn(base.latent_shape(1, FRAMES, SIZE, SIZE), generator=torch.Generator().manual_seed(0)).to(device)
    transformer, scheduler = base.transformer, base.scheduler

    @torch.no_grad()
    def raw_loop() -> torch.Tensor:
        scheduler.set_timesteps(T, device=device)
        latents = noise
        for t in scheduler.timesteps:
            v = transformer(
                hidden_states=torch.cat([latents, cond.image_latents], dim=1), timestep=t.expand(1),
                encoder_hidden_states=cond.prompt_embeds, encoder_hidden_states_image=cond.image_embeds, return_dict=False,
            )[0]
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
        return latents

    @torch.no_grad()
    def ours() -> torch.Tensor:
        return sample(base, cond, T, guidance_scale=1.0, noise=noise).latents

    assert torch.allclose(ours(), raw_loop(), atol=1e-5), "the two loops must compute the same thing"

    def timed(fn) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    t_ours, t_raw = [], []
    for _ in range(OVERHEAD_REPEATS):  # interleaved, so load on the machine hits both alike
        t_ours.append(timed(ours))
        t_raw.append(timed(raw_loop))
    ours_s, raw_s = statistics.median(t_ours), statistics.median(t_raw)
    rows.append({"name": f"adapter + sampler vs raw diffusers loop ({T} steps, no grad; target <= 1.05)",
                 "ours": ours_s, "reference": raw_s, "ratio": ours_s / raw_s, "unit": "s"})

    width = max(len(r["name"]) for r in rows)
    print(f"{'':{width}}  {'ours':>10}  {'reference':>10}  {'ratio':>7}  unit")
    for r in rows:
        print(f"{r['name']:{width}}  {r['ours']:10.4g}  {r['reference']:10.4g}  {r['ratio']:7.3f}  {r['unit']}")
    return rows


if __name__ == "__main__":
    main(sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else None)
