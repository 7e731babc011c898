"""Evaluators for the shapes world: GenEval, a partial-credit GenEval reward, DPG-style questions, and quality.

Every evaluator reads the image through the exact detector (harness.shapes.detect), so the only "model" is
the stencil fit; the judging rules are the official engines' (evaluators/geneval.py, evaluators/dpg.py).

- shapes-geneval          official GenEval decision per image, results.jsonl records, summary_scores metrics.
- shapes-geneval-partial  flow_grpo-style partial credit (evaluators.md 1.9) as a dense reward in "score".
- shapes-fidelity         stencil-fit scores of the objects a prompt asks for, a dense reward beside the strict one.
- shapes-dpg              DPG question graphs (harness.shapes.questions), exact answers, DPG dependency zeroing.
- shapes-quality          statistics a reward hacker would move: stray cells, shape fidelity, background, and
                          diversity across the images of one prompt.

GenEval suites accept the six GenEval tags only (dense prompts have no GenEval clauses; use shapes-dpg).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math

import numpy as np

from evaluators import dpg, geneval
from evaluators.base import Evaluator, Metric, Sample, mean_and_stderr
from harness.shapes.detect import centre_in_cells, detect_image, size_in_cells
from harness.shapes.prompts import GENEVAL_TAGS
from harness.shapes.questions import answer, questions
from harness.shapes.world import COLORS, GRID

GOOD_SCORE = 0.9   # a detection at least this well fitted is a "good" object for the quality statistics


def _detections(sample: Sample) -> list[dict]:
    image = np.asarray(sample.image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"sample {sample.key!r}: image must be [H, W, 3] uint8 RGB, got {image.shape} {image.dtype}")
    return detect_image(image)


def _check_geneval_tag(sample: Sample, evaluator: str) -> None:
    tag = sample.metadata.get("tag")
    if tag not in GENEVAL_TAGS:
        raise ValueError(f"{evaluator}: sample {sample.key!r} has tag {tag!r}; it scores the six GenEval tags "
                         f"({', '.join(GENEVAL_TAGS)}). Score dense prompts with shapes-dpg.")


def _metadata_of(record: dict) -> dict:
    m = record["metadata"]
    return json.loads(m) if isinstance(m, str) else m


def _tag_means(records: list[dict], field: str) -> tuple[float, dict[str, float]]:
    """(unweighted mean over tags of the per-tag means, per-tag means) of a numeric record field."""
    by_tag: dict[str, list[float]] = {}
    for r in records:
        by_tag.setdefault(r["tag"], []).append(float(r[field]))
    per_tag = {t: sum(v) / len(v) for t, v in by_tag.items()}
    return sum(per_tag.values()) / len(per_tag), per_tag


def _require(records: list[dict], evaluator: str) -> None:
    if not records:
        raise ValueError(f"{evaluator}: no records to aggregate (was the sample list empty?)")


# --- shapes-geneval ----------------------------------------------------------------------------------------------

def score_geneval(samples: list[Sample]) -> dict[str, dict]:
    """Per-image official results.jsonl records (filename = sample key)."""
    out = {}
    for s in samples:
        _check_geneval_tag(s, "shapes-geneval")
        dets = _detections(s)
        correct, reason = geneval.score_detections(s.metadata, dets)
        details = geneval.kept_details(s.metadata, dets)
        out[s.key] = geneval.results_record(s.key, s.metadata, correct, reason, details)
    return out


def aggregate_geneval(records: list[dict]) -> list[Metric]:
    _require(records, "shapes-geneval")
    return geneval.summary_metrics(records)


SHAPES_GENEVAL = Evaluator(
    name="shapes-geneval", version="1",
    description="GenEval on the shapes world: exact detector, official thresholds and correctness rule; "
                "overall = mean of the six tag accuracies.",
    score=score_geneval, aggregate=aggregate_geneval, reward_field="correct")


# --- shapes-geneval-partial --------------------------------------------------------------------------------------

def partial_credit(metadata: dict, detections: list[dict]) -> tuple[bool, float, str]:
    """(strict_correct, score, reason): flow_grpo's partial GenEval reward (reward-server gen_eval.py).

    Detections are kept by the official thresholds. Per include clause, with found = ALL kept detections of
    its class: count credit 1 - |count - found| / count (not clamped: too many objects go negative, as in
    flow_grpo); if found != count the clause fails and its colour and position credits are 0; otherwise colour
    credit 1 - |count - right colour| / count, and position credit 1 if every (found, target) pair holds the
    relation, else 0 (also 0 when the target clause failed). score = mean of all credits. strict_correct =
    every clause exact. Deviation from flow_grpo, on purpose: it appends a single 0 when the count is off
    even if a clause has both colour and position, and on a failed relation it appends 0 *and* 1;
    here every clause gets one credit per requirement.
    """
    kept = geneval.keep_detections(metadata, detections)
    credits: list[float] = []
    reasons: list[str] = []
    groups: list[list[int] | None] = []
    for clause in metadata["include"]:
        name, count = clause["class"], clause["count"]
        found = kept.get(name, [])
        credits.append(1 - abs(count - len(found)) / count)
        ok = len(found) == count
        if not ok:
            reasons.append(f"expected {name}=={count}, found {len(found)}")
            credits += [0.0] * (("color" in clause) + ("position" in clause))
            groups.append(None)
            continue
        if "color" in clause:
            right = sum(detections[i]["color"] == clause["color"] for i in found)
            credits.append(1 - abs(count - right) / count)
            if right != count:
                ok = False
                reasons.append(f"expected {clause['color']} {name}=={count}, found {right} {clause['color']}")
        if "position" in clause:
            relation, target = clause["position"]
            targets = groups[target]
            holds = targets is not None and all(
                relation in geneval.relative_position(detections[i]["bbox"], detections[t]["bbox"])
                for i in found for t in targets)
            credits.append(1.0 if holds else 0.0)
            if not holds:
                ok = False
                reasons.append(f"no target for {name} to be {relation}" if targets is None
                               else f"expected {name} {relation} target")
        groups.append(found if ok else None)
    strict = all(g is not None for g in groups)
    return strict, sum(credits) / len(credits) if credits else 0.0, "\n".join(reasons)


def object_roles(metadata: dict, detections: list[dict]) -> list[bool]:
    """Per detection: True when the GenEval judge can count it towards the prompt (kept by the official
    thresholds, class of an include clause, and that clause's colour when it names one), False for the rest
    (fragments, misfits, unrequested classes, wrong colours). Used to localise token credit in training."""
    kept = {i for idx in geneval.keep_detections(metadata, detections).values() for i in idx}
    wanted = [(c["class"], c.get("color")) for c in metadata["include"]]
    return [i in kept and any(d["class"] == name and colour in (None, d["color"]) for name, colour in wanted)
            for i, d in enumerate(detections)]


def score_geneval_partial(samples: list[Sample]) -> dict[str, dict]:
    """results.jsonl records plus "strict_correct" and the partial "score" (flow_grpo's field names)."""
    out = {}
    for s in samples:
        _check_geneval_tag(s, "shapes-geneval-partial")
        dets = _detections(s)
        correct, reason = geneval.score_detections(s.metadata, dets)
        strict, score, strict_reason = partial_credit(s.metadata, dets)
        record = geneval.results_record(s.key, s.metadata, correct, reason, geneval.kept_details(s.metadata, dets))
        record.update(strict_correct=strict, score=score, strict_reason=strict_reason)
        out[s.key] = record
    return out


def aggregate_geneval_partial(records: list[dict]) -> list[Metric]:
    _require(records, "shapes-geneval-partial")
    overall, per_tag = _tag_means(records, "score")
    strict, _ = _tag_means(records, "strict_correct")
    scale = "<=1 (negative when too many objects)"
    metrics = [Metric("geneval_partial_overall", overall, scale=scale),
               Metric("geneval_strict_overall", strict)]
    metrics += [Metric(f"geneval_partial_{tag}", per_tag[tag], scale=scale) for tag in GENEVAL_TAGS if tag in per_tag]
    return metrics


SHAPES_GENEVAL_PARTIAL = Evaluator(
    name="shapes-geneval-partial", version="1",
    description="flow_grpo-style partial-credit GenEval reward on the shapes world (count, colour and position "
                "credits averaged per image); overall = mean over tags.",
    score=score_geneval_partial, aggregate=aggregate_geneval_partial, reward_field="score")


# --- shapes-fidelity ---------------------------------------------------------------------------------------------

def fidelity_credit(metadata: dict, detections: list[dict]) -> float:
    """How well the objects the prompt asks for are drawn, in [0, 1]: per include clause, the `count` best
    stencil-fit scores among detections of its class (and colour, when the clause names one), a missing
    object scoring 0; the mean over clauses.

    A dense companion to the strict GenEval reward: the official rules keep a detection only above a score
    cut-off (0.9 for counting), so a half-drawn shape fails the prompt however close it is. Extra objects do
    not raise it (only the best `count` are read), so drawing more shapes cannot buy credit."""
    credits = []
    for clause in metadata["include"]:
        scores = sorted((d["score"] for d in detections
                         if d["class"] == clause["class"] and clause.get("color", d["color"]) == d["color"]), reverse=True)
        best = scores[:clause["count"]] + [0.0] * max(0, clause["count"] - len(scores))
        credits.append(float(np.mean(best)))
    return float(np.mean(credits)) if credits else 0.0


def score_fidelity(samples: list[Sample]) -> dict[str, dict]:
    out = {}
    for s in samples:
        _check_geneval_tag(s, "shapes-fidelity")
        out[s.key] = {"tag": s.metadata["tag"], "prompt": s.metadata["prompt"],
                      "score": fidelity_credit(s.metadata, _detections(s))}
    return out


def aggregate_fidelity(records: list[dict]) -> list[Metric]:
    _require(records, "shapes-fidelity")
    overall, per_tag = _tag_means(records, "score")
    return [Metric("fidelity_overall", overall)] + [Metric(f"fidelity_{tag}", per_tag[tag]) for tag in GENEVAL_TAGS
                                                    if tag in per_tag]


SHAPES_FIDELITY = Evaluator(
    name="shapes-fidelity", version="1",
    description="Dense reward on the shapes world: stencil-fit scores of the objects each GenEval prompt asks "
                "for (best `count` per clause, colour-matched, missing = 0); overall = mean over tags.",
    score=score_fidelity, aggregate=aggregate_fidelity, reward_field="score")


# --- shapes-dpg --------------------------------------------------------------------------------------------------

def item_id(metadata: dict) -> str:
    """Stable DPG item id of a prompt (no dots or slashes, so dpg.image_key keeps it whole)."""
    return "shapes-" + hashlib.sha256(metadata["prompt"].encode()).hexdigest()[:16]


def dpg_item(metadata: dict) -> dpg.DpgItem:
    item = dpg.DpgItem(item_id(metadata))
    for q in questions(metadata):
        qid = q["proposition_id"]
        item.questions[qid] = q["question"]
        item.dependencies[qid] = list(q["dependency"])
        item.tuples[qid] = q["tuple"]
    return item


def score_dpg(samples: list[Sample]) -> dict[str, dict]:
    """Per image: exact answers to its prompt's questions and the dependency-zeroed score (one DPG tile)."""
    out = {}
    for s in samples:
        dets = _detections(s)
        graph = questions(s.metadata)
        answers = {q["proposition_id"]: answer(q, dets) for q in graph}
        item = dpg_item(s.metadata)
        tile_score, _, adjusted = dpg.score_tile(item, answers)
        out[s.key] = {"item_id": item.item_id, "tag": s.metadata["tag"], "prompt": s.metadata["prompt"],
                      "metadata": json.dumps(s.metadata), "score": tile_score,
                      "answers": [answers[q["proposition_id"]] for q in graph],
                      "adjusted": [adjusted[q["proposition_id"]] for q in graph],
                      "questions": [q["question"] for q in graph]}
    return out


def aggregate_dpg(records: list[dict]) -> list[Metric]:
    """DPG summary: each prompt is one item and its images are the tiles of its grid (corrected variant:
    category scores use every tile's dependency-adjusted answers, parity=False)."""
    _require(records, "shapes-dpg")
    items: dict[str, dpg.DpgItem] = {}
    tiles: dict[str, list[dict[int, bool]]] = {}
    for r in records:
        item = items.setdefault(r["item_id"], dpg_item(_metadata_of(r)))
        if len(r["answers"]) != len(item.questions):
            raise ValueError(f"shapes-dpg: record for {r['prompt']!r} has {len(r['answers'])} answers, "
                             f"its question graph has {len(item.questions)}")
        tiles.setdefault(r["item_id"], []).append({qid: bool(a) for qid, a in zip(item.questions, r["answers"])})
    summary = dpg.score_dpg(items, tiles, parity=False)
    scale = "0-100"
    metrics = [Metric("dpg_overall", summary.score, stderr=_image_stderr(summary), n=len(summary.images), scale=scale)]
    metrics += [Metric(f"dpg_{k}", v, scale=scale) for k, v in summary.l1.items()]
    metrics += [Metric("dpg_" + k.replace(" - ", "_"), v, scale=scale) for k, v in summary.l2.items()]
    return metrics


SHAPES_DPG = Evaluator(
    name="shapes-dpg", version="1",
    description="DPG-style question graphs for shapes prompts (dense and the six GenEval tags), answered exactly "
                "from the detector, scored by DPG's dependency rule; overall = mean over prompts x 100.",
    score=score_dpg, aggregate=aggregate_dpg, reward_field="score")


# --- shapes-quality ----------------------------------------------------------------------------------------------

def _free_classes(metadata: dict) -> set[str]:
    """Classes the prompt names without fixing their colour (dense prompts fix every colour)."""
    if metadata.get("tag") == "dense":
        return set()
    clauses = metadata.get("include", [])
    coloured = {c["class"] for c in clauses if "color" in c}
    return {c["class"] for c in clauses if "color" not in c} - coloured


def quality_record(metadata: dict, detections: list[dict]) -> dict:
    """Per-image statistics (fractions of cells; good = detection score >= GOOD_SCORE)."""
    ink = np.zeros((GRID, GRID), dtype=bool)
    good = np.zeros((GRID, GRID), dtype=bool)
    for d in detections:
        ink |= d["mask"]
        if d["score"] >= GOOD_SCORE:
            good |= d["mask"]
    stray = int((ink & ~good).sum())
    free = _free_classes(metadata)
    return {
        "group": metadata["prompt"], "tag": metadata["tag"],
        "ink_cells": int(ink.sum()), "stray_cells": stray,
        "stray_fraction": stray / int(ink.sum()) if ink.any() else 0.0,
        "fidelity": float(np.mean([d["score"] for d in detections])) if detections else None,
        "cleanliness": 1.0 - stray / max(int((~good).sum()), 1),
        "objects": [{"class": d["class"], "color": d["color"], "centre": list(centre_in_cells(d)),
                     "size": size_in_cells(d), "free": d["class"] in free}
                    for d in detections if d["score"] >= GOOD_SCORE],
    }


def score_quality(samples: list[Sample]) -> dict[str, dict]:
    return {s.key: quality_record(s.metadata, _detections(s)) for s in samples}


def _matched_pairs(objs_a: list[dict], objs_b: list[dict]) -> list[tuple[dict, dict]]:
    """Each object of A paired with the nearest same-class object of B (objects without a partner are skipped)."""
    pairs = []
    for a in objs_a:
        same = [b for b in objs_b if b["class"] == a["class"]]
        if same:
            pairs.append((a, min(same, key=lambda b: math.dist(a["centre"], b["centre"]))))
    return pairs


def group_diversity(records: list[dict]) -> dict[str, float | None]:
    """Diversity across the images of one prompt.

    position_spread: mean over image pairs (both directions) of the distance from each good object to the
      nearest same-class good object of the other image, in grid widths (0 when all images are identical).
    size_spread: mean |size difference| in cells over the same pairs.
    free_color_entropy: entropy of the colours of free objects (class named without a colour), over all
      images of the prompt, normalised by log(len(COLORS)) to 0-1; None when the prompt fixes every colour.
    """
    distances, size_gaps = [], []
    for ra, rb in itertools.permutations(records, 2):
        for a, b in _matched_pairs(ra["objects"], rb["objects"]):
            distances.append(math.dist(a["centre"], b["centre"]) / GRID)
            size_gaps.append(abs(a["size"] - b["size"]))
    colours = [o["color"] for r in records for o in r["objects"] if o["free"]]
    entropy = None
    if colours:
        p = np.array([colours.count(c) for c in COLORS], dtype=float) / len(colours)
        p = p[p > 0]
        entropy = float(-(p * np.log(p)).sum() / math.log(len(COLORS)))
    return {"position_spread": float(np.mean(distances)) if distances else None,
            "size_spread": float(np.mean(size_gaps)) if size_gaps else None,
            "free_color_entropy": entropy}


def aggregate_quality(records: list[dict]) -> list[Metric]:
    _require(records, "shapes-quality")
    fidelities = [r["fidelity"] for r in records if r["fidelity"] is not None]
    def mean_metric(name: str, values: list[float], **kw) -> Metric:
        value, se, n = mean_and_stderr(values)
        return Metric(name, value, stderr=se, n=n, **kw)
    metrics = [
        mean_metric("stray_cell_fraction", [r["stray_fraction"] for r in records], higher_is_better=False),
        mean_metric("shape_fidelity", fidelities) if fidelities else Metric("shape_fidelity", 0.0),
        mean_metric("background_cleanliness", [r["cleanliness"] for r in records]),
    ]
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["group"], []).append(r)
    per_group = [group_diversity(g) for g in groups.values() if len(g) >= 2]
    scales = {"position_spread": "grid widths (0-1.41)", "size_spread": "cells (0-2)", "free_color_entropy": "0-1"}
    for name, scale in scales.items():
        values = [d[name] for d in per_group if d[name] is not None]
        if values:
            metrics.append(mean_metric(name, values, scale=scale))
    metrics.append(Metric("diversity_prompts", float(len(per_group)), scale="count"))
    return metrics


SHAPES_QUALITY = Evaluator(
    name="shapes-quality", version="1",
    description="Reward-hacking watch on the shapes world: stray-cell fraction, shape fidelity, background "
                "cleanliness, and per-prompt diversity of positions, sizes and free colours.",
    score=score_quality, aggregate=aggregate_quality, reward_field=None)


def _image_stderr(summary) -> float | None:
    """Standard error of DPG's overall score (100 x the mean over images of each image's score)."""
    scores = [100.0 * image.score for image in summary.images.values()]
    return mean_and_stderr(scores)[1] if scores else None

