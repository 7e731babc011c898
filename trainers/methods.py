"""GRPO methods for masked image-token models, as data: each names the views of one inner iteration.

A view says which codes are visible to the model, which tokens enter the loss and with what
credit weight (and, for d1, how much of the prompt is masked). The loop turns views into
log-probs with one `token_logprobs` call each; a method never calls the model.

All randomness of a view comes from the generator the loop passes in, seeded by
(run seed, step, inner iteration), so the old, reference and new passes see identical views.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from trainers.config import MethodConfig


@dataclass
class RolloutTrace:
    """What the methods may read about a rollout batch."""
    codes: torch.LongTensor          # [B, N]
    commit_step: torch.LongTensor    # [B, N] step at which each slot was committed
    confidence: torch.Tensor         # [B, N]
    steps: int                       # T of the sampler
    masked_entropy: torch.Tensor | None = None   # [B, N] entropy of p(. | prompt, all masked) under pi_old


@dataclass
class View:
    visible: torch.BoolTensor        # [B, N] codes shown to the model
    in_loss: torch.BoolTensor        # [B, N] tokens whose ratio enters the loss
    weight: torch.Tensor             # [B, N] credit weight (multiplies the advantage)
    stage: str = "all"
    prompt_mask_prob: float = 0.0    # d1: fraction of prompt tokens masked
    prompt_mask_seed: int = 0


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    views: Callable[[MethodConfig, RolloutTrace, int, torch.Generator], list[View]]
    options: tuple[str, ...] = ()    # the MethodConfig keys it reads besides name and inner_iterations
    needs_masked_entropy: Callable[[MethodConfig], bool] = lambda cfg: False
    stages: tuple[str, ...] = ("all",)


def _ones(tr: RolloutTrace) -> torch.Tensor:
    return torch.ones(tr.codes.shape, dtype=torch.float32, device=tr.codes.device)


def _rand(shape, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=gen).to(device)


def _mask_exact_count(n_masked: torch.Tensor, n: int, gen: torch.Generator, device) -> torch.BoolTensor:
    """Per row, a uniformly random set of n_masked[b] slots."""
    ranks = torch.rand(len(n_masked), n, generator=gen).argsort(1).argsort(1)
    return (ranks < n_masked[:, None]).to(device)


# --- uniform-credit GRPO with random remasking (UniGRPO-style) ------------------------------------

def grpo_views(cfg: MethodConfig, tr: RolloutTrace, k: int, gen: torch.Generator) -> list[View]:
    b, n = tr.codes.shape
    u = torch.rand(b, generator=gen)
    ratio = cfg.min_mask_ratio + (1 - cfg.min_mask_ratio) * (u if cfg.mask_ratio == "uniform" else torch.cos(math.pi / 2 * u))
    masked = _mask_exact_count((ratio * n).round().clamp(1, n).long(), n, gen, tr.codes.device)
    return [View(visible=~masked, in_loss=masked, weight=_ones(tr))]


# --- MaskGRPO: independent masking with a rate rising over the inner loop -------------------------

def maskgrpo_ratio(cfg: MethodConfig, k: int) -> float:
    return min(cfg.min_mask_rate + (1 - cfg.min_mask_rate) * (k + 1) / cfg.inner_iterations, 0.999)


def maskgrpo_views(cfg: MethodConfig, tr: RolloutTrace, k: int, gen: torch.Generator) -> list[View]:
    masked = _rand(tr.codes.shape, gen, tr.codes.device) < maskgrpo_ratio(cfg, k)
    return [View(visible=~masked, in_loss=masked, weight=_ones(tr))]


# --- TraceGRPO: replay the recorded trajectory, steps grouped into trace_groups passes ------------

def trace_groups(steps: int, groups: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) step ranges covering 0..steps-1 in at most `groups` pieces."""
    groups = max(1, min(groups, steps))
    edges = [round(i * steps / groups) for i in range(groups + 1)]
    return [(edges[i], edges[i + 1]) for i in range(groups) if edges[i + 1] > edges[i]]


def tracegrpo_views(cfg: MethodConfig, tr: RolloutTrace, k: int, gen: torch.Generator) -> list[View]:
    views = []
    for start, end in trace_groups(tr.steps, cfg.trace_groups):
        visible = tr.commit_step < start          # the rollout's state before this group of steps
        in_loss = (tr.commit_step >= start) & (tr.commit_step < end)
        views.append(View(visible=visible, in_loss=in_loss, weight=_ones(tr), stage=f"steps {start}-{end - 1}"))
    return views


# --- d1 / diffu-GRPO: all image codes masked, part of the prompt masked ----------------------------

def diffu_grpo_views(cfg: MethodConfig, tr: RolloutTrace, k: int, gen: torch.Generator) -> list[View]:
    none = torch.zeros_like(tr.codes, dtype=torch.bool)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    return [View(visible=none, in_loss=~none, weight=_ones(tr), prompt_mask_prob=cfg.prompt_mask_prob, prompt_mask_seed=seed)]


# --- HT-GRPO: structure / refinement partition, hierarchical credit, Sketch-Then-Paint schedule ----

def structure_set(cfg: MethodConfig, tr: RolloutTrace) -> torch.BoolTensor:
    """The early-structure tokens S of each image: the structure_fraction of slots first in the chosen order."""
    b, n = tr.codes.shape
    size = max(1, math.ceil(cfg.structure_fraction * n))
    if cfg.partition == "commit_order":
        # earlier step first; within a step, the more confident slot first
        key = tr.commit_step.float() - tr.confidence.float() * 0.5
    elif tr.masked_entropy is None:
        raise ValueError(f"partition {cfg.partition!r} needs the all-masked entropy of the rollout")
    elif cfg.partition == "entropy_low":
        key = tr.masked_entropy
    else:
        key = -tr.masked_entropy
    ranks = key.argsort(dim=1, stable=True).argsort(dim=1)
    return ranks < size


def credit_weights(cfg: MethodConfig, tr: RolloutTrace, structure: torch.BoolTensor) -> torch.Tensor:
    """Per-token credit, renormalised to mean 1 per image."""
    if cfg.credit == "uniform":
        w = _ones(tr)
    elif cfg.credit == "two_level":
        w = torch.where(structure, torch.full_like(_ones(tr), cfg.structure_weight), _ones(tr))
    else:   # soft_entropy: low all-masked entropy (decided early) gets up to w_s, high gets 1
        if tr.masked_entropy is None:
            raise ValueError("credit 'soft_entropy' needs the all-masked entropy of the rollout")
        h = tr.masked_entropy.float()
        lo, hi = h.min(1, keepdim=True).values, h.max(1, keepdim=True).values
        certainty = 1 - (h - lo) / (hi - lo).clamp_min(1e-8)
        w = 1 + (cfg.structure_weight - 1) * certainty
    return w / w.mean(1, keepdim=True)


def ht_stage(cfg: MethodConfig, k: int) -> str:
    if k < cfg.n_global:
        return "global"
    if k < cfg.n_global + cfg.n_struct:
        return "structure"
    return "refinement"


def ht_grpo_views(cfg: MethodConfig, tr: RolloutTrace, k: int, gen: torch.Generator) -> list[View]:
    structure = structure_set(cfg, tr)
    stage = ht_stage(cfg, k)
    candidates = {"global": torch.ones_like(structure), "structure": structure, "refinement": ~structure}[stage]
    picked = candidates & (_rand(structure.shape, gen, structure.device) < cfg.sample_fraction)
    weight = credit_weights(cfg, tr, structure)
    if cfg.estimator == "trajectory":            # each token in the context it was drawn in (step groups)
        return [View(visible=tr.commit_step < start, in_loss=picked & (tr.commit_step >= start) & (tr.commit_step < end),
                     weight=weight, stage=stage) for start, end in trace_groups(tr.steps, cfg.trace_groups)]
    if cfg.estimator == "hierarchical" and stage == "refinement":
        visible = structure                      # paint given the sketch
    else:
        visible = torch.zeros_like(structure)    # from the fully masked state
    return [View(visible=visible, in_loss=picked, weight=weight, stage=stage)]


GRPO = Method("grpo", "uniform credit, random remasking with mask ratio ~ U(min, 1) (UniGRPO-style)", grpo_views,
              options=("mask_ratio", "min_mask_ratio"))
MASKGRPO = Method("maskgrpo", "random masking, rate rising from min_mask_rate to ~1 over the inner loop", maskgrpo_views,
                  options=("min_mask_rate",))
TRACEGRPO = Method("tracegrpo", "replay of the recorded unmasking trajectory, steps grouped into trace_groups passes",
                   tracegrpo_views, options=("trace_groups",))
DIFFU_GRPO = Method("diffu-grpo", "d1: all image codes masked, prompt tokens masked with prompt_mask_prob", diffu_grpo_views,
                    options=("prompt_mask_prob",))
HT_GRPO = Method("ht-grpo", "Sketch Then Paint: structure/refinement partition, hierarchical credit, staged inner loop",
                 ht_grpo_views,
                 options=("partition", "structure_fraction", "estimator", "credit", "structure_weight", "n_global",
                          "n_struct", "sample_fraction", "trace_groups"),
                 needs_masked_entropy=lambda cfg: cfg.partition != "commit_order" or cfg.credit == "soft_entropy",
                 stages=("global", "structure", "refinement"))
