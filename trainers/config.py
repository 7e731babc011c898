"""The training config: one YAML file, validated; unknown keys are errors naming their path."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from harness.config import Strict
from harness.io import safe_name
from harness.sampling import SamplerSettings
from harness.shapes.prompts import TAGS

# Ranges are declared on the fields (pydantic reports them with the key path); rules that tie fields together
# are the model validators below. `harness validate` and `harness train` both go through TrainConfig and then
# trainers.loop.check_train_config (registry names, backbone options, devices): one validator for both.


class LoraConfig(Strict):
    r: int = Field(128, ge=1)
    alpha: int = Field(64, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: list[str] | None = None     # None: the backbone's lora_targets


class BackboneConfig(Strict):
    name: str = "tiny"
    checkpoint: str | None = None        # tiny: None = the shipped base; mmada / lumina-dimoo: local dir
    lora: LoraConfig | None = None       # None: train all parameters (tiny); set for 8B models
    dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False
    device: str = "cpu"
    options: dict = Field(default_factory=dict)   # passed to the backbone loader (resolution, vq_path, ...)

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        from harness.backbones.base import check_device
        check_device(v, require_available=False)   # availability is checked when training starts
        return v


class RolloutConfig(Strict):
    prompts_per_step: int = Field(8, ge=1)
    group_size: int = Field(8, ge=2)      # G images per prompt; 1 would give zero advantages forever
    split: Literal["train"] = "train"
    tag_weights: dict[str, float] = Field(default_factory=lambda: {
        "single_object": 1.0, "two_object": 1.0, "counting": 1.0, "colors": 1.0, "position": 1.0, "color_attr": 1.0})
    prompt_file: str | None = None        # real backbones: a GenEval-format metadata jsonl of training prompts
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)
    batch_size: int = Field(128, ge=1)    # images per sampler call
    # bfloat16 runs the rollout sampler under autocast (~1.7x faster on a CPU with AVX512-BF16); the
    # ratios, KL and updates stay in float32 and are recomputed, so only the rollouts' noise changes
    dtype: Literal["float32", "bfloat16"] = "float32"

    @field_validator("tag_weights")
    @classmethod
    def _tag_weights(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(TAGS))
        if unknown:
            raise ValueError(f"unknown tags {unknown}; known: {', '.join(TAGS)}")
        if any(w < 0 for w in v.values()):
            raise ValueError(f"weights must be >= 0, got {v}")
        if not any(w > 0 for w in v.values()):
            raise ValueError("at least one tag needs a weight > 0 (an empty mapping would not mean 'all tags')")
        return v


class MethodConfig(Strict):
    name: str = "ht-grpo"
    # shared
    inner_iterations: int = Field(4, ge=1)   # K
    # grpo (UniGRPO-style random remasking)
    mask_ratio: Literal["uniform", "cosine"] = "uniform"
    min_mask_ratio: float = Field(0.1, ge=0.0, le=1.0)
    # maskgrpo
    min_mask_rate: float = Field(0.6, ge=0.0, le=1.0)
    # tracegrpo
    trace_groups: int = Field(4, ge=1)                # rollout steps grouped into this many forward passes
    # diffu-grpo
    prompt_mask_prob: float = Field(0.15, ge=0.0, le=1.0)
    # ht-grpo
    partition: Literal["commit_order", "entropy_low", "entropy_high"] = "commit_order"
    structure_fraction: float = Field(0.25, ge=0.0, le=1.0)
    estimator: Literal["fully_masked", "hierarchical", "trajectory"] = "hierarchical"   # measured: see leaderboards/tiny_methods.md
    credit: Literal["two_level", "soft_entropy", "uniform"] = "two_level"
    structure_weight: float = Field(2.0, ge=0.0)        # w_s
    n_global: int = Field(1, ge=0)
    n_struct: int = Field(1, ge=0)
    sample_fraction: float = Field(0.5, gt=0.0, le=1.0)         # of the stage's candidate set, per inner iteration

    @model_validator(mode="after")
    def _stages_fit(self):
        if self.n_global > self.inner_iterations:
            raise ValueError(f"n_global ({self.n_global}) must be <= inner_iterations ({self.inner_iterations}): "
                             f"the stages share the K inner iterations")
        return self


class LossConfig(Strict):
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0)
    beta_kl: float = Field(0.01, ge=0.0)
    kl_max_log_ratio: float | None = Field(None, gt=0.0)  # None: plain k3; c: k3 continued linearly beyond log(ref/pi) = c (c=2 measured worse, tiny_methods.md)
    adv_eps: float = Field(1e-4, gt=0.0)
    micro_batch: int = Field(0, ge=0)                 # 0: whole batch in one pass; else gradient accumulation chunks
    # bfloat16 runs the pi / pi_old / pi_ref forward passes under autocast (weights, optimizer and the loss
    # arithmetic stay float32); all three at one precision keep the first inner iteration's ratio exactly 1
    dtype: Literal["float32", "bfloat16"] = "float32"
    # > 1: shapes world only; within each image, blame uncountable objects more and countable ones less.
    # Measured harmful at focus 3 (collapse; leaderboards/tiny_methods.md, session 4): off unless studying it
    # (trainers.rewards.object_credit); 0 or 1: every token of an image shares its advantage equally
    object_credit: float = Field(0.0, ge=0.0)


class OptimConfig(Strict):
    lr: float = Field(1e-4, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)   # 0: no clipping
    warmup_steps: int = Field(0, ge=0)                # training steps (each makes inner_iterations updates) of linear warm-up
    # after warm-up: constant, or a cosine decay to min_lr_ratio * lr at the last step (steps of the run)
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    # > 0: keep an exponential moving average of the trainable weights (updated once per training step);
    # checkpoints save and score the average, the live weights travel in trainer_state.pt for resuming
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v


class CheckpointConfig(Strict):
    every: int = Field(10, ge=1)
    eval_suite: str | None = "shapes-geneval"
    eval_store: str | None = None         # None: the default results store


class DistributedConfig(Strict):
    """Multi-process training under torchrun / accelerate launch (docs/distributed.md). auto = ddp: every rank holds
    the model, takes whole prompt groups of each step, and the gradients are summed over ranks (LoRA, or a model
    that fits one device). fsdp: FSDP2 fully_shard (each block, then the root; the KL reference sharded the same
    way) for full fine-tuning too large for one device; not with backbone.lora. Checkpoints hold full tensors in the
    one-process format under either, so a run resumes at any world size and strategy."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"


class TrainConfig(Strict):
    name: str = "run"
    seed: int = Field(0, ge=0)
    steps: int = Field(40, ge=1)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: dict[str, float] = Field(default_factory=lambda: {"shapes-geneval": 1.0})   # evaluator -> weight
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tensorboard: bool = True
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        return safe_name(v, "name")    # the default run folder is runs/<name>

    @field_validator("reward")
    @classmethod
    def _reward_weights(cls, v: dict[str, float]) -> dict[str, float]:
        if not v or not any(w != 0 for w in v.values()):
            raise ValueError("needs at least one evaluator with a non-zero weight")
        return v
