"""What an evaluator is: a name, a version, what its numbers mean, and a function.

An evaluator takes samples (image + prompt metadata) and returns per-image records plus
aggregate metrics. It is data plus a function, registered by name in harness.registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from harness.samples import Sample   # noqa: F401  (the one sample type; evaluators take it from here too)


@dataclass
class Metric:
    name: str
    value: float
    scale: str = "0-1"
    higher_is_better: bool = True
    version: str = "1"
    stderr: float | None = None   # standard error of `value` from the images' randomness (None: not defined)
    n: int | None = None          # how many images (or prompts) it is computed over

    def as_dict(self) -> dict:
        return {"name": self.name, "value": float(self.value), "scale": self.scale,
                "higher_is_better": self.higher_is_better, "version": self.version,
                "stderr": None if self.stderr is None else float(self.stderr), "n": self.n}


def mean_and_stderr(values) -> tuple[float, float | None, int]:
    """(mean, standard error of the mean = sample std / sqrt(n), n); the error is None for fewer than 2 values."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_and_stderr: no values")
    se = float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else None
    return float(x.mean()), se, int(x.size)


def mean_of_group_means(groups: dict) -> tuple[float, float | None, int]:
    """GenEval's overall: the unweighted mean over groups (tags) of each group's mean, with its standard error
    sqrt(sum_g se_g^2) / G (groups independent); n = all values. None when a group has fewer than 2 values."""
    stats = [mean_and_stderr(v) for v in groups.values()]
    overall = sum(m for m, _, _ in stats) / len(stats)
    if any(se is None for _, se, _ in stats):
        return overall, None, sum(k for _, _, k in stats)
    return overall, float(np.sqrt(sum(se ** 2 for _, se, _ in stats)) / len(stats)), sum(k for _, _, k in stats)


@dataclass
class EvalResult:
    records: dict[str, dict] = field(default_factory=dict)   # key -> per-image record (JSON-able)
    metrics: list[Metric] = field(default_factory=list)


@dataclass(frozen=True)
class Evaluator:
    name: str
    version: str
    description: str
    score: Callable[[list[Sample]], dict[str, dict]]          # samples -> per-image records
    aggregate: Callable[[list[dict]], list[Metric]]          # records -> metrics
    reward_field: str | None = None                          # record field usable as a scalar reward
    # raises a clear error (e.g. FileNotFoundError naming a weights file) when the evaluator cannot run here;
    # called before any image is drawn, so a missing file is not found after an hour of generation
    check_ready: Callable[[], None] | None = None

    def evaluate(self, samples: list[Sample]) -> EvalResult:
        records = self.score(samples)
        return EvalResult(records=records, metrics=self.aggregate(list(records.values())))
