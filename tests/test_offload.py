"""Nothing on the accelerator that a step does not use: encoders released after their outputs
are cached, the frozen A14B expert group-offloaded, activation checkpointing on the trained
expert. On this CPU machine the devices coincide, so the tests count what runs and where
hooks move weights rather than reading `.device`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import free_port

from ipro.models import load_model
from ipro.sampling import sample

PROMPT = "a man talking on the phone"
FRAMES, H, W = 9, 64, 64


def trainer_config(dataset: Path, out: Path, **overrides):
    from ipro.train.config import load_config

    base = {
        "data.dataset": str(dataset), "data.height": 128, "data.width": 160, "data.num_frames": 9,
        "model.path": "tiny:wan2.1-i2v", "model.lora_rank": 4, "optim.steps": 1, "optim.lr": 1e-3,
        "sampler.num_steps": 4, "sampler.grad_steps": 2, "run.output_dir": str(out), "run.log_with": [],
        "run.device": "cpu", "run.seed": 3, "kl.weight": 1.0,
    }
    if overrides.get("method", "ipro") != "ipro":  # IPRO's K and KL; another method's config refuses them
        del base["sampler.grad_steps"], base["kl.weight"]
    return load_config(overrides={**base, **overrides})


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]  # counted on entry: a checkpoint's recompute stops as soon as it has what backward needs
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def randomize_lora(module: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """peft starts LoRA B at zero; give it weights so the adapter changes outputs and A gets gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def group_offloaded(module: torch.nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)  # diffusers' hook registry, if any hook was ever added
    return registry is not None and "group_offloading" in registry.hooks


def lora_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad and p.grad is not None}


# --- Encoders ------------------------------------------------------------------------------


def test_trainer_caches_encoder_outputs_and_a_step_never_runs_the_encoders(dataset, tmp_path):
    from ipro.train.ipro import IPROTrainer

    trainer = IPROTrainer(trainer_config(dataset, tmp_path))
    model = trainer.model
    encoders = (model.pipe.text_encoder, model.pipe.image_encoder)
    assert all(p.device.type == "cpu" for e in encoders for p in e.parameters())
    assert len(model._clip_cache) == len(trainer.dataset)  # every item's first frame, once
    assert trainer.config.data.default_prompt in model._text_cache and "" in model._text_cache
    text_calls, image_calls = count_calls(encoders[0]), count_calls(encoders[1])

    batch = trainer.batch_at(0, 0)
    cached = trainer.condition(batch)
    trainer.step()
    assert text_calls[0] == 0 and image_calls[0] == 0  # the step read the caches only

    # The same condition from a model that never cached anything, exactly.
    fresh = load_model(trainer.output_dir / "tiny-wan2.1-i2v")
    d = trainer.config.data
    direct = fresh.prepare_condition(batch["image"], [c or d.default_prompt for c in batch["caption"]], d.num_frames, d.height, d.width)
    for field in ("prompt_embeds", "negative_prompt_embeds", "image_embeds", "image_latents"):
        assert torch.equal(getattr(cached, field), getattr(direct, field)), field

    # A prompt and an image nobody cached are still encoded (on the encoders' device).
    image = torch.rand(1, 3, d.height, d.width, generator=torch.Generator().manual_seed(0))
    late = model.prepare_condition(image, ["a prompt nobody cached"], d.num_frames, d.height, d.width)
    direct = fresh.prepare_condition(image, ["a prompt nobody cached"], d.num_frames, d.height, d.width)
    assert text_calls[0] == 1 and image_calls[0] == 1
    assert torch.equal(late.prompt_embeds, direct.prompt_embeds) and torch.equal(late.image_embeds, direct.image_embeds)


# --- The frozen A14B expert ------------------------------------------------------------------


def a14b(tiny, offload: bool, checkpointing: bool = False):
    torch.manual_seed(0)  # peft draws LoRA A from the global generator
    model = load_model(tiny["wan2.2-i2v-a14b"], finetune="lora", lora_rank=4, offload_frozen_expert=offload,
                       gradient_checkpointing=checkpointing)
    randomize_lora(model.trainable_module)
    return model


def rollout_and_backward(model, face) -> torch.Tensor:
    cond = model.prepare_condition(face[1], [PROMPT], FRAMES, H, W)
    # 4 steps from t = 1000: the first runs the high-noise (frozen) expert, the last two train.
    rollout = sample(model, cond, 4, grad_steps=2, seed=0, guidance_scale=1.0)
    rollout.latents.square().mean().backward()
    return rollout.latents.detach()


def test_frozen_expert_runs_offloaded_with_identical_outputs(tiny, face, monkeypatch):
    from diffusers.hooks.group_offloading import ModuleGroup

    moves = {"onload": 0, "offload": 0}
    for name in moves:
        original = getattr(ModuleGroup, f"{name}_")

        def counted(self, _original=original, _name=name):
            moves[_name] += 1
            return _original(self)

        monkeypatch.setattr(ModuleGroup, f"{name}_", counted)

    plain, offloaded = a14b(tiny, offload=False), a14b(tiny, offload=True)
    frozen = offloaded.frozen_expert
    assert frozen is offloaded.transformer and frozen is not offloaded.trainable_module
    assert group_offloaded(frozen) and not group_offloaded(plain.transformer)
    offloaded.to("cpu")  # moving the model again keeps the hooks (the trainer does this)
    moves.update(onload=0, offload=0)

    latents_plain, latents_offloaded = rollout_and_backward(plain, face), rollout_and_backward(offloaded, face)
    assert torch.equal(latents_plain, latents_offloaded)
    grads_plain, grads_offloaded = lora_grads(plain.trainable_module), lora_grads(offloaded.trainable_module)
    assert grads_plain.keys() == grads_offloaded.keys() and len(grads_plain) > 0
    for k in grads_plain:
        assert torch.equal(grads_plain[k], grads_offloaded[k]), k

    # The frozen expert holds no gradient, and every block it brought in went back out.
    assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())
    blocks = len(frozen.blocks) + 1  # one group per block, plus the layers outside the blocks
    assert moves["onload"] == moves["offload"] == blocks  # one high-noise forward in this rollout
    assert all(p.device.type == "cpu" for p in frozen.parameters())


def test_trainer_offloads_the_frozen_expert_from_the_config(dataset, tmp_path):
    from ipro.train.sft import SFTTrainer

    trainer = SFTTrainer(trainer_config(dataset, tmp_path, method="sft", **{"model.path": "tiny:wan2.2-i2v-a14b"}))
    frozen = trainer.model.frozen_expert
    assert frozen is not None and group_offloaded(frozen)
    assert trainer.model._offloaded_to == trainer.accelerator.device
    off = SFTTrainer(trainer_config(dataset, tmp_path / "off", method="sft", **{"model.path": "tiny:wan2.2-i2v-a14b", "model.offload_frozen_expert": False}))
    assert not group_offloaded(off.model.frozen_expert)


# --- Activation checkpointing ----------------------------------------------------------------


def test_gradient_checkpointing_recomputes_the_trained_expert_with_the_same_gradients(tiny, face):
    plain, checkpointed = a14b(tiny, offload=True), a14b(tiny, offload=True, checkpointing=True)
    assert not plain.trainable_module.gradient_checkpointing and checkpointed.trainable_module.gradient_checkpointing
    assert not checkpointed.transformer.gradient_checkpointing  # the frozen expert keeps no activations anyway
    calls = [count_calls(m.trainable_module.blocks[0]) for m in (plain, checkpointed)]
    latents = [rollout_and_backward(m, face) for m in (plain, checkpointed)]
    assert torch.equal(latents[0], latents[1])
    assert calls[1][0] == calls[0][0] + 2  # both gradient steps' block ran again in backward
    g0, g1 = lora_grads(plain.trainable_module), lora_grads(checkpointed.trainable_module)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7)


def test_ipro_step_with_activations_offloaded_equals_the_plain_step(dataset, tmp_path):
    """model.offload_activations: the same loss and LoRA gradients (on the CPU nothing moves,
    so this checks the hooks leave the step exact; the memory effect is traced in
    test_memory_plan on meta tensors)."""
    from ipro.train.ipro import IPROTrainer

    grads, losses = [], []
    for offload in (False, True):
        cfg = trainer_config(dataset, tmp_path / str(offload), **{"model.gradient_checkpointing": True, "model.offload_activations": offload})
        trainer = IPROTrainer(cfg)
        randomize_lora(trainer.model.trainable_module)
        loss, _ = trainer.compute_loss(trainer.batch_at(0, 0), torch.Generator().manual_seed(0))
        loss.backward()
        losses.append(loss.detach())
        grads.append(lora_grads(trainer.model.trainable_module))
    assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])


# --- FSDP2 -----------------------------------------------------------------------------------


HARNESS = str(Path(__file__).with_name("_fsdp_train.py"))


def run_harness(*args: str) -> None:
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory) -> Path:
    """The reference: one process, both samples as two micro-batches, no checkpointing."""
    out = tmp_path_factory.mktemp("one-process")
    run_harness(HARNESS, str(dataset), str(out), "single", "0")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fsdp2", "ddp"])
def test_two_process_step_with_checkpointing_equals_one_process(one_process, dataset, tmp_path, layout):
    """An IPRO step of the A14B preset on two gloo processes, sharded by FSDP2
    (configs/accelerate/fsdp2.yaml) or replicated by DDP, with gradient checkpointing on,
    against one process taking both samples with it off: same loss, gradients and update to
    float32 rounding; FSDP2 shards only the trained expert; the checkpoint resumes."""
    import json

    from safetensors.torch import load_file

    run_harness("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(), HARNESS, str(dataset), str(tmp_path), layout, "1")
    one, two = (json.loads((run / "result.json").read_text()) for run in (one_process, tmp_path))
    assert two["trained_expert_sharded"] == (layout == "fsdp2") and not two["frozen_expert_sharded"]
    assert two["resume_restores_state"]
    assert one["loss"] > 0 and two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    for name in ("grads.safetensors", "checkpoint-1/trainable.safetensors", "checkpoint-1/lora/pytorch_lora_weights.safetensors"):
        a, b = load_file(one_process / name), load_file(tmp_path / name)
        assert a.keys() == b.keys() and len(a) > 0, name
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4 * float(a[k].abs().max()), msg=f"{name}: {k}")
    assert all(g.abs().sum() > 0 for g in load_file(one_process / "grads.safetensors").values())  # every LoRA weight moved
