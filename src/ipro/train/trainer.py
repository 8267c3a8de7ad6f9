"""The training loop shared by every method. It knows nothing of the model family (it
talks to a `VideoModel`) and nothing of the method (a subclass implements
`compute_loss`). Parallelism comes from accelerate, applied from outside.

    trainer = IPROTrainer(config)      # or GRPOTrainer / SFTTrainer / PretrainTrainer
    trainer.train(resume=True)         # or call trainer.step() yourself

Exact resume: every random draw of a step uses a generator keyed by (seed, step, rank,
micro-batch) and the data order is a seeded permutation per epoch, so a checkpoint only
needs the trainable weights, the optimizer and the step.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import torch

from ipro.errors import IproError
from ipro.train.checkpoint import gather_state, list_checkpoints, load_checkpoint, restore_state, save_checkpoint
from ipro.train.config import TrainConfig


class NonFiniteLossError(IproError):
    pass


def step_generator(seed: int, step: int, rank: int, micro: int, device="cpu") -> torch.Generator:
    """The generator every random draw of one micro-batch uses (noise, K, SDE noise)."""
    key = (seed * 1_000_003 + step) * 1_009 + rank * 101 + micro
    return torch.Generator(device=device).manual_seed(key % (2**63 - 1))


class Trainer:
    """One optimizer step = `grad_accum` micro-batches, each through `compute_loss`.

    Subclasses implement `compute_loss(batch, generator) -> (loss, logs)` and may
    override `build_reward`. `model`, `reward` and `dataset` can be passed in (tests,
    notebooks); otherwise they are built from the config.
    """

    method = "base"

    def __init__(self, config: TrainConfig, model=None, reward=None, dataset=None, accelerator=None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.config = config
        c = config
        out = Path(c.run.output_dir)
        self.output_dir = out
        if accelerator is None:
            from ipro.train.monitor import trackers as make_trackers

            trackers = make_trackers(c.run.log_with, out)
            accelerator = Accelerator(
                mixed_precision=c.optim.mixed_precision,
                log_with=trackers or None,
                project_dir=str(out),
                # accelerate runs several CPU processes (gloo) only when told cpu=True.
                cpu=c.run.device == "cpu" or not torch.cuda.is_available(),
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
            )
        self.accelerator = accelerator
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        from accelerate.utils import set_seed

        # peft draws LoRA A from the global RNG: the same seed must give the same adapter.
        set_seed(c.run.seed)
        self.model = model if model is not None else self.build_model()
        self.model.to(accelerator.device)
        self.dataset = dataset if dataset is not None else self.build_dataset()
        if len(self.dataset) == 0:
            raise IproError(f"{c.data.dataset}: the dataset has no kept clips; check `summary.json` from `ipro prepare`")
        self.release_encoders()
        self.reward = reward if reward is not None else self.build_reward()

        params = self.model.trainable_parameters()
        if not params:
            raise IproError("the model has no trainable parameters; set model.lora_rank > 0 or full fine-tuning")
        opt_cls = torch.optim.AdamW if c.optim.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(params, lr=c.optim.lr, betas=c.optim.betas, weight_decay=c.optim.weight_decay)

        def wrap(module):
            # One prepare call for both: DeepSpeed builds its engine from the pair.
            wrapped, self.optimizer = accelerator.prepare(module, self.optimizer)
            return wrapped

        self.model.wrap_trainable(wrap)
        # FSDP2 replaced the parameters with sharded DTensors (only the trained expert is wrapped).
        self.named_params = _named(self.model.trainable_module, self.model.trainable_parameters())
        self.ema = {k: p.detach().clone() for k, p in self.named_params.items()} if c.optim.ema_decay else None
        self.global_step = 0
        self.nonfinite_streak = 0
        self.nonfinite_total = 0
        self.samples_seen = 0

    # --- Builders (override in subclasses or pass objects in) ---------------------------

    def build_model(self):
        # Rank 0 first: it may have to build a tiny preset into the shared output folder.
        with self.accelerator.main_process_first():
            return load_for_training(self.config.model, self.output_dir, self.accelerator.device)

    def build_dataset(self):
        from ipro.data.dataset import CuratedDataset

        d = self.config.data
        return CuratedDataset(d.dataset, load_clip=self.needs_clips, frames=d.num_frames if self.needs_clips else None, size=(d.height, d.width),
                              subjects=self.model.num_subject_images)

    def build_reward(self):
        return None

    needs_clips = False

    def condition_image(self, item: dict) -> torch.Tensor:
        """The first frame (3, H, W) a step conditions this item on."""
        return item["image"]

    def release_encoders(self) -> None:
        """Encode every caption, the default and the negative ("") prompt and every item's first
        frame now, then move the text/image encoders off the accelerator: a step only reads
        the cached results (on the CPU, moved to the device per batch)."""
        d = self.config.data
        items = (self.dataset[i] for i in range(len(self.dataset)))  # lazily: the model may not need images
        captions = [row["caption"] or d.default_prompt for row in getattr(self.dataset, "rows", None) or self.dataset]
        self.model.release_encoders([d.default_prompt, "", *captions], (self.condition_image(item) for item in items))

    # --- Data: a seeded permutation per epoch, strided across processes ---------------

    def batch_at(self, step: int, micro: int) -> dict:
        from ipro.data.dataset import collate

        c = self.config
        n = len(self.dataset)
        per_step = c.data.batch_size * c.optim.grad_accum * self.world
        start = step * per_step + (micro * self.world + self.rank) * c.data.batch_size
        items = []
        for pos in range(start, start + c.data.batch_size):
            epoch, i = divmod(pos, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(c.run.seed * 7919 + epoch))
            items.append(self.dataset[int(perm[i])])
        return collate(items)

    # --- One step ------------------------------------------------------------------------

    def compute_loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    # --- Reward-hacking monitor (ipro.train.monitor) -------------------------------------

    def keep_rollout_frames(self, frames: torch.Tensor) -> None:
        """Methods call this with the (B, F, 3, H, W) frames they decoded; kept (detached)
        only on steps that will be logged, for `monitor_hacking`."""
        c = self.config.run
        if c.hacking_monitor and (self.global_step + 1) % c.log_every == 0:
            self.__dict__.setdefault("_rollout_frames", []).append(frames.detach())

    def monitor_hacking(self) -> dict:
        """hacking/rigid_rate and hacking/face_coverage of the frames kept this step."""
        frames, self._rollout_frames = self.__dict__.get("_rollout_frames", []), []
        if not frames:
            return {}
        return self.hacking_monitor(frames, step=self.global_step) if self.accelerator.is_main_process else {}

    @functools.cached_property
    def hacking_monitor(self):
        """The run's `HackingMonitor` (its verdicts go into checkpoints); face models load on first use."""
        from ipro.train.monitor import HackingMonitor

        return HackingMonitor(self.config.run.rigid_warn_rise, getattr(self.reward, "embedder", None), self.accelerator.device)

    def step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns the logged values."""
        c = self.config
        acc = self.accelerator
        t0 = self.begin_step()
        logs: dict[str, float] = {}
        finite = True
        for micro in range(c.optim.grad_accum):
            batch = self.batch_at(self.global_step, micro)
            gen = step_generator(c.run.seed, self.global_step, self.rank, micro)
            last = micro == c.optim.grad_accum - 1
            with acc.autocast(), self.model.no_sync(not last):
                loss, micro_logs = self.compute_loss(batch, gen)
            finite = finite and bool(torch.isfinite(loss.detach()))
            if finite:
                acc.backward(loss / c.optim.grad_accum)
            for k, v in micro_logs.items():
                logs[k] = logs.get(k, 0.0) + float(v) / c.optim.grad_accum
        self.apply_update(finite, logs)
        return self.end_step(logs, t0)

    def begin_step(self) -> float:
        """Start of every method's step: the trainable module in train mode, peak memory
        counted from here. Returns the start time for `end_step`."""
        t0 = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.model.trainable_module.train()
        return t0

    def end_step(self, logs: dict, t0: float) -> dict:
        """End of every method's step: count the step and its samples, and log lr, step
        time and peak memory."""
        c = self.config
        self.global_step += 1
        self.samples_seen += c.data.batch_size * c.optim.grad_accum * self.world
        logs["lr"] = self.optimizer.param_groups[0]["lr"]
        logs["step_time_s"] = time.perf_counter() - t0
        if torch.cuda.is_available():
            logs["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            import resource

            logs["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        return logs

    # What a skipped update is called in the abort message, and what to try.
    nonfinite_what = "loss was NaN/inf in {n} steps in a row"
    nonfinite_advice = "lower optim.lr, enable optim.max_grad_norm, or check the data"

    def apply_update(self, finite: bool, logs: dict) -> None:
        """Clip, step and zero the accumulated gradients, or skip a non-finite update and
        abort after `run.max_nonfinite` in a row. Adds grad_norm / nonfinite_skipped to logs."""
        acc = self.accelerator
        if self.world > 1:  # every rank must agree to skip, or DDP ranks would diverge
            finite = bool(acc.reduce(torch.tensor(float(finite), device=acc.device), "min") > 0)
        if finite:
            grad_norm = acc.clip_grad_norm_(self.model.trainable_parameters(), self.config.optim.max_grad_norm or float("inf"))
            logs["grad_norm"] = float(grad_norm)
            self._set_lr()
            self.optimizer.step()
            self._update_ema()
            self.nonfinite_streak = 0
        else:
            self.nonfinite_streak += 1
            self.nonfinite_total += 1
        self.optimizer.zero_grad(set_to_none=True)
        logs["nonfinite_skipped"] = float(self.nonfinite_total)
        if self.nonfinite_streak >= self.config.run.max_nonfinite:
            what = self.nonfinite_what.format(n=self.nonfinite_streak)
            raise NonFiniteLossError(f"{what} (step {self.global_step}); {self.nonfinite_advice}")

    def _set_lr(self) -> None:
        c = self.config.optim
        scale = min(1.0, (self.global_step + 1) / c.warmup_steps) if c.warmup_steps else 1.0
        if c.lr_cosine_to is not None and self.global_step >= c.warmup_steps:  # cosine from lr to lr * lr_cosine_to
            progress = (self.global_step - c.warmup_steps) / max(c.steps - c.warmup_steps, 1)
            scale = c.lr_cosine_to + (1 - c.lr_cosine_to) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr * scale

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        d = self.config.optim.ema_decay
        for k, p in self.named_params.items():
            self.ema[k].lerp_(p.detach(), 1 - d)

    # --- Checkpoints ---------------------------------------------------------------------

    def save(self) -> Path | None:
        params, optimizer_state, ema = self._gathered_state()  # every rank: FSDP2 gathers shards here
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        state = {
            "method": self.method,
            "samples_seen": self.samples_seen,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_streak": self.nonfinite_streak,
            "hacking_monitor": self.hacking_monitor.state_dict(),
            "config": self.config.model_dump(mode="json"),
        }
        write_lora = None
        if getattr(self.config.model, "lora_rank", 0) > 0:  # pretraining has no LoRA
            write_lora = functools.partial(self.model.save_lora, state_dict=params) if self.accelerator.is_fsdp2 else self.model.save_lora
        return save_checkpoint(
            self.output_dir, self.global_step, params, optimizer_state, state, ema,
            write_lora=write_lora, keep_last=self.config.run.keep_last,
        )

    def _gathered_state(self) -> tuple[dict, dict, dict | None]:
        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper holds the real one
        return gather_state(self.named_params, opt, self.ema, self.model.trainable_module, self.accelerator.is_fsdp2)

    def resume(self, path: str | Path | None = None) -> bool:
        """Load the latest checkpoint (or `path`); returns False if there is none."""
        if path is None:
            found = list_checkpoints(self.output_dir)
            if not found:
                return False
            path = found[-1]
        path = Path(path)
        if not (path / "state.json").is_file():
            raise IproError(f"{path}: not an ipro checkpoint (no state.json); pass a checkpoint-<step> folder")
        ckpt = load_checkpoint(path)
        missing = set(self.named_params) - set(ckpt["params"])
        if missing:
            raise IproError(f"{path}: checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}); was it made with another model.lora_* setting?")
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        ema = restore_state(ckpt, self.named_params, opt, self.model.trainable_module, self.accelerator.is_fsdp2)
        if self.ema is not None and ema is not None:
            self.ema = ema
        s = ckpt["state"]
        self.global_step = int(s["step"])
        self.samples_seen = int(s.get("samples_seen", 0))
        self.nonfinite_total = int(s.get("nonfinite_total", 0))
        self.nonfinite_streak = int(s.get("nonfinite_streak", 0))
        self.hacking_monitor.load_state_dict(s.get("hacking_monitor", {}))
        return True

    # --- The loop ------------------------------------------------------------------------

    def train(self, resume: bool | str = False) -> dict:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        c = self.config
        acc = self.accelerator
        if resume:
            self.resume(None if resume is True else resume)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(_yaml(c))
        if acc.log_with:
            acc.init_trackers("ipro", config=_flat(c.model_dump(mode="json")))
        logs: dict = {}
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, disable=not acc.is_main_process, transient=False) as bar:
            task = bar.add_task(f"{self.method} train", total=c.optim.steps, completed=self.global_step, info="")
            while self.global_step < c.optim.steps:
                logs = self.step()
                if self.global_step % c.run.log_every == 0:
                    logs.update(self.monitor_hacking())
                    acc.log(logs, step=self.global_step)
                    self._append_log(logs)
                bar.update(task, completed=self.global_step, info=_brief(logs))
                if self.global_step % c.run.checkpoint_every == 0 or self.global_step == c.optim.steps:
                    self.save()
                if c.run.sample_every and self.global_step % c.run.sample_every == 0:
                    self.write_samples()
        acc.end_training()
        return logs

    def _append_log(self, logs: dict) -> None:
        """logs.jsonl beside the TensorBoard files: curves without a TensorBoard reader. A
        resumed run logs again the steps after its checkpoint; readers keep the last line per step."""
        if self.accelerator.is_main_process:
            import json

            with open(self.output_dir / "logs.jsonl", "a") as f:
                f.write(json.dumps({"step": self.global_step, **{k: float(v) for k, v in logs.items()}}) + "\n")

    def condition(self, batch: dict, images: torch.Tensor | None = None):
        """The model's `Condition` for a batch: its first frames (or `images`), captions
        (the default prompt where empty) and, for subject-to-video models, its subject images."""
        d = self.config.data
        dev = self.accelerator.device
        images = (batch["image"] if images is None else images).to(dev)
        prompts = [cap or d.default_prompt for cap in batch["caption"]]
        extra = {"subject_images": batch["subjects"].to(dev)} if self.model.num_subject_images else {}
        return self.model.prepare_condition(images, prompts, d.num_frames, d.height, d.width, **extra)

    @torch.no_grad()
    def write_samples(self) -> list[Path]:
        """Videos of the current model for the first item of the data order, one per
        process' share, written to output_dir/samples/step-<N>-<id>.mp4 with its .json
        (ODE; video i of the batch uses seed run.seed + i)."""
        from ipro.generate import generate

        if not self.accelerator.is_main_process:
            return []
        c, d = self.config, self.config.data
        batch = self.batch_at(0, 0)
        return generate(
            self.model, batch["image"], self.output_dir / "samples", prompts=[cap or d.default_prompt for cap in batch["caption"]],
            seeds=c.run.seed, names=[f"step-{self.global_step:06d}-{item_id}" for item_id in batch["id"]],
            num_frames=d.num_frames, height=d.height, width=d.width, steps=c.sampler.num_steps,
            guidance_scale=c.sampler.guidance_scale, shift=c.sampler.shift, batch_size=len(batch["id"]),
            subjects=batch["subjects"] if self.model.num_subject_images else None,
            metadata={"step": self.global_step},
        )


def load_for_training(m, cache_dir: Path, device):
    """A `VideoModel` ready to fine-tune, from the `model` section of the config."""
    from ipro.models import FAMILIES, detect_family, load_model, resolve_model_path

    dtype = getattr(torch, m.dtype)  # the config allows float32, bfloat16, float16
    path = resolve_model_path(m.path, cache_dir)
    family = detect_family(path) if m.family == "auto" else m.family
    subjects = {}
    if m.subject_images:
        if not FAMILIES[family].takes_subject_images:
            raise IproError(f"model.subject_images={m.subject_images}: the {family} family takes no subject images; set it to 0")
        subjects = {"num_subject_images": m.subject_images}
    return load_model(
        path,
        family=family,
        dtype=dtype,
        device=device,
        finetune="lora" if m.lora_rank > 0 else "full",
        lora=m.init_lora,
        lora_rank=max(m.lora_rank, 1),
        lora_alpha=m.lora_alpha,
        lora_targets=m.lora_targets,
        lightning=m.lightning_lora,
        gradient_checkpointing=m.gradient_checkpointing,
        decode_tile=m.decode_tile,
        offload_frozen_expert=m.offload_frozen_expert,
        **subjects,
    )


def _named(module: torch.nn.Module, params: list[torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    ids = {id(p) for p in params}
    named = {n: p for n, p in module.named_parameters() if id(p) in ids}
    if len(named) != len(params):
        raise RuntimeError("trainable parameters must belong to model.trainable_module")
    return named


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _yaml(c: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(c.model_dump(mode="json"), sort_keys=False)


def _brief(logs: dict) -> str:
    keys = ("loss", "reward", "kl")
    return " ".join(f"{k} {logs[k]:.4g}" for k in keys if k in logs and math.isfinite(logs[k]))
