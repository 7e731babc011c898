"""Rewards: any registered evaluator with a reward field, combined as a weighted sum."""
from __future__ import annotations

import math

import numpy as np

from evaluators.base import Sample
from harness import registry


def build_reward(weights: dict[str, float]):
    """{evaluator name: weight} -> fn(samples) -> np.ndarray of rewards. Fails early on unusable names."""
    if not weights:
        raise ValueError("reward must name at least one evaluator, e.g. {shapes-geneval: 1.0}")
    evaluators = []
    for name, w in weights.items():
        ev = registry.get("evaluators", name)
        if ev.reward_field is None:
            raise ValueError(f"evaluator {name!r} has no reward field and cannot be used as a reward")
        evaluators.append((name, float(w), ev))

    def reward(samples: list[Sample]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        total = np.zeros(len(samples))
        parts = {}
        for name, w, ev in evaluators:
            records = ev.score(samples)
            values = []
            for s in samples:
                rec = records.get(s.key)
                if rec is None or ev.reward_field not in rec:
                    raise RuntimeError(f"reward {name!r} returned no {ev.reward_field!r} for sample {s.key} "
                                       f"(prompt {s.metadata.get('prompt')!r}); stopping")
                v = float(rec[ev.reward_field])
                if math.isnan(v) or math.isinf(v):
                    raise RuntimeError(f"reward {name!r} is {v} for sample {s.key} (prompt {s.metadata.get('prompt')!r}); "
                                       "stopping rather than training on it")
                values.append(v)
            parts[name] = np.array(values)
            total += w * parts[name]
        return total, parts

    return reward


def group_advantages(rewards, group_size: int, eps: float = 1e-4):
    """A_g = (r_g - mean) / (std + eps) within each group of G consecutive rollouts (population std).

    Returns (advantages, zero-spread mask per group)."""
    import torch
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    mean, std = r.mean(1, keepdim=True), r.std(1, unbiased=False, keepdim=True)
    adv = (r - mean) / (std + eps)
    zero = std.squeeze(1) < 1e-8
    adv[zero] = 0.0
    return adv.view(-1), zero
