"""GenEval scoring engine: official rules, no models.

Input is one metadata line (evaluation_metadata.jsonl) and the raw detector output for one image, each detection
{"class", "bbox": [x1, y1, x2, y2], "score", "color"}; "color" is the colour classifier's answer for that object
(only the objects listed by `colors_needed` have to be classified). Output is (correct, reason) exactly as the
official evaluate_images.py decides it (docs: evaluators.md 1.5-1.8, djghosh13/geneval at af4902f), plus the
results.jsonl records and the summary_scores.py aggregation.

Numerics: the official detector returns float32 arrays and the official thresholding and position geometry run
in float32, so this engine does the same for those two steps (it only matters at exact boundaries).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from harness.geometry import relative_position  # noqa: F401  (part of this module's API)

from evaluators.coco_prompts import COCO_CLASSES, COLORS, RELATIONS, TAGS
from harness.io import atomic_write_text

_CLASS_INDEX = {name: i for i, name in enumerate(COCO_CLASSES)}


# --- metadata ---------------------------------------------------------------------------------------------------

def check_metadata(metadata: Any, where: str = "metadata") -> dict:
    """Validate one GenEval metadata object and return it; ValueError naming `where` otherwise."""
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(metadata).__name__}")
    for key in ("tag", "prompt"):
        if not isinstance(metadata.get(key), str):
            raise ValueError(f"{where}: missing or non-string {key!r}")
    if not isinstance(metadata.get("include"), list):
        raise ValueError(f"{where}: 'include' must be a list of clauses")
    for part in ("include", "exclude"):
        clauses = metadata.get(part, [])
        if not isinstance(clauses, list):
            raise ValueError(f"{where}: {part!r} must be a list of clauses")
        for k, clause in enumerate(clauses):
            here = f"{where}: {part}[{k}]"
            if not isinstance(clause, dict) or not isinstance(clause.get("class"), str):
                raise ValueError(f"{here} must be an object with a string 'class'")
            count = clause.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"{here}: 'count' must be an integer >= 1, got {count!r}")
            if part == "exclude" and ("color" in clause or "position" in clause):
                raise ValueError(f"{here}: exclude clauses take only 'class' and 'count'")
            if "color" in clause and clause["color"] not in COLORS:
                raise ValueError(f"{here}: color {clause['color']!r} is not one of {', '.join(COLORS)}")
            if "position" in clause:
                position = clause["position"]
                if (not isinstance(position, (list, tuple)) or len(position) != 2
                        or position[0] not in RELATIONS or not isinstance(position[1], int)):
                    raise ValueError(f"{here}: 'position' must be [relation, target index] with relation in "
                                     f"{list(RELATIONS)}, got {position!r}")
                if not 0 <= position[1] < k:
                    raise ValueError(f"{here}: position target index {position[1]} must point at an earlier "
                                     f"include clause (0..{k - 1})")
    return metadata


def load_metadata(path: str | os.PathLike) -> list[dict]:
    """Read an evaluation_metadata.jsonl (one object per line; line i is prompt folder i) with validation."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GenEval metadata file not found: {path} "
                                f"(the official one is prompts/evaluation_metadata.jsonl in djghosh13/geneval)")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # trailing blank lines are harmless; blank lines inside would shift the folder indices
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"{path}: line {number} is blank; every line must be one metadata object "
                             f"(the line index is the image folder index)")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {number} is not valid JSON ({e})") from e
        out.append(check_metadata(obj, f"{path}: line {number}"))
    if not out:
        raise ValueError(f"{path}: no metadata lines")
    return out


# --- detections -------------------------------------------------------------------------------------------------

def _check_detections(detections: list[dict]) -> None:
    """ValueError naming the first malformed detection."""
    if not isinstance(detections, list):
        raise ValueError(f"detections must be a list of dicts, got {type(detections).__name__}")
    for i, det in enumerate(detections):
        if not isinstance(det, dict) or not isinstance(det.get("class"), str):
            raise ValueError(f"detection {i}: expected a dict with a string 'class', got {det!r}")
        bbox = det.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise ValueError(f"detection {i} ({det['class']}): 'bbox' must be 4 numbers [x1, y1, x2, y2], got {bbox!r}")
        if not _is_number(det.get("score")):
            raise ValueError(f"detection {i} ({det['class']}): 'score' must be a number, got {det.get('score')!r}")
        color = det.get("color")
        if color is not None and color not in COLORS:
            raise ValueError(f"detection {i} ({det['class']}): color {color!r} is not None or one of {', '.join(COLORS)}")


def _is_number(value: Any) -> bool:
    """True for a finite int/float (numpy scalars included), False for bools and anything else."""
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def box_iou(box_a, box_b) -> float:
    """IoU with the official "+1 pixel" convention: area = (x2 - x1 + 1) * (y2 - y1 + 1)."""
    def area(box):
        """Box area with the +1 convention, 0 when empty."""
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)
    inter = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])])
    union = area(box_a) + area(box_b) - inter
    return float(inter / union) if union else 0.0


def keep_detections(
    metadata: dict,
    detections: list[dict],
    *,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_objects: int = 16,
    nms_threshold: float = 1.0,
) -> dict[str, list[int]]:
    """Indices into `detections` kept per class, most confident first, by the official post-processing.

    Per class: sort by score (descending), keep score > cut-off (strict; 0.9 for the counting tag, 0.3 otherwise),
    keep the first `max_objects`, then greedy NMS (a box survives while IoU < nms_threshold; off at >= 1).
    Classes with nothing kept are absent. Classes are listed in COCO order, unknown names after, as first seen.
    """
    check_metadata(metadata)
    _check_detections(detections)
    cutoff = np.float32(counting_threshold if metadata["tag"] == "counting" else threshold)
    by_class: dict[str, list[int]] = {}
    for i, det in enumerate(detections):
        by_class.setdefault(det["class"], []).append(i)
    class_order = sorted(by_class, key=lambda name: (_CLASS_INDEX.get(name, len(_CLASS_INDEX)), by_class[name][0]))

    kept: dict[str, list[int]] = {}
    for name in class_order:
        scores = {i: np.float32(detections[i]["score"]) for i in by_class[name]}
        # Ties go to the later detection, as the official reversed np.argsort does for a stable ascending sort.
        ranked = sorted(by_class[name], key=lambda i: (scores[i], i), reverse=True)
        ranked = [i for i in ranked if scores[i] > cutoff][:max_objects]
        chosen = []
        while ranked:
            best = ranked.pop(0)
            chosen.append(best)
            if nms_threshold < 1:
                best_box = detections[best]["bbox"]
                ranked = [i for i in ranked if box_iou(best_box, detections[i]["bbox"]) < nms_threshold]
        if chosen:
            kept[name] = chosen
    return kept


def colors_needed(
    metadata: dict,
    detections: list[dict],
    *,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_objects: int = 16,
    nms_threshold: float = 1.0,
) -> list[int]:
    """Indices of the detections whose colour the official evaluator classifies (top-`count` of colour clauses)."""
    kept = keep_detections(metadata, detections, threshold=threshold, counting_threshold=counting_threshold,
                           max_objects=max_objects, nms_threshold=nms_threshold)
    needed: list[int] = []
    for clause in metadata["include"]:
        found = kept.get(clause["class"], [])[:clause["count"]]
        if "color" in clause and len(found) >= clause["count"]:
            needed.extend(i for i in found if i not in needed)
    return needed


def kept_details(
    metadata: dict,
    detections: list[dict],
    *,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_objects: int = 16,
    nms_threshold: float = 1.0,
) -> dict[str, list[list[float]]]:
    """The results.jsonl "details": class -> kept rows [x1, y1, x2, y2, score], most confident first."""
    kept = keep_detections(metadata, detections, threshold=threshold, counting_threshold=counting_threshold,
                           max_objects=max_objects, nms_threshold=nms_threshold)
    return {name: [[float(v) for v in detections[i]["bbox"]] + [float(detections[i]["score"])] for i in indices]
            for name, indices in kept.items()}


# --- correctness ------------------------------------------------------------------------------------------------

def _evaluate(metadata: dict, detections: list[dict], kept: dict[str, list[int]],
              position_threshold: float) -> tuple[bool, str]:
    """The official include (AND) / exclude (OR) decision over already-kept detections."""
    correct = True
    reasons: list[str] = []
    matched_groups: list[list[int] | None] = []  # per include clause: its found objects, or None if it failed
    for clause in metadata["include"]:
        name, count = clause["class"], clause["count"]
        matched = True
        found = kept.get(name, [])[:count]
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                wanted = clause["color"]
                colors = []
                for i in found:
                    if detections[i].get("color") is None:
                        raise ValueError(f"detection {i} ({name}) has no 'color' but clause {clause} needs it; "
                                         f"classify the objects listed by colors_needed() first")
                    colors.append(detections[i]["color"])
                if colors.count(wanted) < count:
                    correct = matched = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    reasons.append(f"expected {wanted} {name}>={count}, found {colors.count(wanted)} {wanted}; and {seen}")
            if "position" in clause and matched:
                relation, target_index = clause["position"]
                targets = matched_groups[target_index]
                if targets is None:
                    correct = matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for i in found:
                        for t in targets:
                            actual = relative_position(detections[i]["bbox"], detections[t]["bbox"], position_threshold)
                            if relation not in actual:
                                correct = matched = False
                                # Official joins a Python set (hash order); a fixed order keeps reasons reproducible.
                                listed = " and ".join(r for r in RELATIONS if r in actual)
                                reasons.append(f"expected {name} {relation} target, found {listed} target")
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        name, count = clause["class"], clause["count"]
        n_kept = len(kept.get(name, []))
        if n_kept >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {n_kept}")
    return correct, "\n".join(reasons)


def score_detections(
    metadata: dict,
    detections: list[dict],
    *,
    threshold=0.3,
    counting_threshold=0.9,
    max_objects=16,
    nms_threshold=1.0,
    position_threshold=0.1,
) -> tuple[bool, str]:
    """(correct, reason) for one image: official thresholding, then include clauses ANDed, exclude clauses ORed."""
    kept = keep_detections(metadata, detections, threshold=threshold, counting_threshold=counting_threshold,
                           max_objects=max_objects, nms_threshold=nms_threshold)
    return _evaluate(metadata, detections, kept, position_threshold)


# --- results.jsonl and summary ----------------------------------------------------------------------------------

def results_record(filename: str, metadata: dict, correct: bool, reason: str, details: dict) -> dict:
    """One official results.jsonl record; metadata and details are JSON strings, as the official writer stores them."""
    return {
        "filename": str(filename),
        "tag": metadata["tag"],
        "prompt": metadata["prompt"],
        "correct": bool(correct),
        "reason": reason,
        "metadata": json.dumps(metadata),
        "details": json.dumps(details),
    }


def write_results_jsonl(path: str | os.PathLike, records: list[dict]) -> Path:
    """Write records as JSON lines, atomically."""
    return atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def aggregate(results: list[dict]) -> dict:
    """summary_scores.py: per-tag accuracy, overall = unweighted mean of the tag accuracies, image/prompt accuracy.

    A prompt counts as correct when ANY of its images is (official `groupby('metadata').any()`); the stricter
    all-images version is reported too, as `frac_prompts_all_correct`. Fractions are in [0, 1].
    """
    if not results:
        raise ValueError("aggregate: no results to summarise")
    tag_outcomes: dict[str, list[bool]] = {}  # first-appearance order, like groupby(sort=False)
    prompt_outcomes: dict[str, list[bool]] = {}
    for k, record in enumerate(results):
        for key in ("tag", "correct", "metadata"):
            if key not in record:
                raise ValueError(f"aggregate: result {k} has no {key!r} (expected results_record() fields)")
        if not isinstance(record["correct"], (bool, np.bool_)):
            raise ValueError(f"aggregate: result {k} has non-boolean 'correct' {record['correct']!r}")
        metadata_key = record["metadata"] if isinstance(record["metadata"], str) else json.dumps(record["metadata"])
        tag_outcomes.setdefault(record["tag"], []).append(bool(record["correct"]))
        prompt_outcomes.setdefault(metadata_key, []).append(bool(record["correct"]))

    tags = {tag: {"accuracy": sum(v) / len(v), "correct": sum(v), "total": len(v)} for tag, v in tag_outcomes.items()}
    all_images = [c for v in tag_outcomes.values() for c in v]
    return {
        # Official: mean over the tags present; with the official metadata these are exactly the six TAGS.
        "overall": sum(t["accuracy"] for t in tags.values()) / len(tags),
        "tags": tags,
        "missing_tags": [t for t in TAGS if t not in tags],
        "n_images": len(all_images),
        "n_prompts": len(prompt_outcomes),
        "frac_correct_images": sum(all_images) / len(all_images),
        "frac_correct_prompts": sum(any(v) for v in prompt_outcomes.values()) / len(prompt_outcomes),
        "frac_prompts_all_correct": sum(all(v) for v in prompt_outcomes.values()) / len(prompt_outcomes),
    }


def summary_metrics(results: list[dict]) -> list:
    """summary_scores.py as metrics: overall (mean of tag accuracies), each tag, correct images and prompts."""
    from evaluators.base import Metric, mean_and_stderr, mean_of_group_means
    summary = aggregate(results)
    per_tag: dict[str, list[float]] = {}
    for r in results:
        per_tag.setdefault(r["tag"], []).append(float(bool(r["correct"])))
    _, se, n = mean_of_group_means(per_tag)   # the value itself stays the official one
    metrics = [Metric("geneval_overall", summary["overall"], stderr=se, n=n)]
    metrics += [Metric(f"geneval_{tag}", summary["tags"][tag]["accuracy"], stderr=mean_and_stderr(per_tag[tag])[1],
                       n=len(per_tag[tag])) for tag in TAGS if tag in summary["tags"]]
    metrics += [Metric("geneval_correct_images", summary["frac_correct_images"]),
                Metric("geneval_correct_prompts", summary["frac_correct_prompts"])]
    return metrics
