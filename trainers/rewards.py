"""Rewards: any registered evaluator with a reward field, combined as a weighted sum."""
from __future__ import annotations

import math
import os
import threading

import numpy as np
import torch

from evaluators.base import Sample
from harness import registry


DEFAULT_TIMEOUT_S = 900.0   # one scorer call on one step's images; a hung scorer fails the run after this
DEFAULT_TRIES = 2


def _env_number(key: str, default: float, cast=float):
    raw = os.environ.get(key)
    if raw is None:
        return default
    try:
        return cast(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not a number") from None


def call_with_timeout(fn, timeout_s: float, tries: int, what: str):
    """fn() with at most `tries` attempts of `timeout_s` seconds each (timeout_s <= 0: fn() directly, no limit).

    A scorer that hangs (a stuck worker, a dead remote judge) must not hang the run, nor, under torchrun, the
    other ranks waiting for this rank's rewards. Python cannot kill a thread, so a timed-out attempt is left
    running in a daemon thread and a fresh attempt is made; an error raised by fn is not retried (it is not a
    hang). The grad mode of the caller is carried into the thread (it is thread-local in torch)."""
    if timeout_s <= 0:
        return fn()
    grad = torch.is_grad_enabled()
    for attempt in range(1, tries + 1):
        box: dict = {}

        def run():
            try:
                with torch.set_grad_enabled(grad):
                    box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread
                box["error"] = e

        worker = threading.Thread(target=run, name=f"reward-{what}-{attempt}", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if "error" in box:
            raise box["error"]
        if "value" in box:
            return box["value"]
    raise TimeoutError(f"reward {what!r} gave no scores within {timeout_s:g} s, {tries} tries; stopping (a slow "
                       f"scorer may need a longer limit: HARNESS_REWARD_TIMEOUT_S, HARNESS_REWARD_TRIES)")


def build_reward(weights: dict[str, float], timeout_s: float | None = None, tries: int | None = None):
    """{evaluator name: weight} -> fn(samples) -> np.ndarray of rewards. Fails early on unusable names.
    Each scorer call is bounded by timeout_s seconds and retried up to `tries` times when it hangs (defaults:
    HARNESS_REWARD_TIMEOUT_S or 900 s, HARNESS_REWARD_TRIES or 2; a timeout of 0 turns the limit off)."""
    timeout_s = _env_number("HARNESS_REWARD_TIMEOUT_S", DEFAULT_TIMEOUT_S) if timeout_s is None else timeout_s
    tries = _env_number("HARNESS_REWARD_TRIES", DEFAULT_TRIES, int) if tries is None else tries
    if tries < 1:
        raise ValueError(f"HARNESS_REWARD_TRIES must be at least 1, not {tries}")
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
            records = call_with_timeout(lambda: ev.score(samples), timeout_s, tries, name)
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
