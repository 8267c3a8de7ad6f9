"""Samplers on tiny random Wan checkpoints: pipeline parity, truncated gradients, SDE log-probs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanImageToVideoPipeline
from PIL import Image

from ipro.models import load_model
from ipro.sampling import flow_schedule, sample, sde_sample, sde_step_logprob

from conftest import prepared

H = W = 64
FRAMES = 9
PROMPT = "a man talks on the phone"


@pytest.mark.parametrize("family", ["wan2.1-i2v", "wan2.2-ti2v", "wan2.2-i2v-a14b"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_ode_matches_diffusers_pipeline(tiny, face, family, guidance):
    model, cond = prepared(tiny[family], face)
    with torch.no_grad():
        ours = sample(model, cond, 6, seed=7, guidance_scale=guidance).latents
    pipe = WanImageToVideoPipeline.from_pretrained(tiny[family])
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        image=Image.fromarray(face[0]), prompt=PROMPT, negative_prompt="blurry", height=H, width=W, num_frames=FRAMES,
        num_inference_steps=6, guidance_scale=guidance, output_type="latent", generator=torch.Generator().manual_seed(7),
    ).frames
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


def test_same_seed_same_video_and_k_does_not_change_values(tiny, face):
    model, cond = prepared(tiny["wan2.1-i2v"], face, finetune="lora", lora_rank=4)
    with torch.no_grad():
        a = sample(model, cond, 4, seed=1, guidance_scale=1.0).latents
        b = sample(model, cond, 4, seed=1, guidance_scale=1.0).latents
        c = sample(model, cond, 4, seed=2, guidance_scale=1.0).latents
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with_grad = sample(model, cond, 4, grad_steps=3, seed=1, guidance_scale=1.0)
    assert torch.equal(with_grad.latents.detach(), a)
    assert sample(model, cond, 4, grad_steps=(1, 3), seed=1, guidance_scale=1.0).latents.detach().equal(a)


def test_truncated_backprop_records_the_last_k_steps(tiny, face):
    model, cond = prepared(tiny["wan2.2-ti2v"], face, finetune="lora", lora_rank=4)
    rollout = sample(model, cond, 5, grad_steps=2, seed=0, guidance_scale=1.0)
    assert rollout.num_grad_steps == 2 and rollout.latents.requires_grad
    sched = rollout.schedule
    assert [float(s.sigma) for s in rollout.grad_steps] == sched.sigmas[3:5].tolist()
    assert [float(s.t) for s in rollout.grad_steps] == sched.timesteps[3:5].tolist()
    for step in rollout.grad_steps:
        assert step.v.requires_grad and step.x0.shape == step.x_t.shape
    # The state entering the window has no graph: gradient is truncated there.
    assert not rollout.grad_steps[0].x_t.requires_grad and rollout.grad_steps[1].x_t.requires_grad
    # The last step lands on sigma 0, where the Euler update is the x0 prediction (first frame imposed).
    assert torch.allclose(rollout.latents, model.impose_first_frame(rollout.grad_steps[-1].x0, cond), atol=1e-6)
    # TI2V: the first latent frame is the image's, exactly.
    assert torch.equal(rollout.latents[:, :, :1], cond.image_latents)

    none = sample(model, cond, 5, grad_steps=0, seed=0, guidance_scale=1.0)
    assert none.num_grad_steps == 0 and not none.latents.requires_grad
    ks = {sample(model, cond, 5, grad_steps=(1, 3), seed=s, guidance_scale=1.0).num_grad_steps for s in range(12)}
    assert ks <= {1, 2, 3} and len(ks) > 1
    with pytest.raises(ValueError, match="grad_steps"):
        sample(model, cond, 5, grad_steps=6, seed=0)


def test_schedule_is_the_schedulers_own(tiny):
    model = load_model(tiny["wan2.1-i2v"])
    sched = flow_schedule(model, 8)
    model.scheduler.set_timesteps(8)
    assert torch.equal(sched.sigmas, model.scheduler.sigmas) and torch.equal(sched.timesteps, model.scheduler.timesteps)
    assert sched.sigmas[0] == 1.0 and sched.sigmas[-1] == 0.0 and len(sched) == 8
    # shift=3: sigma' = 3 s / (1 + 2 s) applied to linspace(sigma_max, sigma_min, 8) (diffusers' grid)
    s = np.linspace(model.scheduler.sigma_max, model.scheduler.sigma_min, 8)
    assert np.allclose(sched.sigmas[:-1].numpy(), 3 * s / (1 + 2 * s), atol=1e-6)
    shifted = flow_schedule(model, 8, shift=5.0)
    fresh = FlowMatchEulerDiscreteScheduler(shift=5.0)
    fresh.set_timesteps(8)
    assert torch.equal(shifted.sigmas, fresh.sigmas) and (shifted.sigmas[1:-1] > sched.sigmas[1:-1]).all()

    # The released Wan checkpoints ship UniPC with flow sigmas: we take its grid (and int timesteps).
    model.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    unipc = flow_schedule(model, 8)
    model.scheduler.set_timesteps(8)
    assert torch.equal(unipc.sigmas, model.scheduler.sigmas.float()) and unipc.timesteps.dtype == torch.int64
    custom = flow_schedule(model, sigmas=[1.0, 0.75, 0.5, 0.25])
    assert len(custom) == 4 and custom.sigmas[1] == pytest.approx(3 * 0.75 / (1 + 2 * 0.75))


@pytest.mark.parametrize("family", ["wan2.1-i2v", "wan2.2-ti2v"])
def test_sde_log_probs_are_gaussian_and_recomputable(tiny, face, family):
    model, cond = prepared(tiny[family], face, finetune="lora", lora_rank=4)
    eta = 0.7
    rollout = sde_sample(model, cond, 4, eta=eta, seed=5, guidance_scale=1.0)
    sig = rollout.schedule.sigmas
    assert rollout.log_probs.shape == (1, 4) and len(rollout.states) == 5
    mask = model.generated_mask(cond)
    for i in range(4):
        x, x_next = rollout.states[i], rollout.states[i + 1]
        with torch.no_grad():
            v = model.velocity(x, rollout.schedule.timesteps[i], cond)
        # Flow-GRPO's step, written out independently of ipro.sampling.sde.
        s, s_next = float(sig[i]), float(sig[i + 1])
        dt = s_next - s
        std_t = eta * math.sqrt(s / (1 - (float(sig[1]) if s == 1.0 else s)))
        mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        elementwise = torch.distributions.Normal(mean, std_t * math.sqrt(-dt)).log_prob(x_next)
        if mask is None:
            expected = elementwise.mean()
        else:  # TI2V: the imposed first frame is not sampled, so it is not scored
            expected = elementwise[:, :, 1:].mean()
        assert torch.allclose(rollout.log_probs[0, i], expected, atol=1e-4), (i, rollout.log_probs[0, i], expected)
        # Recomputed under the same weights: the same number.
        again = sde_step_logprob(model, cond=cond, **rollout.transition(i))
        assert torch.allclose(again, rollout.log_probs[:, i], atol=1e-5)

    # Same seed, same trajectory; the recomputed log-prob carries gradient to the LoRA.
    twin = sde_sample(model, cond, 4, eta=eta, seed=5, guidance_scale=1.0)
    assert torch.equal(twin.latents, rollout.latents) and torch.equal(twin.log_probs, rollout.log_probs)
    logp = sde_step_logprob(model, cond=cond, **rollout.transition(3))
    logp.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())


def test_sde_window_and_per_sample_sigmas(tiny, face):
    model, cond = prepared(tiny["wan2.1-i2v"], face)
    window = sde_sample(model, cond, 4, seed=0, sde_steps=[1, 2], guidance_scale=1.0)
    assert (window.log_probs[:, [0, 3]] == 0).all() and (window.log_probs[:, [1, 2]] != 0).all()
    # Two transitions from different steps scored in one batch (GRPO mixes timesteps).
    group = cond.repeat_interleave(2)
    tr1, tr2 = window.transition(1), window.transition(2)
    with torch.no_grad():
        both = sde_step_logprob(
            model, torch.cat([tr1["x_t"], tr2["x_t"]]), torch.cat([tr1["x_next"], tr2["x_next"]]),
            torch.stack([tr1["sigma"], tr2["sigma"]]), torch.stack([tr1["sigma_next"], tr2["sigma_next"]]), group,
            t=torch.stack([tr1["t"], tr2["t"]]), sigma_max=tr1["sigma_max"],
        )
    assert torch.allclose(both, window.log_probs[0, [1, 2]], atol=1e-5)
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step_logprob(model, window.states[0], window.states[1], 1.0, float(window.schedule.sigmas[1]), cond)
