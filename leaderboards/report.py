"""One self-contained HTML report: leaderboard tables, training curves and image grids.

Everything is inline (CSS, and figures as base64 PNG), so the file can be mailed or attached to CI.

- Tables: leaderboard.build_tables, with the paper's "reported" rows greyed out.
- Training curves: each run in the store's `run` column is a run directory; its metrics.jsonl lines
  ({"step", "reward_mean", "reward_std", "zero_spread_frac", "kl", "clip_frac", "ratio_mean", "loss",
  "eval/<suite>/<metric>"}) are plotted in one figure, one panel per key present, every run overlaid
  (colour = method). Missing keys are skipped. A relative run path is tried from the working
  directory, then from the store's folder.
- Image grids (HTML tables of base64 PNG thumbnails): for each (suite, backbone, method, run, eval seed,
  protocol), the same prompts and image indices (same key "<prompt>/<image>", so same prompt and seed)
  across its checkpoints, the base model first when it was evaluated the same way.
  An image is found from its record's "path" / "image_path" / "filename" (absolute, or relative to
  the evaluation's output folder), else in the GenEval layout <root>/<prompt:05d>/samples/<image:04d>.png,
  or at <root>/<key> when the key is a relative image path (what `harness eval` stores), where root is
  provenance["images"] (or "out_dir", "output_dir", "out_root", "images_dir"). Missing images
  leave a note instead of a grid.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import matplotlib
import matplotlib.image as mpimg
import pandas as pd
# Figure objects, not pyplot: they render with the Agg canvas, need no display, and leave the process's
# global matplotlib backend alone.
from matplotlib.figure import Figure

from harness.io import read_jsonl
from harness.runs import RunDir
from leaderboards.gain import FULL_RESULT, Gain, gains_over_base
from harness.store import ResultsStore
from leaderboards.leaderboard import (PAPER, SPECS, TEXT_COLUMNS, build_tables, checkpoint_label, protocol_id,
                                      protocol_label, step_or_none, table_title, text_or_none)

CURVE_KEYS = ("reward_mean", "zero_spread_frac", "kl", "clip_frac", "ratio_mean", "loss")
ROOT_KEYS = ("images", "out_dir", "output_dir", "out_root", "images_dir")   # "images": what `harness eval` records
PATH_KEYS = ("path", "image_path", "filename")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
GENEVAL_KEY = re.compile(r"^(\d+)/(\d+)$")

CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; margin: 24px; color: #1d1d1f; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { margin-bottom: 6px; }
.meta, .note { color: #555; font-size: 13px; }
.scroll { overflow-x: auto; margin: 8px 0 16px 0; }
table { border-collapse: collapse; font-size: 12.5px; }
th, td { border: 1px solid #d0d0d0; padding: 4px 8px; white-space: nowrap; }
th { background: #f2f2f2; white-space: normal; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.protocol { font-family: monospace; font-size: 11px; white-space: normal; min-width: 240px; max-width: 340px; }
tr.reported td { background: #fafafa; color: #777; font-style: italic; }
tr.measured:hover td { background: #eef5ff; }
img.figure { max-width: 100%; border: 1px solid #eee; }
.badge { border: 1px solid; border-radius: 4px; padding: 0 4px; color: #222; }
.toc a { margin-right: 4px; }
details { margin: 12px 0; } summary { cursor: pointer; color: #444; }
table.grid td { vertical-align: middle; text-align: center; }
table.grid td.prompt { text-align: left; white-space: normal; max-width: 220px; font-size: 13px; }
.key { color: #888; font-family: monospace; font-size: 11px; }
img.thumb { width: 160px; height: 160px; object-fit: contain; image-rendering: pixelated; border: 1px solid #ccc; }
"""


# ---- figures ----------------------------------------------------------------------------------------

def png_base64(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img_tag(b64: str, alt: str, css: str = "figure") -> str:
    return f'<img class="{css}" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _series(lines: list[dict], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for line in lines:
        step, value = line.get("step"), line.get(key)
        if isinstance(step, (int, float)) and isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(step)
            values.append(float(value))
    return steps, values


def _smooth(values: list[float]) -> list[float]:
    """Centred moving average over ~4% of the points (noisy per-step metrics are unreadable raw)."""
    window = max(1, len(values) // 25)
    return pd.Series(values).rolling(window, min_periods=1, center=True).mean().tolist()


def training_curves_png(runs: dict[str, list[dict]], methods: dict[str, str] | None = None) -> str | None:
    """base64 PNG: one panel per metrics.jsonl key present in any run, every run overlaid (colour =
    method, line style = run within the method). None when there is nothing to plot."""
    methods = methods or {}
    eval_keys = sorted({k for lines in runs.values() for line in lines for k in line if k.startswith("eval/")})
    keys = [k for k in (*CURVE_KEYS, *eval_keys) if any(_series(lines, k)[0] for lines in runs.values())]
    if not keys:
        return None
    method_names = sorted(set(methods.get(run, run) for run in runs))
    colours = {m: matplotlib.colormaps["tab10"](i % 10) for i, m in enumerate(method_names)}
    styles: dict[str, str] = {}
    for run in sorted(runs):
        same = [r for r in styles if methods.get(r, r) == methods.get(run, run)]
        styles[run] = ("-", "--", ":", "-.")[len(same) % 4]
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(4.4 * ncols, 2.9 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for run in sorted(runs):
            steps, values = _series(runs[run], key)
            if not steps:
                continue
            colour = colours[methods.get(run, run)]
            if key.startswith("eval/"):   # only checkpoint steps have these
                ax.plot(steps, values, marker="o", markersize=4, color=colour, linestyle=styles[run], label=run)
                continue
            if len(values) > 25:
                ax.plot(steps, values, color=colour, alpha=0.18, linewidth=0.7)
                values = _smooth(values)
            ax.plot(steps, values, color=colour, linestyle=styles[run], linewidth=1.4, label=run)
            if key == "reward_mean":
                std_at = dict(zip(*_series(runs[run], "reward_std")))
                band = [(st, v, std_at[st]) for st, v in zip(steps, values) if st in std_at]
                if band:
                    ax.fill_between([b[0] for b in band], [b[1] - b[2] for b in band], [b[1] + b[2] for b in band],
                                    color=colour, alpha=0.08, linewidth=0)
        ax.set_title(key + (" (± reward_std)" if key == "reward_mean" else ""), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.9 * nrows)))
    fig.legend(handles, labels, loc="upper center", ncol=min(4, len(labels)), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    return png_base64(fig)


def thumbnail_png(path: Path, max_side: int = 256) -> str:
    """base64 PNG of an image file, shrunk by an integer stride to at most max_side pixels."""
    image = mpimg.imread(path)
    stride = max(1, math.ceil(max(image.shape[:2]) / max_side))
    buffer = io.BytesIO()
    mpimg.imsave(buffer, image[::stride, ::stride], format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---- finding runs and images --------------------------------------------------------------------------

def resolve_run_dir(run: str, store_dir: Path) -> RunDir | None:
    """The run folder of a stored run path: as stored, or relative to the store's folder."""
    for candidate in (RunDir(run), RunDir(store_dir / run)):
        if candidate.metrics_path.is_file():
            return candidate
    return None


def image_root(provenance: dict) -> Path | None:
    for key in ROOT_KEYS:
        if provenance.get(key):
            return Path(str(provenance[key]))
    return None


def find_image(key: str, record: dict, root: Path | None) -> Path | None:
    """Where the image of one record is on disk, or None."""
    for field in PATH_KEYS:
        value = record.get(field)
        if isinstance(value, str) and value.lower().endswith(IMAGE_SUFFIXES):
            path = Path(value)
            for candidate in ([path] if path.is_absolute() else [root / path] if root else []) + [path]:
                if candidate.is_file():
                    return candidate
    if root is not None and key.lower().endswith(IMAGE_SUFFIXES) and (root / key).is_file():
        return root / key      # GenEval layout: the record key is the image's path in the folder
    match = GENEVAL_KEY.match(key)
    if root is not None and match:
        candidate = root / f"{int(match.group(1)):05d}" / "samples" / f"{int(match.group(2)):04d}.png"
        if candidate.is_file():
            return candidate
    return None


def _prompt_text(record: dict) -> str:
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    metadata = record.get("metadata")
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except ValueError:
            metadata = None
    return metadata.get("prompt", "") if isinstance(metadata, dict) else ""


def evaluation_images(store: ResultsStore, evaluation_id: int, evaluators: list[str],
                      provenance: dict) -> dict[str, tuple[Path, str]]:
    """{record key: (image path, prompt text)} of the images of one evaluation that exist on disk."""
    root = image_root(provenance)
    found: dict[str, tuple[Path, str]] = {}
    for evaluator in evaluators:
        for key, record in store.records_for(evaluation_id, evaluator).items():
            if key in found or not isinstance(record, dict):
                continue
            path = find_image(key, record, root)
            if path is not None:
                found[key] = (path, _prompt_text(record))
    return found


def _spread(items: list, limit: int) -> list:
    """At most `limit` items, evenly spaced, first and last kept."""
    if len(items) <= limit:
        return items
    picks = sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})
    return [items[i] for i in picks]


@dataclass
class ImageGrid:
    title: str
    columns: list[str]                        # checkpoint labels
    rows: list[tuple[str, str, list[Path]]]   # (prompt, key, one image per column)


def image_grids(store: ResultsStore, frame: pd.DataFrame, max_prompts: int = 4,
                max_checkpoints: int = 6) -> tuple[list[ImageGrid], list[str]]:
    """(grids, titles of groups without images on disk). A group is one (suite, backbone, method, run,
    eval seed, protocol) across its checkpoints; the base model evaluated under the same suite, backbone,
    eval seed and protocol is its first column. Grids showing exactly the same files as an earlier one
    (several suites scoring the same images) are left out."""
    if frame.empty:
        return [], []
    evaluations = frame.drop_duplicates("evaluation_id")
    evaluators = frame.groupby("evaluation_id")["evaluator"].unique().to_dict()
    groups: dict[tuple, list] = {}
    bases: dict[tuple, list] = {}
    for r in evaluations.itertuples(index=False):
        pid = protocol_id(r.suite, r.suite_version, r.protocol)
        backbone, run = text_or_none(r.backbone) or "?", text_or_none(r.run)
        if run is None and step_or_none(r.step) is None:
            bases.setdefault((r.suite, backbone, int(r.seed), pid), []).append(r)
        else:
            groups.setdefault((r.suite, backbone, text_or_none(r.method) or "base", run or "", int(r.seed), pid),
                              []).append(r)
    used_bases = set()
    for key in list(groups):
        base_key = (key[0], key[1], key[4], key[5])
        if base_key in bases:
            used_bases.add(base_key)
    for base_key, members in bases.items():
        if base_key not in used_bases:
            groups[(base_key[0], base_key[1], "base", "", base_key[2], base_key[3])] = []
    grids, missing, shown = [], [], set()
    for key in sorted(groups):
        suite, backbone, method, run, seed, pid = key
        members = sorted(groups[key], key=lambda r: (-1 if step_or_none(r.step) is None else int(r.step),
                                                     text_or_none(r.checkpoint) or ""))
        base = bases.get((suite, backbone, seed, pid), [])
        members = base[:1] + _spread(members, max_checkpoints - 1) if members else _spread(base, max_checkpoints)
        first = members[0]
        title = " · ".join([suite, backbone, method, run or "base model", f"eval seed {seed}",
                            protocol_label(first.suite, first.suite_version, first.protocol)])
        images = [evaluation_images(store, int(r.evaluation_id), list(evaluators[r.evaluation_id]), r.provenance)
                  for r in members]
        shared = sorted(set.intersection(*(set(found) for found in images)))
        picked, prompts_seen = [], set()
        for k in shared:   # one image per prompt, the same image index in every checkpoint
            if k.split("/")[0] not in prompts_seen:
                prompts_seen.add(k.split("/")[0])
                picked.append(k)
            if len(picked) == max_prompts:
                break
        if not picked:
            missing.append(title)
            continue
        rows = [(images[0][k][1] or k, k, [found[k][0] for found in images]) for k in picked]
        files = tuple(p for _, _, paths in rows for p in paths)
        if files in shown:
            continue
        shown.add(files)
        columns = [("base: " if text_or_none(r.run) is None and step_or_none(r.step) is None else "")
                   + checkpoint_label(r.step, r.checkpoint) for r in members]
        grids.append(ImageGrid(title, columns, rows))
    return grids, missing


# ---- HTML -------------------------------------------------------------------------------------------

def protocol_badge(label: str) -> str:
    """The protocol text with its #hash as a coloured badge: rows under different protocols look different."""
    text, _, pid = label.rpartition(" #")
    if not pid or not re.fullmatch(r"[0-9a-f]{6}", pid):
        return html.escape(label)
    hue = int(pid, 16) % 360
    return (f'{html.escape(text)} <span class="badge" style="background: hsl({hue}, 65%, 85%); '
            f'border-color: hsl({hue}, 50%, 55%)">#{pid}</span>')


def html_table(table: pd.DataFrame) -> str:
    if "Source" in table.columns and (table["Source"] == "measured").all():
        table = table.drop(columns=["Source"])   # only reported rows need telling apart (they are also greyed)
    # long metric names may break after an underscore
    header = "".join(f"<th>{html.escape(str(c)).replace('_', '_<wbr>')}</th>" for c in table.columns)
    body = []
    for row in table.itertuples(index=False):
        source = str(row[table.columns.get_loc("Source")]) if "Source" in table.columns else ""
        css = "reported" if source.startswith("reported") else "measured"
        cells = []
        for column, value in zip(table.columns, row):
            if column in ("Protocol", "Full protocol"):
                cells.append(f'<td class="protocol">{protocol_badge(str(value))}</td>')
            else:
                kind = "" if column in TEXT_COLUMNS else "num"
                cells.append(f'<td class="{kind}">{html.escape(str(value))}</td>')
        body.append(f'<tr class="{css}">{"".join(cells)}</tr>')
    return f'<div class="scroll"><table><thead><tr>{header}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _table_section(key: str, table: pd.DataFrame) -> list[str]:
    parts = [f'<h3 id="table-{html.escape(key)}">{html.escape(table_title(key))}</h3>']
    if key in SPECS and SPECS[key].note:
        parts.append(f'<p class="note">{html.escape(SPECS[key].note)}</p>')
    if key == "protocols":
        table = table.assign(Protocol=[f"{suite} {pid}" for suite, pid in zip(table["Suite"], table["Protocol"])])
        table = table.drop(columns=["Suite"])
    parts.append(html_table(table))
    return parts


def grid_html(grid: ImageGrid) -> str:
    """An HTML table: one row per prompt, one column per checkpoint, images inline as base64 PNG."""
    header = "<th>prompt</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in grid.columns)
    rows = []
    for prompt, key, paths in grid.rows:
        cells = "".join(f"<td>{_img_tag(thumbnail_png(p), f'{prompt} ({c})', 'thumb')}</td>"
                        for p, c in zip(paths, grid.columns))
        rows.append(f'<tr><td class="prompt">{html.escape(prompt)}<br><span class="key">{html.escape(key)}</span>'
                    f"</td>{cells}</tr>")
    return f'<div class="scroll"><table class="grid"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}' \
           "</tbody></table></div>"


def build_report(store: ResultsStore, frame: pd.DataFrame | None = None, *, max_prompts: int = 4,
                 max_checkpoints: int = 6, title: str = "Harness report", gains: list[Gain] | None = None) -> str:
    """The whole report as one HTML string (frame defaults to store.latest_metrics(), gains to
    gains_over_base(store, frame))."""
    if frame is None:
        frame = store.latest_metrics()
    if gains is None:
        gains = gains_over_base(store, frame)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tables = build_tables(frame)
    measured_keys = [k for k, t in tables.items() if k != "protocols" and (t["Source"] == "measured").any()]
    reference_keys = [k for k in tables if k != "protocols" and k not in measured_keys]
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f'<p class="meta">store {html.escape(str(store.path))} · {frame["evaluation_id"].nunique()} evaluations · '
             f"generated {now}</p>",
             '<p class="toc"><a href="#tables">Tables</a> · <a href="#curves">Training curves</a> · '
             '<a href="#images">Images across checkpoints</a></p>',
             '<p class="note">Cells are mean ± sample std over training seeds (n); with one seed, (s.e. x) is the '
             "evaluation's own standard error (from its images' randomness). Grey italic rows are the "
             f"published numbers of {html.escape(PAPER)}, under the paper's own protocol: reference only. "
             "Compare rows only when their Protocol (and its coloured #hash) is identical.</p>",
             '<h2 id="tables">Tables</h2>']
    if not measured_keys:
        parts.append('<p class="note">no complete evaluations in the store yet.</p>')
    for key in measured_keys + (["protocols"] if "protocols" in tables else []):
        parts += _table_section(key, tables[key])
    if reference_keys:
        parts.append(f"<details><summary>Paper reference tables without measured rows "
                     f"({', '.join(html.escape(table_title(k)) for k in reference_keys)})</summary>")
        for key in reference_keys:
            parts += _table_section(key, tables[key])
        parts.append("</details>")

    if gains:
        parts.append('<h2 id="gains">Gain over the base model</h2>')
        parts.append('<p class="note">Paired over the same prompts and image seeds; ± is the evaluation\'s own standard '
                     "error of the gain. A gain under twice it is noise, not an improvement. A few training steps on "
                     f"the tiny default move the score by about that much; the result to compare with is "
                     f"{html.escape(FULL_RESULT)}.</p>")
        parts.append("<ul>" + "".join(f"<li>{html.escape(g.line())}</li>" for g in gains) + "</ul>")
    parts.append('<h2 id="curves">Training curves</h2>')
    run_names = sorted({text_or_none(r) for r in frame["run"]} - {None}) if not frame.empty else []
    methods = {}
    for r in frame.drop_duplicates("run").itertuples(index=False):
        if text_or_none(r.run):
            methods[r.run] = text_or_none(r.method) or "base"
    runs, missing_runs = {}, []
    for run in run_names:
        run_dir = resolve_run_dir(run, store.path.parent)
        if run_dir is None:
            missing_runs.append(run)
        else:
            runs[run] = read_jsonl(run_dir.metrics_path)
    b64 = training_curves_png(runs, methods) if runs else None
    if b64:
        parts.append('<p class="note">Colour = method, line style = run; faint lines are raw values, solid lines '
                     "a moving average; markers are eval/ metrics at checkpoint steps.</p>")
        parts.append(_img_tag(b64, "training curves"))
    elif runs:
        parts.append('<p class="note">the runs\' metrics.jsonl files hold no plottable keys.</p>')
    if not run_names:
        parts.append('<p class="note">no runs in the store (evaluations without a run directory).</p>')
    if missing_runs:
        parts.append(f'<p class="note">no metrics.jsonl found for run {", ".join(html.escape(r) for r in missing_runs)} '
                     "(looked in the run path and beside the store).</p>")

    parts.append('<h2 id="images">Images across checkpoints</h2>')
    grids, without_images = image_grids(store, frame, max_prompts, max_checkpoints)
    if grids:
        parts.append('<p class="note">Same prompt and image index (so the same sampling seed) in every column.</p>')
    for grid in grids:
        parts.append(f"<h3>{html.escape(grid.title)}</h3>")
        parts.append(grid_html(grid))
    if without_images:
        parts.append('<details><summary class="note">' + f"{len(without_images)} evaluation group(s) without images "
                     "on disk (records need a path, or provenance an out_dir in the GenEval layout)</summary><ul>"
                     + "".join(f"<li>{html.escape(t)}</li>" for t in without_images) + "</ul></details>")
    elif not grids:
        parts.append('<p class="note">no evaluations in the store.</p>')
    parts.append("</body></html>")
    return "\n".join(parts)
