"""Faithful to both papers at their real settings (issue #16): Lightning LoRA per expert, the
KL under the rollout's guidance and over the trained expert only, identity-grpo's sampler,
the face reward in float32 under mixed precision, and the SFT ablation's face loss."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from conftest import to_tensor, randomize_lora, prepared
from ipro.errors import IproError
from ipro.models import load_model
from ipro.sampling import sample, sde_sample, sde_step_logprob, sde_transition
from ipro.train.grpo import trained_steps
from ipro.train.kl import multistep_kl, sde_kl

H = W = 64
FRAMES = 9
PROMPT = "a man talks on the phone"


# --- 1. Lightning LoRA: one file per expert, in the layout they are published in ---------

# Wan's original module names, as lightx2v's Wan2.2-Lightning files (and ComfyUI) write them.
ORIGINAL = {"self_attn.q": "attn1.to_q", "self_attn.o": "attn1.to_out.0", "cross_attn.k": "attn2.to_k", "ffn.0": "ffn.net.0.proj"}


def write_published_lora(path, transformer, seed: int, rank: int = 4, alpha: float = 8.0) -> dict:
    """A LoRA file with `diffusion_model.blocks.N.<wan name>.lora_down/lora_up/alpha` keys;
    returns the weight update it means for each diffusers module: (alpha / rank) up @ down."""
    g = torch.Generator().manual_seed(seed)
    state, deltas = {}, {}
    for n in range(len(transformer.blocks)):
        for original, ours in ORIGINAL.items():
            weight = transformer.get_submodule(f"blocks.{n}.{ours}").weight
            down = torch.randn(rank, weight.shape[1], generator=g) * 0.1
            up = torch.randn(weight.shape[0], rank, generator=g) * 0.1
            key = f"diffusion_model.blocks.{n}.{original}"
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)})
            deltas[f"blocks.{n}.{ours}"] = alpha / rank * up @ down
    save_file(state, str(path))
    return deltas


def test_lightning_lora_per_expert_in_published_layout(tiny, tmp_path):
    base = load_model(tiny["wan2.2-i2v-a14b"])
    high = write_published_lora(tmp_path / "high_noise_model.safetensors", base.transformer, seed=1)
    low = write_published_lora(tmp_path / "low_noise_model.safetensors", base.transformer_2, seed=2)
    merged = load_model(tiny["wan2.2-i2v-a14b"], lightning=[tmp_path / "high_noise_model.safetensors", tmp_path / "low_noise_model.safetensors"])
    for expert, before, deltas in ((merged.transformer, base.transformer, high), (merged.transformer_2, base.transformer_2, low)):
        for name, delta in deltas.items():
            change = expert.get_submodule(name).weight - before.get_submodule(name).weight
            assert torch.allclose(change, delta, atol=1e-5), (name, (change - delta).abs().max())
    # A module neither file touches keeps its weights in both experts.
    for expert, before in ((merged.transformer, base.transformer), (merged.transformer_2, base.transformer_2)):
        assert torch.equal(expert.get_submodule("blocks.0.attn1.to_k").weight, before.get_submodule("blocks.0.attn1.to_k").weight)
    assert merged.default_guidance == 1.0 and merged.default_steps == 4

    # One file for two experts is refused (it used to be merged into both), naming the field.
    with pytest.raises(IproError, match=r"model\.lightning_lora.*high_noise"):
        load_model(tiny["wan2.2-i2v-a14b"], lightning=tmp_path / "low_noise_model.safetensors")


def test_generate_takes_one_lightning_file_per_expert(tiny, face, tmp_path):
    from typer.testing import CliRunner

    import ipro.cli.generate  # noqa: F401  (registers the command)
    from ipro.cli.main import app
    from ipro.data.video import write_image

    base = load_model(tiny["wan2.2-i2v-a14b"])
    files = [tmp_path / "high.safetensors", tmp_path / "low.safetensors"]
    for seed, (path, expert) in enumerate(zip(files, base.transformers)):
        write_published_lora(path, expert, seed=seed)
    write_image(tmp_path / "face.png", face[0])
    args = ["generate", str(tmp_path / "face.png"), "--model", str(tiny["wan2.2-i2v-a14b"]), "--num-frames", "5",
            "--height", "32", "--width", "32", "--out", str(tmp_path / "out")]
    one = CliRunner().invoke(app, [*args, "--lightning", str(files[1])])
    assert isinstance(one.exception, IproError) and "high_noise" in str(one.exception)
    both = CliRunner().invoke(app, [*args, "--lightning", str(files[0]), "--lightning", str(files[1])])
    assert both.exit_code == 0, both.output + repr(both.exception)
    assert (tmp_path / "out" / "face.mp4").is_file()


def test_lightning_lora_config_takes_one_path_per_expert():
    from ipro.train.config import load_config

    pair = {"high_noise": "h.safetensors", "low_noise": "l.safetensors"}
    assert load_config("configs/wan22-a14b-ipro.yaml", {"model.lightning_lora": pair}).model.lightning_lora == ["h.safetensors", "l.safetensors"]
    assert load_config("configs/wan22-a14b-ipro.yaml", {"model.lightning_lora": ["h", "l"]}).model.lightning_lora == ["h", "l"]
    preset = load_config("configs/wan22-a14b-ipro.yaml").model.lightning_lora
    assert len(preset) == 2 and "high_noise" in preset[0] and "low_noise" in preset[1]
    with pytest.raises(IproError, match=r"model\.lightning_lora takes the keys high_noise and low_noise"):
        load_config("configs/wan22-a14b-ipro.yaml", {"model.lightning_lora": {"high": "h"}})


# --- 2. The KL's base model sees the rollout's guidance and negative prompt ------------

@pytest.mark.parametrize("family", ["wan2.1-i2v", "wan2.2-ti2v"])
@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_kl_is_zero_at_initialisation_under_guidance(tiny, face, family, guidance):
    model, cond = prepared(tiny[family], face, finetune="lora", lora_rank=4)
    rollout = sample(model, cond, 4, grad_steps=2, seed=0, guidance_scale=guidance)
    assert multistep_kl(model, rollout, cond, "sigma").item() == 0.0  # LoRA B = 0: policy == base model
    sde = sde_sample(model, cond, 4, seed=0, guidance_scale=guidance)
    _, mean, std = sde_transition(model, cond, **sde.transition(1))
    assert sde_kl(model, cond, mean, std, sde.transition(1)).item() == 0.0
    randomize_lora(model)  # and it measures something once the adapter moves
    rollout = sample(model, cond, 4, grad_steps=2, seed=0, guidance_scale=guidance)
    assert multistep_kl(model, rollout, cond, "sigma").item() > 0


# --- 3. Only the trained expert's steps count ---------------------------------------------

def test_kl_averages_over_the_trained_expert_steps_only(tiny, face):
    model, cond = prepared(tiny["wan2.2-i2v-a14b"], face, finetune="lora", lora_rank=4)  # LoRA on the low-noise expert
    randomize_lora(model)
    rollout = sample(model, cond, 4, grad_steps=4, seed=0, guidance_scale=1.0)
    boundary = model.boundary_ratio * model.num_train_timesteps
    high = [float(s.t) >= boundary for s in rollout.grad_steps]
    assert any(high) and not all(high)  # the K steps reach into the frozen high-noise expert
    terms = []
    with torch.no_grad():
        for step, is_high in zip(rollout.grad_steps, high):
            with model.base_weights():
                v_base = model.velocity(step.x_t, step.t, cond)
            term = ((step.v - v_base) ** 2).mean() / (2 * float(step.sigma) ** 2)
            assert (term == 0) == is_high  # the frozen expert's steps have no difference at all
            if not is_high:
                terms.append(term)
    kl = multistep_kl(model, rollout, cond, "sigma")
    assert torch.allclose(kl, torch.stack(terms).mean(), rtol=1e-5)
    assert kl > torch.stack(terms).sum() / len(high) * 1.01  # not diluted by the high-noise zeros
    # GRPO's update trains the same steps.
    sde = sde_sample(model, cond, 4, seed=0, guidance_scale=1.0)
    assert trained_steps(model, sde) == [i for i, is_high in enumerate(high) if not is_high]


# --- 4. identity-grpo's sampler: its noise schedule and timestep fraction -----------------

@pytest.mark.parametrize("schedule", ["flow_grpo", "identity_grpo"])
def test_sde_log_prob_matches_gaussian_density(tiny, face, schedule):
    model, cond = prepared(tiny["wan2.1-i2v"], face, finetune="lora", lora_rank=4)
    eta = 0.7
    rollout = sde_sample(model, cond, 5, eta=eta, seed=3, guidance_scale=4.5, noise_schedule=schedule)
    sig = [float(s) for s in rollout.schedule.sigmas]
    for i in range(5):
        x, x_next = rollout.states[i], rollout.states[i + 1]
        with torch.no_grad():
            v = model.velocity(x, rollout.schedule.timesteps[i], cond, 4.5)
        s, s_next = sig[i], sig[i + 1]
        dt = s_next - s
        if schedule == "flow_grpo":  # Flow-GRPO: eta sqrt(sigma / (1 - sigma)), sigma capped at the 2nd sigma
            std_t = eta * math.sqrt(s / (1 - min(s, sig[1])))
        else:  # identity-grpo: sigma_min + (sigma_max - sigma_min) sigma, from the schedule's 2nd and last sigma
            std_t = sig[-1] + (sig[1] - sig[-1]) * s
        mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        expected = torch.distributions.Normal(mean, std_t * math.sqrt(-dt)).log_prob(x_next).mean()
        assert torch.allclose(rollout.log_probs[0, i], expected, atol=1e-4), (i, rollout.log_probs[0, i], expected)
        again = sde_step_logprob(model, cond=cond, **rollout.transition(i))
        assert torch.allclose(again, rollout.log_probs[:, i], atol=1e-5)


def test_noise_schedules_differ_and_timestep_fraction(tiny, face):
    model, cond = prepared(tiny["wan2.1-i2v"], face)
    flow = sde_sample(model, cond, 25, seed=0, guidance_scale=1.0, noise_schedule="flow_grpo")
    ident = sde_sample(model, cond, 25, seed=0, guidance_scale=1.0, noise_schedule="identity_grpo")
    assert not torch.allclose(flow.latents, ident.latents)
    assert trained_steps(model, ident, 0.99) == list(range(24))  # identity-grpo: int(25 * 0.99) steps
    assert trained_steps(model, ident, 1.0) == list(range(25))
    with pytest.raises(IproError, match="grpo.timestep_fraction"):
        trained_steps(model, ident, 0.01)


# --- 5. The face reward runs in float32 under mixed precision ------------------------------

def test_face_reward_is_float32_under_bf16_autocast(carphone):
    from ipro.faces.embedder import FaceEmbedder
    from ipro.rewards import FaceIdentityReward
    from ipro.rewards.face import pools_from_video

    embedder = FaceEmbedder()
    pool = pools_from_video(embedder, to_tensor(carphone[::4])[None], identity_threshold=0.92)[0]
    reward = FaceIdentityReward(embedder)
    frames = to_tensor(carphone[3:100:12])[None].requires_grad_(True)  # 9 frames, one face each
    full = reward(frames, {"pools": [pool]})
    chips = torch.rand(4, 3, 150, 150)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what accelerate's mixed_precision bf16 runs steps under
        mixed = reward(frames, {"pools": [pool]})
        recognizer_bf16 = embedder.recognizer(chips).float()  # the bare recognizer, nothing stopping autocast
    assert torch.allclose(mixed.raw, full.raw, atol=1e-4) and torch.allclose(mixed.score, full.score, atol=1e-4)
    # Not vacuous: autocast does move the recognizer's embeddings when nothing stops it.
    assert (recognizer_bf16 - embedder.recognizer(chips)).abs().max() > 1e-4
    mixed.mean().backward()
    assert frames.grad is not None and frames.grad.abs().sum() > 0 and frames.grad.dtype == torch.float32


# --- 6. The SFT ablation adds the paper's face identity loss -------------------------------

def test_sft_adds_the_face_identity_loss(dataset, tmp_path):
    from ipro.train.config import load_config
    from ipro.train.sft import SFTTrainer
    from ipro.train.trainer import step_generator

    def trainer(weight):
        return SFTTrainer(load_config("configs/tiny-cpu-sft.yaml", {
            "data.dataset": str(dataset), "data.num_frames": 9, "sampler.num_steps": 4,
            "sft.face_weight": weight, "run.output_dir": str(tmp_path / str(weight)), "run.seed": 2,
        }))

    assert load_config(None, {"method": "sft", "data.dataset": "x"}).sft.face_weight == 0.1  # on by default
    with_face, plain = trainer(0.1), trainer(0.0)
    assert plain.reward is None
    batch = with_face.batch_at(0, 0)
    loss, logs = with_face.compute_loss(batch, step_generator(2, 0, 0, 0))
    plain_loss, plain_logs = plain.compute_loss(batch, step_generator(2, 0, 0, 0))
    assert torch.allclose(logs["diffusion_loss"], plain_logs["diffusion_loss"])  # the same draw, the same diffusion term
    assert torch.allclose(loss.detach(), logs["diffusion_loss"] - 0.1 * logs["reward"], atol=1e-6)
    assert logs["face_coverage"] > 0 and abs(float(logs["reward"])) > 0
    # The face term's own gradient reaches the adapter (same seed, same adapter in both).
    params, plain_params = with_face.model.trainable_parameters(), plain.model.trainable_parameters()
    assert all(torch.equal(p, q) for p, q in zip(params, plain_params))
    grads = torch.autograd.grad(loss, params)
    plain_grads = torch.autograd.grad(plain_loss, plain_params)
    assert any((g - h).abs().sum() > 0 for g, h in zip(grads, plain_grads))
