"""Training configuration: one validated model with every field documented.

Loaded from YAML before any compute. An unknown key or a wrong type is a one-line
error naming the key (`ipro train --print-config --method M` shows every field with its
default and meaning). The config is one class per method, chosen by its `method` key:
every method has model, data, optim and run. The fine-tuning methods add sampler and
reward; IPRO adds kl (and K in sampler, the reward weight in reward), GRPO adds grpo (and
sampler.noise), SFT adds sft. Pretraining has its own model (a new model's architecture)
and data (footage that ships in packages) sections and adds pretrain.
A key of another method is refused, naming the method it belongs to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ipro.errors import IproError
from ipro.yaml_config import read_mapping, validate


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    path: str = Field("builtin", description="Local diffusers-format folder of a Wan I2V model, or 'builtin' for the embedded small model.")
    family: Literal["auto", "wan2.1-i2v", "wan2.2-ti2v", "wan2.2-i2v-a14b", "wan-vace", "phantom", "pixel-i2v"] = Field(
        "auto", description="Model family (a registry name); 'auto' reads model_index.json.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights and compute dtype (bfloat16 on GPU).")
    lora_rank: int = Field(32, ge=0, description="LoRA rank; 0 means full fine-tuning of the trainable transformer.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA alpha (scale = alpha / rank).")
    lora_targets: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"],
        description="Module names (peft target_modules) that get LoRA: attention q/k/v/o and the FFN.",
    )
    lightning_lora: str | list[str] | dict[str, str] | None = Field(
        None, description="Distilled few-step ('Lightning') LoRA merged before training; its schedule is used without CFG. "
        "One path, or for Wan 2.2 A14B one per expert: {high_noise: PATH, low_noise: PATH} (or a list, high-noise first).")
    init_lora: str | None = Field(None, description="Start from this trained LoRA (a folder or .safetensors) instead of a fresh one.")
    gradient_checkpointing: bool = Field(False, description="Recompute transformer activations in backward to save memory.")
    offload_activations: bool = Field(
        False, description="IPRO: what autograd saves during the K gradient steps (with gradient checkpointing, one input "
        "per block and step) waits in CPU memory until backward; weights stay put. For 14B models at 81 frames, where "
        "those inputs alone exceed one GPU (`ipro plan` shows it); costs a copy to and from the host per step.")
    decode_tile: int | None = Field(
        None, gt=0, description="Spatial tile side in pixels for the differentiable VAE decode (a multiple of the VAE's "
        "spatial factor, at least twice it; tiles overlap by a quarter and are blended); None decodes whole frames.")
    offload_frozen_expert: bool = Field(
        True, description="Two-expert models (Wan 2.2 A14B): keep the expert that is not trained on the CPU and run it "
        "one block at a time on the accelerator (diffusers group offloading), instead of holding ~28 GB there all step.")
    subject_images: int = Field(
        0, ge=0, description="Subject-to-video families (wan-vace, phantom): subject images per video, cropped around each "
        "person's face in the first frame (whole frame where fewer people show); 0 conditions on the first frame only. "
        "phantom (no first frame) takes 1-4, one per person; 0 means 1.")

    @field_validator("lightning_lora")
    @classmethod
    def _lightning(cls, paths):
        if isinstance(paths, dict):
            if set(paths) != {"high_noise", "low_noise"}:
                raise ValueError(f"model.lightning_lora takes the keys high_noise and low_noise, got {sorted(paths)}; fix the keys")
            return [paths["high_noise"], paths["low_noise"]]  # the experts' order
        if isinstance(paths, list) and not 1 <= len(paths) <= 2:
            raise ValueError(f"model.lightning_lora takes one path, or two (high-noise first), got {len(paths)}; list one per expert")
        return paths

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "reference_images" in data:
            raise ValueError("model.reference_images: renamed to model.subject_images (images of the people to keep); rename the key")
        return data


class ClipFrames(Section):
    """A data section with `num_frames`, which every Wan-style model needs as 4k+1."""

    @model_validator(mode="after")
    def _frames(self):
        if (self.num_frames - 1) % 4:
            raise ValueError(f"data.num_frames must be 4k+1 (5, 9, 13, 17, ... 81), got {self.num_frames}")
        return self


class DataConfig(ClipFrames):
    dataset: str = Field(..., description="Folder written by `ipro prepare` (holds manifest.parquet).")
    height: int = Field(64, ge=16, description="Training height in pixels (multiple of the VAE stride x patch size).")
    width: int = Field(64, ge=16, description="Training width in pixels.")
    num_frames: int = Field(9, ge=1, description="Frames per generated clip; must be 4k+1.")
    batch_size: int = Field(1, ge=1, description="Clips per forward pass (per process).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    default_prompt: str = Field("a person talking", description="Caption used when a clip has none.")


class SamplerConfig(Section):
    """The sampler settings every method reads (SFT: its noise levels and sample videos)."""

    num_steps: int = Field(8, ge=1, description="Denoising steps T of the on-policy rollout (SFT: of the schedule its noise levels are drawn from).")
    guidance_scale: float = Field(1.0, ge=1.0, description="Classifier-free guidance; 1.0 disables it (the paper's Lightning setting).")
    shift: float | None = Field(None, gt=0, description="Flow-matching timestep shift; None keeps the scheduler's.")


class IPROSamplerConfig(SamplerConfig):
    grad_steps: int = Field(4, ge=1, description="K: the last K steps run with gradient (DRaFT-K); the first T-K under no_grad.")
    grad_steps_min: int | None = Field(None, ge=1, description="If set, K is drawn uniformly from [grad_steps_min, grad_steps] each step (AlignProp).")

    @model_validator(mode="after")
    def _k(self):
        if self.grad_steps > self.num_steps:
            raise ValueError(f"sampler.grad_steps ({self.grad_steps}) cannot exceed sampler.num_steps ({self.num_steps})")
        return self


class GRPOSamplerConfig(SamplerConfig):
    noise: Literal["flow_grpo", "identity_grpo"] = Field(
        "flow_grpo", description="GRPO's SDE noise level per step: 'flow_grpo' eta * sqrt(sigma / (1 - sigma)) (Flow-GRPO; "
        "grpo.eta), 'identity_grpo' sigma_min + (sigma_max - sigma_min) * sigma with the schedule's second and last sigmas "
        "(alibaba/identity-grpo's public sampler; no eta).")


class RewardConfig(Section):
    kind: Literal["face", "feature"] = Field("face", description="'face': the identity reward; 'feature': a generic image-feature reward (the paper's CLIP ablation).")
    mode: Literal["pool", "input_face", "aligned"] = Field("pool", description="Face reward mode: 'pool' (FSM), 'input_face' (the input image's faces), 'aligned' (gen frame i vs GT frame i).")
    recognizer: str = Field("dlib", description="'dlib' or 'arcface:/path/backbone.pth'.")
    norm_mean: float | None = Field(None, description="mu in (R - mu) / sigma; None uses the recognizer's measured default.")
    norm_std: float | None = Field(None, gt=0, description="sigma in (R - mu) / sigma; None uses the recognizer's measured default.")
    frame_stride: int = Field(1, ge=1, description="Score every N-th decoded frame.")
    max_frames: int | None = Field(None, ge=1, description="Score at most this many frames (evenly spaced).")
    exclude_first_frame: bool = Field(False, description="Pool mode: leave ground-truth frame 0 (the input image) out of the pool.")
    no_face: Literal["zero", "skip"] = Field("skip", description="A sample without any face: reward 0, or leave it out of the mean.")
    unmatched: Literal["ignore", "penalize"] = Field(
        "ignore", description="Several people: 'penalize' counts a face matched to nobody, and a person of the input image "
        "not found in a frame (two people blended into one, or one gone), as a value of 0; 'ignore' leaves both out.")
    feature_encoder: str | None = Field(None, description="kind=feature: local transformers checkpoint of an image encoder (CLIP/DINO).")

    @field_validator("mode", mode="before")
    @classmethod
    def _renamed_mode(cls, mode):
        if mode == "reference":
            raise ValueError("reward.mode: 'reference' is now 'input_face' (the input image's faces); rename the value")
        return mode


class IPRORewardConfig(RewardConfig):
    weight: float = Field(0.1, description="w in loss = -w * normalized reward + beta * KL.")


class KLConfig(Section):
    weight: float = Field(1.0, ge=0, description="beta; 0 turns the KL regularizer off (an ablation).")
    weighting: Literal["sigma", "uniform", "x0"] = Field(
        "sigma",
        description="'sigma': ||v - v_base||^2 / (2 sigma_t^2) as in the public code; 'uniform': plain mean; "
        "'x0': sigma_t^2 ||v - v_base||^2 = ||x0 - x0_base||^2, the KL measured on the predicted clip (independent of "
        "how the model parametrizes its output; use it for x0-predicting models, whose sigma-weighted KL grows like 1/sigma^4).",
    )


class OptimConfig(Section):
    optimizer: Literal["adam", "adamw"] = Field("adam", description="Optimizer.")
    lr: float = Field(2e-5, gt=0, description="Learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (adamw).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; None disables clipping.")
    steps: int = Field(100, ge=1, description="Optimizer steps.")
    grad_accum: int = Field(1, ge=1, description="Batches accumulated per optimizer step (effective batch = batch_size x grad_accum x processes).")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up.")
    lr_cosine_to: float | None = Field(None, ge=0, le=1, description="After warm-up, decay the learning rate along a cosine "
                                       "to this fraction of optim.lr at the last step; None keeps it constant.")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="Keep an EMA of the trainable parameters with this decay; None disables.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="accelerate mixed precision.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        # YAML reads a bare `no` (in a file or in --set optim.mixed_precision=no) as False.
        return "no" if value is False else value


class GRPOSection(Section):
    group_size: int = Field(8, ge=2, description="Videos sampled per input (G).")
    kl_weight: float = Field(0.004, ge=0, description="KL penalty to the base model (the model before fine-tuning).")
    clip_range: float = Field(1e-3, gt=0, description="PPO clip range of the probability ratio.")
    eta: float = Field(0.7, ge=0, description="SDE noise level of the rollout sampler (sampler.noise: flow_grpo).")
    timestep_fraction: float = Field(
        1.0, gt=0, le=1, description="Train on the first int(num_steps * fraction) denoising steps of each rollout (all "
        "steps stay stochastic); identity-grpo uses 0.99, i.e. 24 of 25. The CFG of rollouts and update is sampler.guidance_scale.")
    inner_epochs: int = Field(1, ge=1, description="Passes over each rollout batch.")
    reward_model: str | None = Field(None, description="Learned identity reward model checkpoint; None uses the face-pool reward.")
    reward_model_weight: float = Field(1.0, ge=0, description="Weight of the learned reward when mixed with the face reward.")
    face_reward_weight: float = Field(1.0, ge=0, description="Weight of the face-pool reward in the mix.")


class SFTSection(Section):
    face_weight: float = Field(
        0.1, ge=0, description="SFT baseline: weight w of the face identity loss beside the diffusion loss, "
        "loss = ||v - v_target||^2 - w * normalized R_face(decoded x0 prediction) (the paper's SFT adds a face loss; "
        "it gives no weight, so the default is IPRO's reward.weight on the same score). 0: diffusion loss only.")


class ArchitectureConfig(Section):
    """The transformer of a new pixel-i2v model (the embedded base model's: these defaults with overlap: true)."""

    dim: int = Field(192, ge=8, description="Transformer width (heads x head dimension).")
    layers: int = Field(4, ge=1, description="Transformer blocks.")
    heads: int = Field(6, ge=1, description="Attention heads; must divide dim.")
    ffn: int = Field(768, ge=1, description="Hidden width of each block's feed-forward layer.")
    overlap: bool = Field(False, description="Overlapping output: each token writes a 16x16 patch blended with its "
                          "neighbours' by a tent window (4x the output channels), so the 8x8 token grid leaves no seams.")

    @model_validator(mode="after")
    def _heads(self):
        if self.dim % self.heads:
            raise ValueError(f"model.architecture.heads ({self.heads}) must divide model.architecture.dim ({self.dim})")
        return self


class PretrainModelConfig(Section):
    path: str = Field("new:pixel-i2v", description="'new:pixel-i2v' builds a new model from model.architecture and "
                      "model.shift (random weights, change head at zero); a model folder (or 'builtin') trains on from its weights.")
    architecture: ArchitectureConfig = Field(default_factory=ArchitectureConfig, description="A new model's transformer.")
    shift: float = Field(2.0, gt=0, description="A new model's scheduler shift: the sampler's schedule and the distribution "
                         "of training noise levels (a folder's model keeps its scheduler's).")

    @model_validator(mode="after")
    def _new_or_folder(self):
        if self.path.startswith("new:") and self.path != "new:pixel-i2v":
            raise ValueError(f"model.path {self.path!r}: only 'new:pixel-i2v' can be built from an architecture; pass a model folder to train one on")
        given = {"architecture", "shift"} & self.model_fields_set
        if not self.path.startswith("new:") and given:
            raise ValueError(f"model.{sorted(given)[0]}: only for a new model (model.path: new:pixel-i2v); the folder "
                             f"{self.path!r} brings its own; remove the key")
        return self


class PretrainDataConfig(ClipFrames):
    height: int = Field(128, ge=8, description="Clip height in pixels (a multiple of 8 for pixel-i2v).")
    width: int = Field(160, ge=8, description="Clip width in pixels (a multiple of 8 for pixel-i2v).")
    num_frames: int = Field(9, ge=5, le=17, description="Frames per clip; 4k+1 (the held-out carphone frames 80-119 taken every other frame hold at most 17).")
    batch_size: int = Field(4, ge=1, description="Clips per forward pass (per process).")


class PretrainSection(Section):
    held_out_every: int | None = Field(500, ge=1, description="Every N steps log held_out_loss: the x0 loss on held-out carphone "
                                       "clips (frames 80+) at sigma 0.25/0.5/0.75/1 with fixed noise; a multiple of run.log_every; None disables.")
    evaluate_faces: bool = Field(True, description="After training, measure the saved model on the held-out inputs (4 carphone clips, "
                                 "the astronaut; 3 seeds, 4 and 8 steps): face detection rate and dlib FaceSim vs the input face, "
                                 "beside the real clips'; written to run.output_dir/face_eval.json.")
    edge_weight: float = Field(0.0, ge=0, description="Add this times the squared error of the x0 prediction's horizontal and "
                               "vertical pixel differences to the loss: weighs the 8-px seams between patches, which the plain "
                               "MSE barely sees; its minimum is still the clean clip's expectation. 0: plain x0 MSE.")


class RunConfig(Section):
    output_dir: str = Field("runs/ipro", description="Where checkpoints, logs and samples go.")
    seed: int = Field(0, description="Seed for data order, noise and initialization.")
    checkpoint_every: int = Field(50, ge=1, description="Save a resumable checkpoint every N optimizer steps (and at the end).")
    keep_last: int = Field(2, ge=1, description="Keep the last N checkpoints.")
    log_every: int = Field(1, ge=1, description="Log scalars every N steps.")
    sample_every: int | None = Field(None, ge=1, description="Write sample videos every N steps; None disables.")
    log_with: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Trackers (accelerate's): tensorboard and/or wandb, [] for none. "
        "wandb runs offline (WANDB_MODE=offline) unless WANDB_MODE or WANDB_API_KEY is set; its run folder goes to output_dir/wandb.")
    hacking_monitor: bool = Field(True, description="Every log_every steps, log the rigid-face rate (the `ipro eval` measure) and face "
                                  "coverage of the step's decoded rollouts as hacking/rigid_rate and hacking/face_coverage.")
    rigid_warn_rise: float = Field(0.35, ge=0, le=1, description="Warn once (reward hacking) when the rigid-face rate of the last 16 "
                                   "judged rollouts exceeds that of the run's first 16 by more than this.")
    max_nonfinite: int = Field(5, ge=1, description="Abort after this many non-finite losses in a row (each is skipped).")
    device: str | None = Field(None, description="Force a device; None lets accelerate choose.")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "report_to" in data:
            raise ValueError("run.report_to is now run.log_with (tensorboard | wandb); rename the key")
        if isinstance(data, dict) and "rigid_warn_rate" in data:
            raise ValueError("run.rigid_warn_rate is now run.rigid_warn_rise: the warning compares the recent rigid-face rate "
                             "with the run's starting rate (default: 0.35 above it); rename the key")
        if isinstance(data, dict) and isinstance(data.get("log_with"), str):
            data = {**data, "log_with": [data["log_with"]]}
        return data


class TrainConfigBase(Section):
    """The sections every method reads; each method's config adds its own (below)."""

    method: str = Field(description="The training method; each has its own config class and sections.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="before")
    @classmethod
    def _other_methods_keys(cls, data):
        """A key of another method's config (often left over from a preset of that method)
        is named with the method it belongs to, instead of as an unknown key."""
        if not isinstance(data, dict):
            return data
        mine, method = cls.model_fields, cls.model_fields["method"].default
        for key, value in data.items():
            owners = [m for m, other in METHOD_CONFIGS.items() if key in other.model_fields]
            if key not in mine and owners:
                raise ValueError(f"'{key}' is not a section of method '{method}' (only of {_names(owners)}); remove it")
            fields = getattr(mine[key].annotation, "model_fields", None) if key in mine else None
            if fields is None or not isinstance(value, dict):
                continue
            for sub in value:
                owners = [m for m, other in METHOD_CONFIGS.items()
                          if sub in getattr(other.model_fields.get(key) and other.model_fields[key].annotation, "model_fields", {})]
                if sub not in fields and owners:
                    raise ValueError(f"'{key}.{sub}' is not a setting of method '{method}' (only of {_names(owners)}); remove it")
        return data


class IPROConfig(TrainConfigBase):
    """`ipro train` with method: ipro (reward backprop through the last K sampler steps)."""

    method: Literal["ipro"] = Field("ipro", description="'ipro' reward backprop ('grpo' group policy optimization, 'sft' flow-matching "
                                    "on GT clips and 'pretrain' base-model training have their own configs: --print-config --method M).")
    sampler: IPROSamplerConfig = Field(default_factory=IPROSamplerConfig)
    reward: IPRORewardConfig = Field(default_factory=IPRORewardConfig)
    kl: KLConfig = Field(default_factory=KLConfig)


class GRPOConfig(TrainConfigBase):
    """`ipro train` with method: grpo (Identity-GRPO: group rollouts, clipped policy update)."""

    method: Literal["grpo"] = Field("grpo", description="'grpo' group relative policy optimization with an SDE sampler.")
    sampler: GRPOSamplerConfig = Field(default_factory=GRPOSamplerConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    grpo: GRPOSection = Field(default_factory=GRPOSection)


class SFTConfig(TrainConfigBase):
    """`ipro train` with method: sft (the baseline: flow matching on ground-truth clips + a face loss)."""

    method: Literal["sft"] = Field("sft", description="'sft' flow-matching on ground-truth clips plus a face identity loss.")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    sft: SFTSection = Field(default_factory=SFTSection)


class PretrainConfig(TrainConfigBase):
    """`ipro train` with method: pretrain (a base model trained in full on real footage; configs/base-model.yaml)."""

    method: Literal["pretrain"] = Field("pretrain", description="'pretrain' flow matching (x0 loss) on clips from footage that "
                                        "ships in packages, the whole model trained; the EMA weights go to run.output_dir/model.")
    model: PretrainModelConfig = Field(default_factory=PretrainModelConfig)
    data: PretrainDataConfig = Field(default_factory=PretrainDataConfig)
    pretrain: PretrainSection = Field(default_factory=PretrainSection)

    @model_validator(mode="after")
    def _held_out_logged(self):
        every = self.pretrain.held_out_every
        if every and every % self.run.log_every:
            raise ValueError(f"pretrain.held_out_every ({every}) must be a multiple of run.log_every ({self.run.log_every}), or it is never logged")
        return self


# The config of a run is one of these, told apart by its `method` key (default 'ipro').
METHOD_CONFIGS: dict[str, type[TrainConfigBase]] = {"ipro": IPROConfig, "grpo": GRPOConfig, "sft": SFTConfig, "pretrain": PretrainConfig}
TrainConfig = IPROConfig | GRPOConfig | SFTConfig | PretrainConfig


def _names(methods: list[str]) -> str:
    return " and ".join(f"'{m}'" for m in methods)


def config_class(method: object, source: str = "--method") -> type[TrainConfigBase]:
    """The config class of a method name; a one-line IproError naming `source` for an unknown one."""
    if not isinstance(method, str) or method not in METHOD_CONFIGS:
        raise IproError(f"{source}: {method!r} is not a training method; use one of {', '.join(METHOD_CONFIGS)}")
    return METHOD_CONFIGS[method]


def parse_config(data: dict, source: str = "config") -> TrainConfig:
    """Validate a mapping of settings as the config of its `method` (errors name `source`)."""
    cls = config_class(data.get("method", "ipro"), f"{source}: key 'method'")
    return validate(cls, data, source, f"see `ipro train --print-config --method {cls.model_fields['method'].default}` for the valid keys")


def parse_sets(pairs: list[str]) -> dict:
    """Command-line `--set KEY=VALUE` pairs as `load_config` overrides (values read as YAML)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise IproError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-4")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Read and validate a YAML config; `overrides` are dotted keys ('optim.lr': 1e-4).
    Returns the config class of the config's method: IPROConfig, GRPOConfig, SFTConfig or PretrainConfig."""
    data: dict = read_mapping(path, "configs/tiny-cpu-ipro.yaml") if path is not None else {}
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise IproError(f"override '{dotted}': '{p}' is not a section")
        node[leaf] = value
    return parse_config(data, str(path) if path is not None else "config")


def describe_defaults(method: str = "ipro") -> str:
    """YAML of every field of one method's config with its default and its description as a comment."""
    lines: list[str] = []

    def walk(model_cls: type[BaseModel], indent: str) -> None:
        for name, field in model_cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                lines.append(f"{indent}{name}:")
                walk(ann, indent + "  ")
                continue
            default = "<required>" if field.is_required() else field.get_default(call_default_factory=True)
            value = default if default == "<required>" else yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"{indent}{name}: {value}  # {field.description}")

    walk(config_class(method), "")
    return "\n".join(lines) + "\n"
