"""Regression check: evaluate a checkpoint on a baseline's suites and fail on any metric that dropped.

Baseline JSON (leaderboards/baselines/*.json):

  {"backbone": "tiny",
   "checkpoint_hash": "...", "provenance": {...},
   "suites": {"shapes-geneval": {"version": "1",
                                 "metrics": {"geneval_overall": {"value": 0.61, "tolerance": 0.05,
                                                                 "higher_is_better": true}, ...}}}}

A metric fails when it moved the bad way by more than its tolerance: below value - tolerance when
higher is better, above value + tolerance when lower is better. A baseline metric the evaluation no
longer reports fails too (the check could not verify it), and so does a suite whose version changed
(numbers of different versions are not comparable: re-baseline with --update). New metrics are listed
and never fail.

Tolerances come from the measured seed-to-seed spread of the baseline checkpoint:
tolerance = max(floor, k * sample std over seeds) (tolerances_from_spread; baseline_from_frame builds a
whole baseline from a store's evaluations with several seeds). --update keeps each metric's tolerance
(a single evaluation has no spread) and gives new metrics the floor.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from harness import provenance as provenance_lib
from harness.io import atomic_write_json
from harness.store import ResultsStore

DEFAULT_FLOOR = 0.02
FAILING = ("DROP", "missing", "invalid", "version")


@dataclass
class CheckRow:
    suite: str
    metric: str
    baseline: float | None
    measured: float | None
    tolerance: float | None
    higher_is_better: bool | None
    status: str          # ok | better | new | DROP | missing | invalid | version
    note: str = ""

    @property
    def delta(self) -> float | None:
        if self.baseline is None or self.measured is None:
            return None
        return self.measured - self.baseline

    @property
    def failed(self) -> bool:
        return self.status in FAILING


# ---- tolerances and baselines ---------------------------------------------------------------------

def tolerances_from_spread(values_by_seed: dict[str, list[float] | dict], k: float = 3.0,
                           floor: float | dict[str, float] = DEFAULT_FLOOR) -> dict[str, float]:
    """{metric: values over seeds (list, or {seed: value})} -> {metric: max(floor, k * sample std)}.

    One seed has no spread and gets the floor. floor is in the metric's own units (0.02 suits 0-1
    metrics; pass a dict to give 0-100 metrics such as dpg_* a larger one)."""
    out = {}
    for metric, values in values_by_seed.items():
        values = list(values.values()) if isinstance(values, dict) else list(values)
        if not values:
            raise ValueError(f"tolerances_from_spread: metric {metric!r} has no values")
        spread = statistics.stdev(values) if len(values) >= 2 else 0.0
        metric_floor = floor.get(metric, DEFAULT_FLOOR) if isinstance(floor, dict) else floor
        out[metric] = max(float(metric_floor), k * spread)
    return out


def baseline_from_frame(frame: pd.DataFrame, checkpoint_hash: str, k: float = 3.0,
                        floor: float | dict[str, float] = DEFAULT_FLOOR) -> dict:
    """A baseline from the store's evaluations of one checkpoint (ResultsStore.latest_metrics()):
    value = mean over evaluation seeds, tolerance from their spread."""
    rows = frame[(frame["checkpoint_hash"] == checkpoint_hash) & (frame["status"] == "complete")]
    if rows.empty:
        raise ValueError(f"no complete evaluations of checkpoint_hash {checkpoint_hash!r} in the store; "
                         "evaluate the checkpoint (several seeds) first")
    backbones = sorted(set(rows["backbone"].dropna()))
    if len(backbones) != 1:
        raise ValueError(f"checkpoint_hash {checkpoint_hash!r} was evaluated as backbones {backbones}; expected one")
    suites = {}
    for suite, part in rows.groupby("suite", sort=True):
        versions = sorted(set(part["suite_version"]))
        if len(versions) != 1:
            raise ValueError(f"suite {suite!r} of {checkpoint_hash!r} has versions {versions}; "
                             "build a baseline from one version")
        values_by_seed = {name: g.groupby("seed")["value"].mean().tolist() for name, g in part.groupby("name")}
        tolerances = tolerances_from_spread(values_by_seed, k=k, floor=floor)
        better = part.groupby("name")["higher_is_better"].first().to_dict()
        suites[suite] = {"version": versions[0], "metrics": {
            name: {"value": sum(v) / len(v), "tolerance": tolerances[name], "higher_is_better": bool(better[name]),
                   "seeds": len(v)}
            for name, v in sorted(values_by_seed.items())}}
    newest = rows.sort_values("evaluation_id").iloc[-1]
    return {"backbone": backbones[0], "checkpoint_hash": checkpoint_hash, "provenance": newest["provenance"],
            "suites": suites}


def load_baseline(path: str | Path) -> dict:
    """Read and validate a baseline file (errors name the file and the key)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"baseline {path} does not exist; build one with baseline_from_frame(...) "
                                "and write_baseline(path, baseline)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"baseline {path} is not valid JSON: {e}") from e
    for key in ("backbone", "suites"):
        if key not in data:
            raise ValueError(f"baseline {path} has no {key!r} key")
    for suite, entry in data["suites"].items():
        if "version" not in entry or "metrics" not in entry:
            raise ValueError(f"baseline {path}: suites.{suite} needs 'version' and 'metrics'")
        for name, m in entry["metrics"].items():
            missing = [f for f in ("value", "tolerance", "higher_is_better") if f not in m]
            if missing:
                raise ValueError(f"baseline {path}: suites.{suite}.metrics.{name} lacks {missing}")
    return data


def write_baseline(path: str | Path, baseline: dict) -> Path:
    return atomic_write_json(path, baseline)


def updated_baseline(baseline: dict, measured: dict[str, dict[str, float]],
                     versions: dict[str, str] | None = None,
                     higher_is_better: dict[str, dict[str, bool]] | None = None,
                     checkpoint_hash: str | None = None, provenance: dict | None = None,
                     floor: float = DEFAULT_FLOOR) -> dict:
    """The baseline with the measured values: tolerances kept, new metrics get the floor, metrics no
    longer measured dropped, suite versions / hash / provenance replaced when given."""
    versions, higher_is_better = versions or {}, higher_is_better or {}
    suites = {}
    for suite, entry in baseline["suites"].items():
        values = measured.get(suite, {})
        old = entry["metrics"]
        metrics = {}
        for name, value in sorted(values.items()):
            if name in old:
                metrics[name] = {**old[name], "value": float(value)}
            else:
                metrics[name] = {"value": float(value), "tolerance": floor,
                                 "higher_is_better": bool(higher_is_better.get(suite, {}).get(name, True))}
        suites[suite] = {**entry, "version": versions.get(suite, entry["version"]), "metrics": metrics}
    out = {**baseline, "suites": suites}
    if checkpoint_hash is not None:
        out["checkpoint_hash"] = checkpoint_hash
    if provenance is not None:
        out["provenance"] = provenance
    return out


# ---- comparison -----------------------------------------------------------------------------------

def compare(baseline: dict, measured: dict[str, dict[str, float]], *, tolerance: float | None = None,
            versions: dict[str, str] | None = None) -> tuple[list[CheckRow], bool]:
    """Compare measured {suite: {metric: value}} with the baseline. Returns (rows, failed).

    tolerance overrides every stored tolerance; versions ({suite: version measured}) flags suites whose
    version differs from the baseline's."""
    rows: list[CheckRow] = []
    for suite, entry in sorted(baseline["suites"].items()):
        got = measured.get(suite, {})
        if versions and suite in versions and str(versions[suite]) != str(entry["version"]):
            rows.append(CheckRow(suite, "(suite version)", None, None, None, None, "version",
                                 f"suite version changed (baseline {entry['version']}, measured {versions[suite]}); the "
                                 "numbers are not comparable: re-baseline with --update"))
        for name, m in sorted(entry["metrics"].items()):
            tol = float(m["tolerance"] if tolerance is None else tolerance)
            base, better = float(m["value"]), bool(m["higher_is_better"])
            if name not in got:
                rows.append(CheckRow(suite, name, base, None, tol, better, "missing", "not reported by the evaluation"))
                continue
            value = float(got[name])
            if not math.isfinite(value):
                rows.append(CheckRow(suite, name, base, value, tol, better, "invalid", "not a finite number"))
                continue
            # Signed change in the good direction: negative beyond the tolerance is a drop.
            gain = value - base if better else base - value
            status = "DROP" if gain < -tol else "better" if gain > tol else "ok"
            rows.append(CheckRow(suite, name, base, value, tol, better, status))
        for name in sorted(set(got) - set(entry["metrics"])):
            rows.append(CheckRow(suite, name, None, float(got[name]), None, None, "new", "not in the baseline"))
    for suite in sorted(set(measured) - set(baseline["suites"])):
        for name in sorted(measured[suite]):
            rows.append(CheckRow(suite, name, None, float(measured[suite][name]), None, None, "new",
                                 "suite not in the baseline"))
    return rows, any(r.failed for r in rows)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def print_rows(rows: list[CheckRow], failed: bool, console=None) -> None:
    """The diff as one rich table per suite, then the notes and a one-line verdict."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:   # CI logs: do not squeeze the table into 80 columns
            console = Console(width=120)
    colours = {"ok": "green", "better": "bold green", "new": "cyan"}
    for suite in dict.fromkeys(r.suite for r in rows):
        table = Table(title=f"{suite}: measured vs baseline", title_justify="left")
        table.add_column("metric", no_wrap=True)
        for column in ("baseline", "measured", "Δ", "tolerance"):
            table.add_column(column, justify="right", no_wrap=True)
        table.add_column("dir", justify="center")
        table.add_column("status", no_wrap=True)
        for r in rows:
            if r.suite != suite or r.status == "version":
                continue
            colour = colours.get(r.status, "bold red")
            direction = "–" if r.higher_is_better is None else "↑" if r.higher_is_better else "↓"
            table.add_row(r.metric, _fmt(r.baseline), _fmt(r.measured), _fmt(r.delta, signed=True), _fmt(r.tolerance),
                          direction, f"[{colour}]{r.status}[/{colour}]")
        console.print(table)
    for r in rows:
        if r.note and r.status != "ok":
            where = r.suite if r.status == "version" else f"{r.suite}/{r.metric}"
            style = "red" if r.failed else "cyan"
            console.print(f"[{style}]{where}[/{style}]: {r.note}", highlight=False)
    if failed:
        counts = {}
        for r in rows:
            if r.failed:
                counts.setdefault(r.status, []).append(r.suite if r.status == "version" else f"{r.suite}/{r.metric}")
        words = {"DROP": "dropped beyond tolerance", "missing": "missing", "invalid": "not finite",
                 "version": "suite version changed"}
        console.print("[bold red]FAIL[/bold red]: " + "; ".join(f"{words[k]}: {', '.join(v)}" for k, v in counts.items()),
                      highlight=False)
    else:
        console.print(f"[bold green]OK[/bold green]: {sum(r.baseline is not None for r in rows)} metric(s) "
                      "within tolerance of the baseline or better", highlight=False)


def rows_as_dicts(rows: list[CheckRow]) -> list[dict]:
    return [{**asdict(r), "delta": r.delta, "failed": r.failed} for r in rows]


# ---- CLI ------------------------------------------------------------------------------------------

def _stored_suite_info(store: ResultsStore, suite: str, checkpoint: str) -> tuple[str | None, dict[str, bool], str | None]:
    """(suite_version, {metric: higher_is_better}, checkpoint_hash) of the newest stored evaluation of this
    checkpoint on this suite, as evaluate() wrote it; (None, {}, None) when the store has none."""
    frame = store.latest_metrics(suite)
    frame = frame[frame["checkpoint"] == str(checkpoint)]
    if frame.empty:
        return None, {}, None
    newest = frame[frame["evaluation_id"] == frame["evaluation_id"].max()]
    first = newest.iloc[0]
    return (str(first["suite_version"]), dict(zip(newest["name"], newest["higher_is_better"].astype(bool))),
            str(first["checkpoint_hash"]))


def cli_check(checkpoint: str | Path, baseline: str | Path, tolerance: float | None = None, update: bool = False,
              *, store: ResultsStore | str | Path | None = None, out_root: str | Path | None = None,
              batch_size: int = 8, progress: bool = True) -> int:
    """Evaluate `checkpoint` on every suite of the baseline and compare. Returns 1 on any drop below
    baseline - tolerance (or a missing metric / changed suite version), else 0. With update, the
    baseline file is rewritten (atomically) with the measured values and 0 is returned."""
    from evaluators.run import evaluate_checkpoints, weights_hash   # lazy: model code only when a check runs
    # out_root None: a run checkpoint draws into its run's eval/ folder (images scored there are not drawn again)

    baseline_path = Path(baseline)
    data = load_baseline(baseline_path)
    results = store if isinstance(store, ResultsStore) else ResultsStore(store)
    try:
        measured, versions, better, stored_hash = {}, {}, {}, None
        suites = sorted(data["suites"])      # registry names or suite files, as the baseline names them
        scores = evaluate_checkpoints(checkpoint, suites, results, backbone=data["backbone"],
                                      out_root=out_root, batch_size=batch_size,
                                      progress_for=(lambda label: True) if progress else None)
        for suite, score in zip(suites, scores):
            measured[suite] = score.metrics
            version, better[suite], stored_hash = _stored_suite_info(results, score.suite, score.checkpoint)
            if version is not None:
                versions[suite] = version
        rows, failed = compare(data, measured, tolerance=tolerance, versions=versions)
        print_rows(rows, failed)
        if update:
            ckpt_hash = stored_hash
            if ckpt_hash is None and Path(checkpoint).exists():
                ckpt_hash = weights_hash(checkpoint)
            new = updated_baseline(data, measured, versions, better, ckpt_hash,
                                   provenance_lib.collect(checkpoint=str(checkpoint)))
            write_baseline(baseline_path, new)
            print(f"baseline updated: {baseline_path}")
            return 0
        return 1 if failed else 0
    finally:
        if not isinstance(store, ResultsStore):
            results.close()
