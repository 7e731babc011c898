"""Leaderboard tables from the results store: GenEval, DPG-Bench, quality, and the shapes suites.

Rows. One row per (table, suite@version + protocol, backbone, method, checkpoint), where the
checkpoint is "step N" for a training checkpoint and the checkpoint name otherwise (base models).
Rows under different protocols (suite version or any protocol field) are different rows, and the
Protocol column spells out suite@version, sampler steps, CFG, resolution and images per prompt plus a
short hash of the full protocol, so two rows never look comparable when they are not; the
"protocols" table maps each hash to its full JSON.

Seeds. The seed in "mean ± std" is the TRAINING seed: runs of one method that differ only in their
seed share a row. It is read from provenance["train_seed"] (or provenance["training_seed"]),
else from the run folder's config.yaml if the folder is there (never from the folder's name).
A checkpoint whose training seed cannot be found counts as its own replicate
(keyed by checkpoint_hash). Evaluations of one checkpoint with several evaluation seeds are one
model: they are averaged first, then mean and sample std (ddof=1) are taken over training seeds.
The n column counts training-seed replicates; "± std" is shown only where n >= 2.

Reported rows. The paper's published rows (leaderboards/paper_rows.py) are appended to the GenEval,
DPG-Bench and quality tables with Source "reported (Tab. k)"; they are never averaged with
measured rows, and their protocol is the paper's own.

Ordering (stable): measured rows by backbone, method ("base" first, then alphabetical), step
(checkpoints without a step first), checkpoint name, protocol; then reported rows in the paper's order.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from leaderboards.paper_rows import DPG_METRICS, GENEVAL_METRICS, PAPER, QUALITY_METRICS, reported_rows

MISSING = "–"  # an empty cell


@dataclass(frozen=True)
class TableSpec:
    key: str
    title: str
    columns: tuple[tuple[str, str], ...]  # (metric name, header); empty = every metric present, in `preferred` order
    decimals: int
    preferred: tuple[str, ...] = ()
    note: str = ""


GENEVAL_COLUMNS = tuple(zip(GENEVAL_METRICS, ("Single Obj.", "Two Obj.", "Counting", "Colors", "Position",
                                              "Color Attri.", "Overall")))
DPG_COLUMNS = tuple(zip(DPG_METRICS, ("Global", "Entity", "Attribute", "Relation", "Other", "Overall")))
SHAPES_QUALITY_METRICS = ("stray_cell_fraction", "shape_fidelity", "background_cleanliness", "position_spread",
                          "size_spread", "free_color_entropy", "diversity_prompts")
QUALITY_HEADERS = {"deqa": "DeQA", "imagereward": "ImgReward", "hpsv3": "HPSv3",
                   "unipercept_aesthetics": "UniPercept Aes.", "unipercept_quality": "UniPercept Qual.",
                   "unipercept_structure": "UniPercept Struct.", "hpsv21": "HPSv2.1", "pickscore": "PickScore",
                   "clipscore": "CLIPScore (torchmetrics)", "clipscore_eot": "CLIPScore (EOT kept)",
                   "clipscore_hessel": "CLIPScore (Hessel)", "laion_aesthetic": "LAION Aes."}
PREFERENCE_METRICS = ("hpsv21", "pickscore", "clipscore", "laion_aesthetic")

TABLES = (
    TableSpec("geneval", "GenEval", GENEVAL_COLUMNS, 2, note="accuracy 0-1; overall = mean of the six tags"),
    TableSpec("dpg", "DPG-Bench", DPG_COLUMNS, 2, note="0-100, per L1 category; per-category DPG numbers published from multi-process runs of the "
              "official ELLA script are scrambled (hash-seed set order), so compare those at Overall only unless "
              "they ran with PYTHONHASHSEED=0 (docs/benchmarks.md)"),
    TableSpec("quality", "Quality / preference", (), 2, preferred=QUALITY_METRICS,
              note="the paper computes these on DPG-Bench images"),
    TableSpec("preference", "Preference extras", (), 2, preferred=PREFERENCE_METRICS,
              note="on DPG-Bench images, each tile scored alone; HPSv2.1 and CLIPScore are 100 x cos"),
    TableSpec("shapes-geneval", "Shapes GenEval", GENEVAL_COLUMNS, 2, note="exact detector, official GenEval rules"),
    TableSpec("shapes-dpg", "Shapes DPG", DPG_COLUMNS, 2, note="0-100; shapes prompts have no 'global' questions"),
    TableSpec("shapes-quality", "Shapes quality (reward-hacking watch)", (), 3, preferred=SHAPES_QUALITY_METRICS),
)
SPECS = {t.key: t for t in TABLES}
REPORTED_TABLES = ("geneval", "dpg", "quality")   # tables that get the paper's rows
ID_COLUMNS = ("Source", "Backbone", "Method", "Checkpoint", "n", "Seeds")   # then the metrics, then "Protocol"
TEXT_COLUMNS = ("Source", "Backbone", "Method", "Checkpoint", "Seeds", "Protocol", "Suite", "Full protocol")



# ---- row identity ---------------------------------------------------------------------------------

def table_key(suite: str, provenance: dict | None = None) -> str:
    """Which table a suite's metrics go to: the `leaderboard` its declaration names, as the evaluation recorded
    it (or, for evaluations stored before suites declared it, the registered suite's declaration); a suite that
    names none gets a table of its own."""
    declared = (provenance or {}).get("leaderboard")
    if declared:
        return str(declared)
    from evaluators.suites import load_suite
    from harness import registry
    if suite in registry.names("suites"):
        return load_suite(suite).leaderboard or suite
    return suite


def training_seed(run: str | None, provenance: dict | None) -> int | None:
    """The training seed: provenance["train_seed"] / ["training_seed"] (evaluations record it from the run's
    config), else the config of the run folder if it is still there (harness.runs reads it); never the folder's
    name, which says what its author typed, not what the run used."""
    provenance = provenance or {}
    for key in ("train_seed", "training_seed"):
        if provenance.get(key) is not None:
            return int(provenance[key])
    if run:
        from harness.runs import RunDir
        try:
            return RunDir(run).train_seed()
        except (OSError, ValueError):
            return None
    return None


def _lookup(protocol: dict, *keys: str):
    """First of `keys` in the protocol, or in its nested "sampler" dict."""
    places = [protocol] + [protocol[k] for k in ("sampler", "sampling") if isinstance(protocol.get(k), dict)]
    for place in places:
        for key in keys:
            if place.get(key) is not None:
                return place[key]
    return None


def _number(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def protocol_id(suite: str, suite_version: str, protocol: dict) -> str:
    """Short hash of suite@version and the full protocol: equal ids = same evaluation protocol."""
    text = json.dumps({"suite": suite, "version": suite_version, "protocol": protocol}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def protocol_label(suite: str, suite_version: str, protocol: dict) -> str:
    """'suite@v, 16 steps, cfg 2, 256px, 4 img/prompt #1a2b3c' ('?' for a setting the protocol lacks)."""
    steps = _lookup(protocol, "steps", "sampler_steps", "num_steps", "num_inference_steps")
    cfg = _lookup(protocol, "cfg", "cfg_scale", "guidance", "guidance_scale")
    resolution = _lookup(protocol, "resolution", "image_size")
    if resolution is None and _lookup(protocol, "height") is not None:
        resolution = f"{_number(_lookup(protocol, 'height'))}x{_number(_lookup(protocol, 'width'))}"
    per_prompt = _lookup(protocol, "images_per_prompt", "n_samples", "num_images_per_prompt", "n_images")
    parts = [f"{suite}@{suite_version}",
             f"{'?' if steps is None else _number(steps)} steps",
             f"cfg {'?' if cfg is None else _number(cfg)}",
             f"{'?' if resolution is None else _number(resolution)}px",
             f"{'?' if per_prompt is None else _number(per_prompt)} img/prompt"]
    partial = protocol.get("partial")
    if isinstance(partial, dict):   # `harness eval --images DIR --allow-partial`: not a benchmark score
        parts.insert(0, f"PARTIAL {partial.get('prompts_scored', '?')}/{partial.get('prompts_total', '?')} prompts")
    return ", ".join(parts) + f" #{protocol_id(suite, suite_version, protocol)}"


def text_or_none(value) -> str | None:
    """A text cell of the metrics frame, None for None / NaN / "" (pandas turns None into NaN in mixed columns)."""
    return value if isinstance(value, str) and value else None


def step_or_none(value) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def checkpoint_label(step, checkpoint: str | None) -> str:
    step = step_or_none(step)
    if step is not None:
        return f"step {step}"
    text = text_or_none(checkpoint)
    if text is None:
        return "?"
    # local paths are long; their last component names them. Hub ids ("org/name") stay whole.
    return Path(text).name if text.startswith(("/", ".", "~")) else text


# ---- aggregation ----------------------------------------------------------------------------------

ROW_KEY = ["table", "protocol_id", "protocol", "backbone", "method", "step_order", "checkpoint_label"]
SUMMARY_COLUMNS = ROW_KEY + ["name", "mean", "std", "n", "higher_is_better", "seeds", "stderr"]


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Numeric long form behind the tables: one row per (table row, metric) with mean, std (ddof=1,
    NaN when n < 2), n (training-seed replicates) and seeds (sorted training seeds found)."""
    if "status" in frame.columns:
        frame = frame[frame["status"] == "complete"]
    if frame.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    rows = []
    for r in frame.itertuples(index=False):
        seed = training_seed(text_or_none(r.run), r.provenance)
        step = step_or_none(r.step)
        rows.append({
            "table": table_key(r.suite, r.provenance),
            "protocol_id": protocol_id(r.suite, r.suite_version, r.protocol),
            "protocol": protocol_label(r.suite, r.suite_version, r.protocol),
            "backbone": text_or_none(r.backbone) or "?",
            "method": text_or_none(r.method) or "base",
            "step_order": -1 if step is None else step,
            "checkpoint_label": checkpoint_label(step, r.checkpoint),
            "replicate": f"seed:{seed}" if seed is not None else f"ckpt:{r.checkpoint_hash}",
            "seed": seed,
            "name": r.name, "value": float(r.value), "higher_is_better": bool(r.higher_is_better),
            "stderr": _finite_or_nan(getattr(r, "stderr", None)),
        })
    long = pd.DataFrame(rows)
    # One trained model = one replicate: average its evaluation seeds first.
    per_model = (long.groupby(ROW_KEY + ["replicate", "name"], sort=False)
                 .agg(value=("value", "mean"), higher_is_better=("higher_is_better", "first"), seed=("seed", "first"),
                      # the mean of k evaluation seeds' values: its error is sqrt(sum se^2) / k (NaN if one is unknown)
                      stderr=("stderr", lambda se: math.sqrt(float((se ** 2).sum(skipna=False))) / len(se)))
                 .reset_index())
    out = []
    for key, group in per_model.groupby(ROW_KEY + ["name"], sort=False):
        values = group["value"].tolist()
        seeds = sorted(int(s) for s in group["seed"].dropna().unique())
        out.append({**dict(zip(ROW_KEY + ["name"], key)),
                    "mean": sum(values) / len(values),
                    "std": float(pd.Series(values).std(ddof=1)) if len(values) >= 2 else math.nan,
                    "n": len(values), "higher_is_better": bool(group["higher_is_better"].iloc[0]),
                    "seeds": ", ".join(str(s) for s in seeds),
                    # one replicate: the evaluation's own standard error is the error bar there is
                    "stderr": float(group["stderr"].iloc[0]) if len(values) == 1 else math.nan})
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


def _finite_or_nan(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def format_cell(mean: float, std: float, decimals: int, stderr: float = math.nan) -> str:
    """"mean ± std" over training seeds; with one seed, "mean (s.e. x)" where the evaluation gives its error."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return MISSING
    text = f"{mean:.{decimals}f}"
    if std is not None and not math.isnan(std):
        text += f" ± {std:.{decimals}f}"
    elif stderr is not None and not math.isnan(stderr):
        text += f" (s.e. {stderr:.{decimals}f})"
    return text


def _columns_for(spec: TableSpec, summary: pd.DataFrame, reported: list) -> list[tuple[str, str]]:
    if spec.columns:
        return list(spec.columns)
    names = set(summary["name"]) | {m for r in reported for m in r.values}
    ordered = [m for m in spec.preferred if m in names] + sorted(names - set(spec.preferred))
    better = dict(zip(summary["name"], summary["higher_is_better"]))
    return [(m, f"{QUALITY_HEADERS.get(m, m)} {'↑' if better.get(m, True) else '↓'}") for m in ordered]


def _method_order(method: str) -> tuple[int, str]:
    return (0 if method == "base" else 1, method)


def _natural(text: str) -> list:
    """Sort key that orders numbers inside text by value ("64px" before "128px")."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def _build_table(spec: TableSpec, summary: pd.DataFrame, include_reported: bool) -> pd.DataFrame | None:
    reported = reported_rows(spec.key) if include_reported else []
    if summary.empty and not reported:
        return None
    columns = _columns_for(spec, summary, reported)
    groups = [(dict(zip(ROW_KEY, key)), cells) for key, cells in summary.groupby(ROW_KEY, sort=False)] \
        if not summary.empty else []
    groups.sort(key=lambda g: (g[0]["backbone"], _method_order(g[0]["method"]), g[0]["step_order"],
                               g[0]["checkpoint_label"], _natural(g[0]["protocol"])))
    rows = []
    for key, cells in groups:
        by_name = {r.name: r for r in cells.itertuples(index=False)}
        seeds = sorted({s for v in cells["seeds"] if v for s in v.split(", ")}, key=int)
        row = {"Source": "measured", "Backbone": key["backbone"], "Method": key["method"],
               "Checkpoint": key["checkpoint_label"], "n": str(int(cells["n"].max())),
               "Seeds": ", ".join(seeds) or MISSING, "Protocol": key["protocol"]}
        for metric, header in columns:
            r = by_name.get(metric)
            row[header] = MISSING if r is None else format_cell(r.mean, r.std, spec.decimals, r.stderr)
        rows.append(row)
    for r in reported:
        row = {"Source": f"reported ({r.source})", "Backbone": r.backbone, "Method": r.method, "Checkpoint": "paper",
               "n": MISSING, "Seeds": MISSING, "Protocol": "paper's own (not recorded)"}
        for metric, header in columns:
            row[header] = format_cell(r.values[metric], math.nan, spec.decimals) if metric in r.values else MISSING
        rows.append(row)
    return pd.DataFrame(rows, columns=list(ID_COLUMNS) + [h for _, h in columns] + ["Protocol"])


def _protocol_table(frame: pd.DataFrame) -> pd.DataFrame:
    seen: dict[str, dict] = {}
    for r in frame.itertuples(index=False):
        pid = protocol_id(r.suite, r.suite_version, r.protocol)
        seen.setdefault(pid, {"Protocol": f"#{pid}", "Suite": f"{r.suite}@{r.suite_version}",
                              "Full protocol": json.dumps(r.protocol, sort_keys=True, default=str)})
    return pd.DataFrame(sorted(seen.values(), key=lambda d: (d["Suite"], d["Protocol"])),
                        columns=["Protocol", "Suite", "Full protocol"])


def build_tables(frame: pd.DataFrame, include_reported: bool = True) -> dict[str, pd.DataFrame]:
    """Display tables (string cells) from a metrics frame (ResultsStore.latest_metrics()).

    Keys in order: tables with measured rows (geneval, dpg, quality, shapes-geneval, shapes-dpg,
    shapes-quality, then other suites by name), then the tables holding only the paper's reported rows
    (geneval, dpg, quality always exist when include_reported), then "protocols" (hash -> full protocol
    JSON of every measured row)."""
    if "status" in frame.columns:
        frame = frame[frame["status"] == "complete"]
    summary = summarize(frame)
    present = list(dict.fromkeys(summary["table"])) if not summary.empty else []
    keys = [t.key for t in TABLES] + sorted(k for k in present if k not in SPECS)
    measured, reported_only = {}, {}
    for key in keys:
        spec = SPECS.get(key) or TableSpec(key, key, (), 3)
        part = summary[summary["table"] == key] if not summary.empty else summary
        table = _build_table(spec, part, include_reported and key in REPORTED_TABLES)
        if table is not None:
            (measured if key in present else reported_only)[key] = table
    tables = {**measured, **reported_only}
    if not frame.empty:
        tables["protocols"] = _protocol_table(frame)
    return tables


# ---- rendering ------------------------------------------------------------------------------------

# markdown's active punctuation; "_" only where it could open or close emphasis (not inside a word: GFM)
_MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]|~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")


def _escape(text: str) -> str:
    """A cell's text as literal text in markdown: HTML (&, <, >) as entities, markdown's punctuation
    backslash-escaped, one line. Names come from folders and files anyone may have named."""
    text = " ".join(str(text).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def markdown_table(table: pd.DataFrame) -> str:
    headers = [str(c) for c in table.columns]
    numeric = [c not in TEXT_COLUMNS for c in headers]
    lines = ["| " + " | ".join(_escape(h) for h in headers) + " |",
             "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(_escape(v) for v in row) + " |")
    return "\n".join(lines)


def table_title(key: str) -> str:
    if key == "protocols":
        return "Protocols"
    return SPECS[key].title if key in SPECS else key


def render_markdown(tables: dict[str, pd.DataFrame], title: str = "Leaderboard") -> str:
    """Markdown document: one section per table, then the protocol legend."""
    parts = [f"# {title}", "",
             "Cells are mean ± sample std over training seeds (n); with one seed, (s.e. x) is the evaluation's own "
             "standard error (from its images' randomness); rows with Source \"reported\" are the "
             f"published numbers of {PAPER}, under the paper's own protocol, for reference only. "
             "Compare rows only when their Protocol (suite@version, steps, CFG, resolution, images per prompt, "
             "#hash of the full protocol) is identical.", ""]
    for key, table in tables.items():
        parts.append(f"## {table_title(key)}")
        note = SPECS[key].note if key in SPECS else ""
        if note:
            parts.append("")
            parts.append(f"_{note}_")
        parts += ["", markdown_table(table), ""]
    return "\n".join(parts)
