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

    def as_dict(self) -> dict:
        return {"name": self.name, "value": float(self.value), "scale": self.scale,
                "higher_is_better": self.higher_is_better, "version": self.version}


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
