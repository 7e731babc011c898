"""A trained checkpoint's gain over its base model, with the evaluation's own error bar.

Both are scored on the same prompts with the same per-image seeds (the suite's protocol), so the gain is a paired
difference: for GenEval-style suites (one correct / wrong judgement per image, overall = mean of the tag means)

    gain   = mean over tags t of  mean_i (correct_ckpt[i] - correct_base[i])     over the images i of tag t
    stderr = sqrt( sum_t var_t / n_t ) / T                                        var_t: sample variance of the
                                                                                  differences of tag t

i.e. the standard error of the gain from the sampler's randomness on this prompt set: what a re-run of both
evaluations with other seeds would move by. A gain smaller than about twice it is not a measured improvement.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pandas as pd

from harness.store import ResultsStore
from leaderboards.leaderboard import protocol_id, step_or_none, text_or_none

OVERALL = "geneval_overall"
FULL_RESULT = ("leaderboards/tiny_methods.md: the measured 15-minute HT-GRPO run on the tiny default "
               "(215 steps, 0.555 -> 0.647 ± 0.020 over three seeds)")


@dataclass(frozen=True)
class Gain:
    suite: str
    method: str
    run: str
    step: int
    base: float          # the base model's overall score
    value: float         # the checkpoint's
    gain: float          # value - base, from the paired per-image judgements
    stderr: float        # standard error of the gain (see the module's docstring)
    n_images: int        # images judged in both evaluations

    @property
    def significant(self) -> bool:
        return self.gain > 2 * self.stderr

    def line(self) -> str:
        verdict = ("above the base by more than twice its error bar" if self.significant else
                   "within twice its error bar of the base: not a measured improvement" if self.gain > -2 * self.stderr
                   else "below the base by more than twice its error bar")
        return (f"{self.suite}: {self.method} step {self.step} scores {self.value:.3f} vs the base's {self.base:.3f}: "
                f"gain {self.gain:+.3f} ± {self.stderr:.3f} (paired standard error over {self.n_images} images), "
                f"{verdict}")


def _judgements(store: ResultsStore, evaluation_id: int, evaluator: str) -> dict[str, tuple[str, bool]]:
    """{image key: (tag, correct)} of one evaluation's GenEval-style records."""
    out = {}
    for key, record in store.records_for(evaluation_id, evaluator).items():
        if isinstance(record, str):
            record = json.loads(record)
        if isinstance(record, dict) and "tag" in record and "correct" in record:
            out[key] = (str(record["tag"]), bool(record["correct"]))
    return out


def paired_gain(store: ResultsStore, base_id: int, checkpoint_id: int, evaluator: str) -> tuple[float, float, int]:
    """(gain, stderr, images) of evaluation checkpoint_id over base_id, paired by image key; images = 0 (and NaNs)
    when they share no judged image (records not kept, or another prompt set)."""
    base, ckpt = _judgements(store, base_id, evaluator), _judgements(store, checkpoint_id, evaluator)
    per_tag: dict[str, list[float]] = {}
    for key in sorted(set(base) & set(ckpt)):
        per_tag.setdefault(base[key][0], []).append(float(ckpt[key][1]) - float(base[key][1]))
    if not per_tag:
        return math.nan, math.nan, 0
    gain = sum(sum(d) / len(d) for d in per_tag.values()) / len(per_tag)
    variance = 0.0
    for d in per_tag.values():
        mean = sum(d) / len(d)
        variance += (sum((x - mean) ** 2 for x in d) / (len(d) - 1) if len(d) > 1 else 0.0) / len(d)
    return gain, math.sqrt(variance) / len(per_tag), sum(len(d) for d in per_tag.values())


def gains_over_base(store: ResultsStore, frame: pd.DataFrame | None = None) -> list[Gain]:
    """The gain of every trained checkpoint whose base model was evaluated under the same suite version,
    backbone, eval seed and protocol, for suites reporting geneval_overall with per-image judgements."""
    frame = store.latest_metrics() if frame is None else frame
    rows = frame[frame["name"] == OVERALL] if not frame.empty else frame
    bases, trained = {}, []
    for r in rows.itertuples(index=False):
        key = (r.suite, r.backbone, int(r.seed), protocol_id(r.suite, r.suite_version, r.protocol))
        if text_or_none(r.run) is None and step_or_none(r.step) is None:
            bases.setdefault(key, r)
        elif step_or_none(r.step) is not None:
            trained.append((key, r))
    out = []
    for key, r in trained:
        base = bases.get(key)
        if base is None:
            continue
        gain, stderr, n = paired_gain(store, int(base.evaluation_id), int(r.evaluation_id), r.evaluator)
        if n == 0:
            continue
        out.append(Gain(r.suite, text_or_none(r.method) or "?", text_or_none(r.run) or "", int(r.step),
                        float(base.value), float(r.value), gain, stderr, n))
    return sorted(out, key=lambda g: (g.suite, g.run, g.step))
