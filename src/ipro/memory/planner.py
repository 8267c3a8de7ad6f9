"""Predict the peak accelerator memory of one training step by tracing it on `meta` tensors.

The model is built from its config JSONs on `meta` (`ipro.memory.meta`: real classes, LoRA,
gradient checkpointing, no weights), then one optimizer step is run through the real code
(`VideoModel.prepare_condition`, `sample` / `sde_sample`, `VideoModel.decode`,
`multistep_kl`, `GRPOTrainer.policy_loss`, autograd backward, the real optimizer) inside
`LiveMemory`, which adds up the bytes of every tensor while it is alive. Nothing is computed.

What is resident, per phase:
- weights of every component on the accelerator (bf16 in the presets; the VAE in float32 as
  `load_for_training` loads it); the text/image encoders only while the prompts and first
  frames are encoded (the trainer then moves them to the CPU); with
  `model.offload_frozen_expert` the frozen A14B expert's largest block, not the expert;
- trainable parameters (float32 LoRA), their gradients and the optimizer state (Adam: two
  float32 moments), an EMA copy if configured;
- activations as traced. SDPA counts as the fused GPU kernel does (output + log-sum-exp,
  see `ipro.memory.tracker`).

Estimated rather than traced: the face reward runs its real recognizer on `meta` for one face
per scored frame (detection runs without gradient on a downscaled copy, counted as that copy);
a learned (VLM) reward model's weights are not counted. Repeated no-gradient transformer calls
of the same shape are traced once and replayed as their measured transient, which keeps a
25-step GRPO rollout to seconds. Autocast (optim.mixed_precision bf16) is emulated by tracing
the frozen float32 VAE in bf16 (its float32 weights still count), as the GPU's autocast runs
its convolutions. The caching allocator's rounding and fragmentation come on top
(typically a few percent); `ipro plan` reports allocated bytes, like torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ipro.errors import IproError
from ipro.memory.tracker import LiveMemory, tensor_bytes

GB = 1e9
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "ipro"  # plans/ and tiny model builds


@dataclass
class Plan:
    """Predicted peak bytes per phase of one optimizer step (per GPU)."""

    method: str
    arch: str  # shipped config name, or the model folder
    family: str
    phases: dict[str, int]  # phase -> peak live bytes during it
    resident: dict[str, int]  # what is held all step: weights, trainable, grads, optimizer state
    shardable: int  # bytes FSDP2 would split across GPUs (the trained module, its grads and optimizer state)
    largest_block: int  # bytes of the largest transformer block (what FSDP2 gathers at a time)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    def peak_on(self, gpus: int) -> int:
        """Predicted peak per GPU with FSDP2 over `gpus` (parameters, gradients and optimizer state sharded)."""
        if gpus <= 1:
            return self.peak
        return int(self.peak - self.shardable * (1 - 1 / gpus) + self.largest_block)

    def gpus_needed(self, budget: int, most: int = 64) -> int | None:
        for n in range(1, most + 1):
            if self.peak_on(n) <= budget:
                return n
        return None

    def table(self) -> str:
        rows = [f"{'phase':<44} {'peak GB':>9}"]
        rows += [f"{name:<44} {b / GB:>9.1f}" for name, b in self.phases.items()]
        rows.append(f"{'overall peak (one GPU)':<44} {self.peak / GB:>9.1f}")
        rows.append("resident all step: " + ", ".join(f"{k} {v / GB:.1f}" for k, v in self.resident.items()))
        return "\n".join(rows)

    def to_json(self) -> dict:
        return asdict(self)


def _model_folder(cfg, arch: str | None, cache_dir: Path) -> tuple[Path, str]:
    from ipro.memory.meta import arch_folder, guess_arch, shipped_archs
    from ipro.models.loading import resolve_model_path

    if arch:
        return arch_folder(arch), arch
    path = resolve_model_path(cfg.model.path, cache_dir)
    if (Path(path) / "model_index.json").is_file():
        return Path(path), str(cfg.model.path)
    guessed = guess_arch(str(cfg.model.path))
    if guessed is None:
        raise IproError(f"model.path {cfg.model.path}: not found here and its name matches no shipped config; "
                        f"pass --arch with one of {', '.join(shipped_archs())}")
    return arch_folder(guessed), guessed


def _block_bytes(module: torch.nn.Module) -> int:
    blocks = getattr(module, "blocks", None)
    return max((tensor_bytes(b.parameters()) for b in blocks), default=0) if blocks is not None else 0


class Planner:
    """Builds the configured model once on `meta`; `plan(cfg)` traces one step of a config
    (which may differ from the build config in data, sampler, reward, decode_tile and
    gradient checkpointing)."""

    def __init__(self, cfg, arch: str | None = None, cache_dir: str | Path = CACHE_DIR, device: str = "meta") -> None:
        from ipro.memory.meta import meta_loading
        from ipro.train.trainer import load_for_training

        folder, self.arch = _model_folder(cfg, arch, Path(cache_dir))
        m = cfg.model.model_copy(update=dict(path=str(folder), family=cfg.model.family, lightning_lora=None, init_lora=None,
                                             offload_frozen_expert=False, decode_tile=None, gradient_checkpointing=False))
        torch.manual_seed(0)
        with meta_loading(device):
            self.model = load_for_training(m, Path(cache_dir), device)
        self.folder = folder
        self.device = torch.device(device)
        if cfg.model.lightning_lora and hasattr(self.model, "merge_lightning"):
            # Not merged (no file needed: merging changes no shapes), but its schedule is used,
            # which decides which A14B expert each step runs.
            from ipro.models.base import scheduler_with_shift

            self.model.scheduler = scheduler_with_shift(self.model.scheduler, 5.0)
        # Autocast (optim.mixed_precision) runs the frozen float32 VAE's convolutions in bf16 on the
        # GPU; meta tensors know no autocast, so the VAE is traced in that dtype and the bytes its
        # float32 weights hold beyond that are added back as resident.
        self.autocast_extra = 0
        vae = getattr(self.model, "vae", None)
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.optim.mixed_precision)
        if device == "meta" and low is not None and vae is not None and vae.dtype == torch.float32:
            before = tensor_bytes(vae.parameters())
            vae.to(low)
            self.autocast_extra = before - tensor_bytes(vae.parameters())

    # --- helpers -------------------------------------------------------------------------

    def _configure(self, cfg) -> None:
        model = self.model
        trained = model.trainable_module
        if cfg.model.gradient_checkpointing:
            trained.enable_gradient_checkpointing()
        elif getattr(trained, "gradient_checkpointing", False):
            trained.disable_gradient_checkpointing()
        if hasattr(model, "decode_tile"):
            model.decode_tile = cfg.model.decode_tile

    def _encoders(self) -> list[torch.nn.Module]:
        pipe = getattr(self.model, "pipe", None)
        return [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "image_encoder", None)) if m is not None]

    def _offloaded(self, cfg) -> torch.nn.Module | None:
        frozen = getattr(self.model, "frozen_expert", None)
        return frozen if cfg.model.offload_frozen_expert and frozen is not None else None

    @staticmethod
    def _tensors(modules) -> list[torch.Tensor]:
        return [t for m in modules for t in (*m.parameters(), *m.buffers())]

    def _encode_phase(self, mem: LiveMemory, cfg) -> None:
        """The trainer encodes every prompt and first frame once with the encoders on the
        accelerator, then moves them to the CPU (`release_encoders`): their weights count here only."""
        encoders = self._encoders()
        if not encoders:
            return
        weights = tensor_bytes(self._tensors(encoders))  # held since the start; resident in this phase only
        mem.add(weights)
        with mem.phase("encode prompts and first frames (once)"), torch.no_grad():
            for e in encoders:
                c = e.config
                if hasattr(c, "d_model"):  # UMT5: 512 tokens, one prompt at a time
                    e(input_ids=torch.zeros(1, 512, dtype=torch.long, device=self.device))  # no mask: values would be read
                else:  # CLIP vision: one image
                    e(pixel_values=torch.zeros(1, 3, c.image_size, c.image_size, dtype=e.dtype, device=self.device), output_hidden_states=True)
        mem.remove(weights)

    def _condition(self, cfg, batch: int):
        model, d = self.model, cfg.data
        pipe = getattr(model, "pipe", None)
        if pipe is not None:  # the encoders' cached outputs (meta has no values to look up)
            text_dim = model.transformer.config.text_dim
            for prompt in (d.default_prompt, ""):
                model._text_cache[prompt] = torch.zeros(64, text_dim, dtype=model.dtype)
            if getattr(model, "uses_clip", False):
                c = pipe.image_encoder.config
                tokens = (c.image_size // c.patch_size) ** 2 + 1
                model.encode_clip = lambda images: torch.zeros(images.shape[0], tokens, c.hidden_size, dtype=model.dtype, device=images.device)
        images = torch.zeros(batch, 3, d.height, d.width, device=self.device)
        extra = {}
        if getattr(model, "num_subject_images", 0):
            extra["subject_images"] = torch.zeros(batch, model.num_subject_images, 3, d.height, d.width, device=self.device)
        negative = "" if cfg.sampler.guidance_scale > 1 else None
        return model.prepare_condition(images, [d.default_prompt] * batch, d.num_frames, d.height, d.width, negative_prompt=negative, **extra)

    def _replaying_velocity(self, mem: LiveMemory):
        """model.velocity that traces each distinct no-gradient call once and replays its transient
        after that (same shapes, same memory), and routes two-expert models on the CPU value of t."""
        model = self.model
        real = type(model).velocity
        seen: dict[tuple, int] = {}
        boundary = getattr(model, "boundary_ratio", None)

        def velocity(x_t, t, cond, guidance_scale: float = 1.0):
            high = boundary is None or bool(torch.as_tensor(t).flatten()[0] >= boundary * model.num_train_timesteps)
            key = (high, tuple(x_t.shape), guidance_scale > 1, torch.is_grad_enabled(), getattr(model.trainable_module, "_disable_adapters", None))
            if not torch.is_grad_enabled() and key in seen and x_t.device.type == "meta":
                mem.spike(seen[key])
                return torch.zeros(x_t.shape, dtype=torch.float32, device=x_t.device)
            with mem.window() as peak:
                if boundary is None:
                    v = real(model, x_t, t, cond, guidance_scale)
                else:
                    b = x_t.shape[0]
                    tt = torch.as_tensor(t, device=x_t.device)
                    v = model._guided(model._expert(high), x_t, tt.expand(b) if tt.ndim == 0 else tt, cond, guidance_scale)
            if not torch.is_grad_enabled():
                seen[key] = peak[0]
            return v

        return velocity

    # --- one step ------------------------------------------------------------------------

    def plan(self, cfg, mem: LiveMemory | None = None) -> Plan:
        """Trace one optimizer step of `cfg`. On a real device (validation) the step really runs;
        pass `mem` to choose how the tracer counts attention there."""
        self._configure(cfg)
        model = self.model
        params = model.trainable_parameters()
        optimizer = (torch.optim.AdamW if cfg.optim.optimizer == "adamw" else torch.optim.Adam)(params, lr=1e-4, foreach=False)
        for p in params:  # create the optimizer state as after the first step
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0]
        trained = model.trainable_module
        offloaded = self._offloaded(cfg)
        notes: list[str] = []
        model.velocity = None  # set below, inside the tracer
        mem = mem or LiveMemory()
        with mem:
            # Every weight is held, so that the views ops take of them (a linear's transposed weight)
            # cost nothing; what is not on the GPU all step is then taken off the total by hand.
            mem.hold(self._tensors(_components(model)))
            away = self._encoders() + ([offloaded] if offloaded is not None else [])
            mem.remove(tensor_bytes(self._tensors(away)))
            mem.add(self.autocast_extra)
            weights = mem.live
            reward_weights = mem.hold(_recognizer(cfg, self.device).parameters())
            if offloaded is not None:
                mem.add(_block_bytes(offloaded))
                notes.append("frozen expert offloaded: one block of it on the GPU at a time")
            trainable = tensor_bytes(params)
            opt_bytes = mem.hold(state)
            ema = [p.detach().clone() for p in params] if cfg.optim.ema_decay else []
            if cfg.optim.grad_accum > 1:  # gradients live across the micro-batches of a step
                for p in params:
                    p.grad = torch.zeros_like(p)
            model.velocity = self._replaying_velocity(mem)
            self._encode_phase(mem, cfg)
            if cfg.method == "ipro":
                self._ipro_step(mem, cfg, params, optimizer)
            elif cfg.method == "grpo":
                self._grpo_step(mem, cfg, params, optimizer)
            else:
                raise IproError(f"method {cfg.method}: `ipro plan` traces ipro and grpo steps; use one of those")
            del ema
        del model.velocity
        optimizer.zero_grad(set_to_none=True)
        resident = {"weights": weights - trainable, "face recognizer": reward_weights, "trainable": trainable, "gradients": trainable, "optimizer": opt_bytes}
        if cfg.optim.ema_decay:
            resident["ema"] = trainable
        frozen_trained = tensor_bytes(t for t in trained.parameters() if not t.requires_grad)
        return Plan(cfg.method, self.arch, model.family, dict(mem.phases), resident,
                    shardable=frozen_trained + 2 * trainable + opt_bytes, largest_block=_block_bytes(trained), notes=notes)

    def _ipro_step(self, mem: LiveMemory, cfg, params, optimizer) -> None:
        from ipro.models.offload import activations_on_cpu
        from ipro.rewards.base import FrameSelection
        from ipro.sampling import sample
        from ipro.train.kl import multistep_kl

        model, d, s = self.model, cfg.data, cfg.sampler
        with mem.phase("condition (VAE encode of the first frame)"):
            cond = self._condition(cfg, d.batch_size)
        noise = torch.zeros(model.latent_shape(d.batch_size, d.num_frames, d.height, d.width), device=self.device)
        with mem.phase(f"rollout: {s.num_steps - s.grad_steps} steps without grad, {s.grad_steps} with"):
            with activations_on_cpu(model, cfg.model.offload_activations):
                rollout = sample(model, cond, num_steps=s.num_steps, grad_steps=s.grad_steps, guidance_scale=s.guidance_scale,
                                 shift=s.shift, noise=noise)
        wanted = FrameSelection(stride=cfg.reward.frame_stride, count=cfg.reward.max_frames).indices(d.num_frames)
        with mem.phase(f"decode {len(wanted)} frames with grad"):
            frames = model.decode(rollout.latents, frames=[int(i) for i in wanted])
        with mem.phase("face reward with grad"):
            reward = _face_reward(frames, cfg)
        del frames
        with mem.phase("base-model KL (adapter off)"):
            kl = multistep_kl(model, rollout, cond, cfg.kl.weighting) if cfg.kl.weight > 0 else torch.zeros((), device=self.device)
        loss = -cfg.reward.weight * reward + cfg.kl.weight * kl
        del rollout, reward, kl
        with mem.phase("backward"):
            loss.backward()
        del loss
        gc.collect()
        with mem.phase("optimizer step"):
            _optimizer_step(mem, params, optimizer)

    def _grpo_step(self, mem: LiveMemory, cfg, params, optimizer) -> None:
        from types import SimpleNamespace

        from ipro.sampling.sde import sde_sample
        from ipro.train.grpo import GroupRollout, GRPOTrainer

        model, d, s, g = self.model, cfg.data, cfg.sampler, cfg.grpo
        n = d.batch_size * g.group_size
        groups = []
        for micro in range(cfg.optim.grad_accum):  # every input's rollouts are held until the update
            with mem.phase("condition (VAE encode of the first frame)"):
                cond = self._condition(cfg, d.batch_size).repeat_interleave(g.group_size)
            noise = torch.zeros(model.latent_shape(n, d.num_frames, d.height, d.width), device=self.device)
            with mem.phase(f"rollout: {g.group_size} videos x {s.num_steps} SDE steps, no grad"), torch.no_grad():
                sde = sde_sample(model, cond, s.num_steps, eta=g.eta, guidance_scale=s.guidance_scale, shift=s.shift, noise=noise)
            with mem.phase(f"decode + reward of {n} videos, no grad"), torch.no_grad():
                frames = model.decode(sde.latents)
                _face_reward(frames.float(), cfg)
                del frames
            scores = torch.zeros(n, device=self.device)
            groups.append(GroupRollout(cond, sde, scores, torch.ones(n, dtype=torch.bool), scores.clone()))
        trainer = SimpleNamespace(config=cfg, model=model)
        steps = groups[0].sde.sde_steps
        with mem.phase("policy update: one SDE step forward + backward"):
            for i in dict.fromkeys([steps[0], steps[-1]]):  # each step alike; A14B: both experts' steps
                loss, _ = GRPOTrainer.policy_loss(trainer, groups[0], i)
                if loss.requires_grad:
                    loss.backward()
                del loss
        del groups
        gc.collect()
        with mem.phase("optimizer step"):
            _optimizer_step(mem, params, optimizer)


def _optimizer_step(mem: LiveMemory, params, optimizer) -> None:
    """Clip and step. On the GPU both run the foreach kernels, which meta tensors lack: the
    single-tensor path is traced and foreach's temporaries (about one float32 copy of the
    trainable parameters: the denominators of Adam's update) are added as a transient."""
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=False)
    optimizer.step()
    mem.spike(tensor_bytes(params))


def _components(model) -> list[torch.nn.Module]:
    pipe = getattr(model, "pipe", None)
    if pipe is not None:
        return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    return [m for m in vars(model).values() if isinstance(m, torch.nn.Module)]


_RECOGNIZERS: dict[str, torch.nn.Module] = {}


def _recognizer(cfg, device) -> torch.nn.Module:
    from ipro.faces.embedder import load_recognizer

    spec, device = cfg.reward.recognizer, torch.device(device)
    key = f"{spec}@{device}"
    if key not in _RECOGNIZERS:
        try:
            rec = load_recognizer(spec)
        except IproError:  # a user's ArcFace file that is not here: size it as dlib's
            rec = load_recognizer("dlib")
        _RECOGNIZERS[key] = rec.to(device).requires_grad_(False)
    return _RECOGNIZERS[key]


def _face_reward(frames: torch.Tensor, cfg) -> torch.Tensor:
    """The differentiable part of the face reward on meta: a downscaled no-grad copy for the
    detector, one aligned chip per scored frame (grid_sample) through the real recognizer."""
    import torch.nn.functional as F

    rec = _recognizer(cfg, frames.device)
    flat = frames.flatten(0, 1)
    h, w = flat.shape[-2:]
    scale = min(1.0, 640 / max(h, w))
    with torch.no_grad():
        F.interpolate(flat.detach().float(), scale_factor=scale, mode="area") if scale < 1 else flat.detach().float().clone()
    size = rec.input_size if isinstance(rec.input_size, int) else rec.input_size[0]
    grid = torch.zeros(flat.shape[0], size, size, 2, device=flat.device)
    chips = F.grid_sample(flat.float(), grid, align_corners=False)
    return rec(chips.to(next(rec.parameters()).dtype)).float().sum() * 0.0 + flat[:, :1, :1, :1].sum() * 0.0


# --- cache and entry point ------------------------------------------------------------


def _source_hash() -> str:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha1()
    for sub in ("memory", "models", "sampling", "train", "faces", "assets/wan-configs"):
        for f in sorted((root / sub).rglob("*.[pj][ys]*")):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


_PLANNERS: dict[str, Planner] = {}  # one meta build per model setup, shared by the configs planned with it


def plan_config(cfg, arch: str | None = None, cache_dir: str | Path = CACHE_DIR, use_cache: bool = True) -> Plan:
    """The `Plan` of a `TrainConfig` (cached on disk per config, model configs and ipro source)."""
    cache_dir = Path(cache_dir)
    key_src = json.dumps([cfg.model_dump(mode="json"), arch, _source_hash()], sort_keys=True)
    key = hashlib.sha1(key_src.encode()).hexdigest()[:20]
    file = cache_dir / "plans" / f"{key}.json"
    if use_cache and file.is_file():
        return Plan(**json.loads(file.read_text()))
    m = cfg.model
    build = json.dumps([m.path, m.family, m.dtype, m.lora_rank, m.lora_alpha, m.lora_targets, m.subject_images, arch])
    if build not in _PLANNERS:
        _PLANNERS[build] = Planner(cfg, arch, cache_dir)
    plan = _PLANNERS[build].plan(cfg)
    if use_cache:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        tmp.write_text(json.dumps(plan.to_json()))
        tmp.replace(file)
    return plan
