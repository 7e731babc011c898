"""The training config: one YAML file, validated; unknown keys are errors naming their path."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from harness.config import Strict


class LoraConfig(Strict):
    r: int = 128
    alpha: int = 64
    dropout: float = 0.05
    targets: list[str] | None = None     # None: the backbone's lora_targets


class BackboneConfig(Strict):
    name: str = "tiny"
    checkpoint: str | None = None        # tiny: None = the shipped base; mmada / lumina-dimoo: local dir
    lora: LoraConfig | None = None       # None: train all parameters (tiny); set for 8B models
    dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False
    device: str = "cpu"
    options: dict = Field(default_factory=dict)   # passed to the backbone loader (resolution, vq_path, ...)


class SamplerSettings(Strict):
    preset: str | None = None
    steps: int = 12
    cfg: float = 2.0
    temperature: float = 1.0
    choice_temperature: float = 2.0
    noise_anneal: Literal["linear", "cumprod", "constant"] = "linear"


class RolloutConfig(Strict):
    prompts_per_step: int = 8
    group_size: int = 8                   # G images per prompt
    split: Literal["train"] = "train"
    tag_weights: dict[str, float] = Field(default_factory=lambda: {
        "single_object": 1.0, "two_object": 1.0, "counting": 1.0, "colors": 1.0, "position": 1.0, "color_attr": 1.0})
    prompt_file: str | None = None        # real backbones: a GenEval-format metadata jsonl of training prompts
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)
    batch_size: int = 128                 # images per sampler call
    # bfloat16 runs the rollout sampler under autocast (~1.7x faster on a CPU with AVX512-BF16); the
    # ratios, KL and updates stay in float32 and are recomputed, so only the rollouts' noise changes
    dtype: Literal["float32", "bfloat16"] = "float32"


class MethodConfig(Strict):
    name: str = "ht-grpo"
    # shared
    inner_iterations: int = 4             # K
    # grpo (UniGRPO-style random remasking)
    mask_ratio: Literal["uniform", "cosine"] = "uniform"
    min_mask_ratio: float = 0.1
    # maskgrpo
    min_mask_rate: float = 0.6
    # tracegrpo
    trace_groups: int = 4                 # rollout steps grouped into this many forward passes
    # diffu-grpo
    prompt_mask_prob: float = 0.15
    # ht-grpo
    partition: Literal["commit_order", "entropy_low", "entropy_high"] = "commit_order"
    structure_fraction: float = 0.25
    estimator: Literal["fully_masked", "hierarchical", "trajectory"] = "hierarchical"   # measured: see leaderboards/tiny_methods.md
    credit: Literal["two_level", "soft_entropy", "uniform"] = "two_level"
    structure_weight: float = 2.0         # w_s
    n_global: int = 1
    n_struct: int = 1
    sample_fraction: float = 0.5          # of the stage's candidate set, per inner iteration


class LossConfig(Strict):
    clip_eps: float = 0.2
    beta_kl: float = 0.01
    kl_max_log_ratio: float | None = None   # None: plain k3; c: k3 continued linearly beyond log(ref/pi) = c (c=2 measured worse, tiny_methods.md)
    adv_eps: float = 1e-4
    micro_batch: int = 0                  # 0: whole batch in one pass; else gradient accumulation chunks
    # bfloat16 runs the pi / pi_old / pi_ref forward passes under autocast (weights, optimizer and the loss
    # arithmetic stay float32); all three at one precision keep the first inner iteration's ratio exactly 1
    dtype: Literal["float32", "bfloat16"] = "float32"
    # > 1: shapes world only; within each image, blame uncountable objects more and countable ones less.
    # Measured harmful at focus 3 (collapse; leaderboards/tiny_methods.md, session 4): off unless studying it
    # (trainers.rewards.object_credit); 0 or 1: every token of an image shares its advantage equally
    object_credit: float = Field(0.0, ge=0.0)


class OptimConfig(Strict):
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0                 # training steps (each makes inner_iterations updates) of linear warm-up
    # after warm-up: constant, or a cosine decay to min_lr_ratio * lr at the last step (steps of the run)
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    # > 0: keep an exponential moving average of the trainable weights (updated once per training step);
    # checkpoints save and score the average, the live weights travel in trainer_state.pt for resuming
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)


class CheckpointConfig(Strict):
    every: int = 10
    eval_suite: str | None = "shapes-geneval"
    eval_store: str | None = None         # None: the default results store


class TrainConfig(Strict):
    name: str = "run"
    seed: int = 0
    steps: int = 40
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: dict[str, float] = Field(default_factory=lambda: {"shapes-geneval": 1.0})   # evaluator -> weight
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tensorboard: bool = True
