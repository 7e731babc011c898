"""MaskGIT-style sampling of image codes, with a trace of when and how each slot was committed.

Start from an all-masked grid; at step s (of T) predict every masked slot, draw a code per slot,
and commit the slots that are most confident -- confidence perturbed by Gumbel noise whose scale
anneals over the steps -- leaving `masked_after(s)` slots masked, a cosine schedule. Committed
codes are never changed again.

Every random number of sample i comes from its own generator seeded by (seed, i), so an image
depends only on (prompt, seed, global index), never on the batch it was drawn in.

Presets reproduce the published samplers (../shared backbones.md §3, the counts checked against the official code):
- "mmada":        15 steps, CFG 3.5, no token temperature, remask-noise scale tau_s = tau_{s-1} * (1 - (s+1)/T),
                  schedule "mmada-cosine"
- "lumina-dimoo": 64 steps, CFG 4.0, temperature 1.0 on tokens and a constant remask-noise scale,
                  schedule "dimoo-cosine"

How many slots stay masked after each step (`mask_schedule`):
- "cosine" / "linear" (the harness default, e.g. the tiny model): max(1, floor(n * m((s+1)/T))) in float64, 0 after
  the last step; a step can commit nothing when two consecutive floors are equal.
- "mmada-cosine": MMaDA's arithmetic (Gen-Verse/MMaDA @ 3cdb8709635beb29f66e4e23cd66060872ac3996,
  models/modeling_mmada.py t2i_generate L186-199, models/sampling.py cosine_schedule L39 / mask_by_random_topk L31):
  ratio (s+1)/T as a float32 CPU tensor, mask_ratio = cos(ratio * pi * 0.5) in float32 (cos(pi/3) = 0.49999997, so
  floor(1024 * it) = 511), mask_len = floor(n * mask_ratio), clamped to [1, masked - 1] -- the lower bound wins, so
  once one slot is left a step commits nothing. After the last step the sampler returns every sampled code (its
  mask_len of 1 only concerns the unreturned input), so everything still masked is committed at step T-1.
- "dimoo-cosine": Lumina-DiMOO's (Alpha-VLLM/Lumina-DiMOO @ 81344e60545ae8d70f11039d3450717d974f831b,
  generators/image_generation_generator.py generate_image L88-96 and L133, utils/generation_utils.py cosine_schedule
  L26 / mask_by_random_topk L59): keep_n = max(1, floor(float32(n) * cos(0.5 * pi * (s+1)/T))) in float32, 0 at
  s = T-1, then clamped to [0, masked - 1] -- every step commits at least one slot -- and the loop stops once
  nothing is masked.
Both official samplers score slots in bf16, where tied confidences at the cut-off commit a few extra slots at
some steps (data-dependent); here scores are float32 and ties do not happen, so the counts are the schedule's.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch
from pydantic import Field, field_validator

from harness.backbones.base import MASKED, Backbone, PromptBatch, concat_prompts, guided_logits
from harness.config import Strict


SCHEDULES = {
    "cosine": lambda r: math.cos(math.pi / 2 * r),
    "linear": lambda r: 1.0 - r,
    "mmada-cosine": None,     # the official samplers' float32 arithmetic and clamps: see mask_schedule
    "dimoo-cosine": None,
}

@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 12
    cfg: float = 2.0                 # w in (1 + w) * cond - w * uncond
    temperature: float = 1.0         # on the token distribution
    choice_temperature: float = 2.0  # scale of the Gumbel noise on log-confidence when choosing slots
    noise_anneal: str = "linear"     # linear: tau0 * (1 - r) (MaskGIT) | cumprod (MMaDA) | constant (DiMOO)
    schedule: str = "cosine"         # slots still masked after step s: mask_schedule (cosine, linear, mmada-cosine, dimoo-cosine)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError("sampler steps must be >= 1")
        if self.noise_anneal not in ("linear", "cumprod", "constant"):
            raise ValueError(f"noise_anneal must be linear, cumprod or constant, not {self.noise_anneal!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, not {self.schedule!r}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")


@dataclass(frozen=True)
class MLCacheSamplerConfig(SamplerConfig):
    """SamplerConfig with Lumina-DiMOO's ML-Cache (max-logit cache) on. A subclass, so the plain SamplerConfig
    (and every protocol recorded from it with dataclasses.asdict) is unchanged when the cache is off.

    Upstream (Alpha-VLLM/Lumina-DiMOO @ 81344e60545ae8d70f11039d3450717d974f831b, generators/image_generation_generator.py
    generate_image L30-33 for the defaults, L74-79 for the schedule; inference/inference_t2i.py L40-43 the same defaults
    on the command line, README "Faster Sampling with Cache" the ranges):
    - warmup_step = int(steps * warmup_ratio); step s is a refresh (a full forward that rebuilds the cache of every
      block's keys / values and of the logits at every position) when s <= warmup_step or (s - warmup_step) %
      refresh_interval == 0;
    - any other step recomputes, per sequence (cond and uncond separately), only the positions whose max image-code
      logit at the step before is <= its (1 - cache_ratio) quantile (L138-145), about 10% of them at the default;
      every other position keeps its cached keys, values and logits (harness.backbones.llada ml_cache_step).
    Needs a LLaDA backbone (mmada, lumina-dimoo; the cache itself is DiMOO's)."""
    cache: str = "ml-cache"
    cache_ratio: float = 0.9          # share of positions reused at a cached step, in (0, 1); upstream default 0.9
    cache_warmup_ratio: float = 0.3   # share of the steps that always refresh, in [0, 1); upstream default 0.3
    cache_refresh_interval: int = 5   # a full refresh every this many steps after the warm-up, >= 2; upstream 5

    def __post_init__(self):
        super().__post_init__()
        if self.cache != "ml-cache":
            raise ValueError(f"cache must be ml-cache here (cache none is a plain SamplerConfig), not {self.cache!r}")
        if not 0 < self.cache_ratio < 1:
            raise ValueError("cache_ratio must lie in (0, 1)")
        if not 0 <= self.cache_warmup_ratio < 1:
            raise ValueError("cache_warmup_ratio must lie in [0, 1)")
        if self.cache_refresh_interval < 2:
            raise ValueError("cache_refresh_interval must be >= 2")


CACHE_FIELDS = ("cache_ratio", "cache_warmup_ratio", "cache_refresh_interval")


def refresh_steps(cfg: SamplerConfig) -> list[bool]:
    """Per step, whether it runs the full forward (always, without the cache)."""
    if not isinstance(cfg, MLCacheSamplerConfig):
        return [True] * cfg.steps
    warmup = int(cfg.steps * cfg.cache_warmup_ratio)
    return [s <= warmup or (s - warmup) % cfg.cache_refresh_interval == 0 for s in range(cfg.steps)]


PRESETS = {
    "mmada": SamplerConfig(steps=15, cfg=3.5, temperature=1.0, choice_temperature=1.0, noise_anneal="cumprod",
                           schedule="mmada-cosine"),
    "lumina-dimoo": SamplerConfig(steps=64, cfg=4.0, temperature=1.0, choice_temperature=1.0, noise_anneal="constant",
                                  schedule="dimoo-cosine"),
}


def sampler_config(preset: str | None = None, **overrides) -> SamplerConfig:
    """The preset (or the defaults) with `overrides`; cache="ml-cache" (with cache_* settings) gives an
    MLCacheSamplerConfig, cache="none" or no cache a plain SamplerConfig."""
    cache = overrides.pop("cache", None) or "none"
    cache_settings = {k: overrides.pop(k) for k in CACHE_FIELDS if k in overrides}
    if preset is None:
        base = SamplerConfig(**overrides)
    elif preset not in PRESETS:
        raise KeyError(f"unknown sampler preset {preset!r}; known: {', '.join(PRESETS)}")
    else:
        base = replace(PRESETS[preset], **overrides)
    if cache == "none":
        if cache_settings:
            raise ValueError(f"{', '.join(cache_settings)} set but cache is none (set cache: ml-cache)")
        return base
    if cache != "ml-cache":
        raise ValueError(f"cache must be none or ml-cache, not {cache!r}")
    plain = {f.name: getattr(base, f.name) for f in fields(SamplerConfig)}
    if isinstance(base, MLCacheSamplerConfig):
        plain.update({k: getattr(base, k) for k in CACHE_FIELDS})
    return MLCacheSamplerConfig(**{**plain, **cache_settings})


class SamplerSettings(Strict):
    """The sampler as a training config (rollout.sampler) or a suite (sampler) writes it; the one such type.
    Unset fields come from the preset, else SamplerConfig's defaults. preset "backbone" = the preset named like
    the backbone it runs on (mmada, lumina-dimoo), for configs and suites shared by several models."""
    preset: str | None = None
    steps: int | None = Field(default=None, ge=1)
    cfg: float | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, gt=0)
    choice_temperature: float | None = Field(default=None, ge=0)
    noise_anneal: Literal["linear", "cumprod", "constant"] | None = None
    schedule: Literal["cosine", "linear", "mmada-cosine", "dimoo-cosine"] | None = None
    # Lumina-DiMOO's ML-Cache (MLCacheSamplerConfig); unset = none (images as without the option)
    cache: Literal["none", "ml-cache"] | None = None
    cache_ratio: float | None = Field(default=None, gt=0, lt=1)
    cache_warmup_ratio: float | None = Field(default=None, ge=0, lt=1)
    cache_refresh_interval: int | None = Field(default=None, ge=2)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str | None) -> str | None:
        if preset is not None and preset != "backbone" and preset not in PRESETS:
            raise ValueError(f"unknown sampler preset {preset!r}; known: backbone, {', '.join(PRESETS)}")
        return preset

    def resolve(self, backbone: str | None = None) -> "SamplerConfig":
        """The SamplerConfig these settings give on `backbone` (needed for preset "backbone")."""
        preset = self.preset
        if preset == "backbone":
            if backbone not in PRESETS:
                raise ValueError(f"sampler.preset 'backbone' but backbone {backbone!r} has no sampler preset "
                                 f"(known: {', '.join(PRESETS)})")
            preset = backbone
        return sampler_config(preset, **self.model_dump(exclude={"preset"}, exclude_none=True))


def _mmada_keep(step: int, steps: int, n: int, masked: int) -> int:
    # MMaDA t2i_generate: a float32 CPU scalar tensor, torch.cos, floor, then max(1, min(masked - 1, .))
    ratio = torch.tensor(1.0 * (step + 1) / steps, dtype=torch.float32)
    length = int((n * torch.cos(ratio * math.pi * 0.5)).floor().item())
    return max(1, min(masked - 1, length))


def _dimoo_keep(step: int, steps: int, n: int, masked: int) -> int:
    # Lumina-DiMOO generate_image: keep_n = max(1, floor(float(n) * cos)) before the last step, 0 at it; then
    # mask_by_random_topk clamps it to [0, masked - 1]
    if step < steps - 1:
        frac = torch.cos(0.5 * math.pi * torch.tensor([(step + 1) / steps], dtype=torch.float32))
        keep = max(1, int((torch.tensor([float(n)], dtype=torch.float32) * frac).floor().item()))
    else:
        keep = 0
    return min(max(keep, 0), masked - 1)


def mask_schedule(steps: int, n: int, schedule: str = "cosine") -> list[int]:
    """How many of the n slots are still masked after each step (0-based) of `steps`; the last entry is 0.
    See the module docstring for the rule of each schedule."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, not {schedule!r}")
    out, masked = [], n
    for step in range(steps):
        if schedule == "mmada-cosine":
            masked = 0 if step == steps - 1 else _mmada_keep(step, steps, n, masked)
        elif schedule == "dimoo-cosine":
            masked = 0 if masked == 0 else _dimoo_keep(step, steps, n, masked)      # DiMOO stops at 0
        else:
            masked = 0 if step == steps - 1 else max(1, math.floor(n * SCHEDULES[schedule]((step + 1) / steps)))
        out.append(masked)
    return out


def masked_after(step: int, steps: int, n: int, schedule: str = "cosine") -> int:
    """How many of the n slots are still masked after step `step` (0-based) of `steps`."""
    return mask_schedule(steps, n, schedule)[step]


def noise_scales(cfg: SamplerConfig) -> list[float]:
    """The Gumbel-noise scale used at each step."""
    out, tau = [], cfg.choice_temperature
    for s in range(cfg.steps):
        r = (s + 1) / cfg.steps
        if cfg.noise_anneal == "linear":
            out.append(cfg.choice_temperature * (1 - r))
        elif cfg.noise_anneal == "cumprod":
            tau = tau * (1 - r)
            out.append(tau)
        else:
            out.append(cfg.choice_temperature)
    return out


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of global sample `index` under `seed`."""
    digest = hashlib.sha256(f"harness-sample:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass
class Rollout:
    codes: torch.LongTensor          # [B, N] final codes
    commit_step: torch.LongTensor    # [B, N] step at which each slot was committed
    confidence: torch.Tensor         # [B, N] p(code) when committed (guided, untempered)
    entropy: torch.Tensor            # [B, N] entropy of the guided distribution when committed
    seed: int = 0
    indices: list[int] = field(default_factory=list)


def _gumbel(shape, generators: list[torch.Generator]) -> torch.Tensor:
    u = torch.stack([torch.rand(shape, generator=g) for g in generators])
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


@torch.no_grad()
def sample(backbone: Backbone, prompts: PromptBatch, cfg: SamplerConfig, *, seed: int,
           indices: list[int] | None = None) -> Rollout:
    """Draw one image per prompt. `indices` are the global sample indices (default 0..B-1)."""
    b = len(prompts)
    n = backbone.grid[0] * backbone.grid[1]
    indices = list(range(b)) if indices is None else list(indices)
    if len(indices) != b:
        raise ValueError(f"{len(indices)} sample indices for {b} prompts")
    device = prompts.ids.device
    gens = [sample_generator(seed, i) for i in indices]
    uncond = backbone.uncond(b) if cfg.cfg != 0 else None
    codes = torch.full((b, n), MASKED, dtype=torch.long, device=device)
    commit_step = torch.full((b, n), -1, dtype=torch.long, device=device)
    confidence = torch.zeros(b, n, device=device)
    entropy = torch.zeros(b, n, device=device)
    taus = noise_scales(cfg)
    keep_counts = mask_schedule(cfg.steps, n, cfg.schedule)
    cached = _MLCache(backbone, prompts, uncond, cfg) if isinstance(cfg, MLCacheSamplerConfig) else None
    for s in range(cfg.steps):
        if s > 0 and keep_counts[s - 1] == 0:
            break                    # nothing left to commit (DiMOO's loop stops here too)
        if cached is None:
            logits = guided_logits(backbone, prompts, uncond, codes, cfg.cfg).float()     # [B, N, K]
        else:
            logits = cached.guided_logits(s, codes).float()
        k = logits.shape[-1]
        drawn = (logits / cfg.temperature + _gumbel((n, k), gens).to(device)).argmax(-1)
        logp = torch.log_softmax(logits, -1)
        conf = logp.gather(-1, drawn.unsqueeze(-1)).squeeze(-1)                        # log p(drawn)
        ent = -(logp.exp() * logp).sum(-1)
        masked = codes == MASKED
        score = conf + taus[s] * _gumbel((n,), gens).to(device)
        score = score.masked_fill(~masked, float("inf"))
        keep_masked = keep_counts[s]
        # the keep_masked lowest scores stay masked; every other still-masked slot is committed now
        order = score.argsort(dim=1)
        stay = torch.zeros_like(masked)
        if keep_masked > 0:
            stay.scatter_(1, order[:, :keep_masked], True)
        commit = masked & ~stay
        codes = torch.where(commit, drawn, codes)
        commit_step = torch.where(commit, torch.full_like(commit_step, s), commit_step)
        confidence = torch.where(commit, conf.exp(), confidence)
        entropy = torch.where(commit, ent, entropy)
    return Rollout(codes=codes, commit_step=commit_step, confidence=confidence, entropy=entropy, seed=seed, indices=indices)


class _MLCache:
    """guided_logits under the ML-Cache: cond and uncond rows in one batch as guided_logits, a refresh at the
    steps refresh_steps(cfg) names (step 0 always, so the first step equals the uncached sampler's)."""

    def __init__(self, backbone: Backbone, prompts: PromptBatch, uncond: PromptBatch | None, cfg: MLCacheSamplerConfig):
        if not hasattr(backbone, "image_logits_ml_cache"):
            raise ValueError(f"sampler cache ml-cache needs a LLaDA backbone (mmada, lumina-dimoo), not "
                             f"{getattr(backbone, 'name', type(backbone).__name__)!r}")
        self.backbone, self.cfg, self.guided = backbone, cfg, uncond is not None and cfg.cfg != 0
        self.prompts = concat_prompts(prompts, uncond) if self.guided else prompts
        self.refresh = refresh_steps(cfg)
        self.state = None

    def guided_logits(self, step: int, codes: torch.LongTensor) -> torch.Tensor:
        if self.refresh[step]:
            self.state = None
        both = torch.cat([codes, codes]) if self.guided else codes
        logits, self.state = self.backbone.image_logits_ml_cache(self.prompts, both, self.state,
                                                                 compute_ratio=1 - self.cfg.cache_ratio)
        if not self.guided:
            return logits
        c, u = logits.chunk(2)
        return (1 + self.cfg.cfg) * c - self.cfg.cfg * u


def generate(backbone: Backbone, texts: list[str], cfg: SamplerConfig, *, seed: int, batch_size: int = 64,
             start_index: int = 0, progress=None) -> Rollout:
    """Sample one image per text in batches; sample i uses global index start_index + i."""
    parts = []
    for lo in range(0, len(texts), batch_size):
        chunk = texts[lo:lo + batch_size]
        parts.append(sample(backbone, backbone.tokenize(chunk), cfg, seed=seed,
                            indices=list(range(start_index + lo, start_index + lo + len(chunk)))))
        if progress is not None:
            progress(len(chunk))
    return Rollout(codes=torch.cat([p.codes for p in parts]), commit_step=torch.cat([p.commit_step for p in parts]),
                   confidence=torch.cat([p.confidence for p in parts]), entropy=torch.cat([p.entropy for p in parts]),
                   seed=seed, indices=[i for p in parts for i in p.indices])
