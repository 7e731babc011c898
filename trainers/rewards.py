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
        if ev.check_ready is not None:
            ev.check_ready()                 # missing model files fail now, not at the first step's scoring
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


def object_credit(samples: list[Sample], adv, focus: float, token_grid: tuple[int, int]):
    """[B, N] token credit weights that move blame within each image onto its objects (shapes world only).

    With a strict per-image reward every token of a failed image is pushed down as hard as any other, its
    well-drawn objects included. Here each detection is countable or not by the judge
    (evaluators.shapes_suites.object_roles). In an image with A < 0, uncountable objects' cells (fragments,
    misfits, unrequested classes, wrong colours) weigh `focus` and countable ones 1 / focus; in an image with
    A > 0, uncountable objects weigh 1 / focus (junk is never reinforced at full weight). Everything else weighs
    1, background included. A token weighs the mean of its cells. focus = 1 is uniform credit.

    Measured harmful at focus 3 (leaderboards/tiny_methods.md): this rule breaks the zero sum of a group's
    advantages and collapsed two runs of two; an earlier rule that renormalised each image to mean weight 1
    moved blame onto the background of failed images, and stray cells rose."""
    import torch
    from evaluators.shapes_suites import object_roles
    from harness.shapes.detect import detect_image
    from harness.shapes.prompts import GENEVAL_TAGS
    from harness.shapes.world import GRID
    h, w = token_grid
    if GRID % h or GRID % w:
        raise ValueError(f"object credit needs a token grid dividing the {GRID}x{GRID} shapes grid, got {h}x{w}")
    adv = torch.as_tensor(adv, dtype=torch.float32).cpu()
    out = torch.ones(len(samples), h * w)
    for b, s in enumerate(samples):
        if adv[b] == 0:
            continue
        if s.metadata.get("tag") not in GENEVAL_TAGS:
            raise ValueError(f"object credit reads GenEval clauses; sample {s.key} has tag {s.metadata.get('tag')!r} "
                             f"(known: {', '.join(GENEVAL_TAGS)}); set loss.object_credit: 0 for other prompts")
        dets = detect_image(np.asarray(s.image))
        cell_w = np.ones((GRID, GRID))
        for d, countable in zip(dets, object_roles(s.metadata, dets)):
            if adv[b] < 0:
                cell_w[d["mask"]] = 1.0 / focus if countable else focus
            elif not countable:
                cell_w[d["mask"]] = 1.0 / focus
        out[b] = torch.from_numpy(cell_w.reshape(h, GRID // h, w, GRID // w).mean(axis=(1, 3)).reshape(-1)).float()
    return out
