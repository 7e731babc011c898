"""DPG-Bench scoring engine: official rules, no models.

The VQA model stays outside: the engine takes a callable `answer(image, question) -> bool` or precomputed answers
(per image, per tile, question id -> bool). Official rules (docs: evaluators.md 2.2-2.5, TencentQQGYLab/ELLA
dpg_bench/compute_dpg_bench.py at 3c228f1):

- one CSV row per question; questions grouped by item_id (= image file stem); `dependency` lists parent question ids
  (0 = none); the category is `tuple.split('(')[0].strip()`, its L1 group `category.split('-')[0].strip()`;
- per tile: score 1 for "yes", then, in CSV order, a question with any parent already at 0 is set to 0 (so zeros
  cascade forward); tile score = mean over the item's questions;
- image score = mean over its tiles (4, the 2x2 grid); DPG-Bench score = mean over images x 100.

`parity=True` (default) reproduces two official quirks: the first CSV data row is skipped, and category scores use
only the last tile's raw (pre-dependency) answers. With the official script an image it cannot score (no questions
for its id, or a question whose parent was the skipped row) is left out, not scored 0; parity mode does the same and
lists it under `failed`. `parity=False` is the "dpg-corrected" variant: every row is read, category scores use every
tile's dependency-adjusted scores, and such problems raise ValueError instead.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image

CSV_COLUMNS = ("item_id", "text", "keywords", "proposition_id", "dependency", "category_broad",
               "category_detailed", "tuple", "question_natural_language")
REQUIRED_COLUMNS = ("item_id", "proposition_id", "dependency", "tuple", "question_natural_language")


@dataclass
class DpgItem:
    """The questions of one prompt (item_id), in CSV order."""
    item_id: str
    questions: dict[int, str] = field(default_factory=dict)          # question id -> yes/no question
    dependencies: dict[int, list[int]] = field(default_factory=dict)  # question id -> parent ids (0 = none)
    tuples: dict[int, str] = field(default_factory=dict)              # question id -> DSG tuple text


@dataclass
class ImageScore:
    """Scores of one grid image: per tile, their mean, and the per-category question scores it contributes."""
    tile_scores: list[float]
    score: float
    category_scores: dict[str, list[float]]


@dataclass
class DpgSummary:
    """DPG-Bench result; `score`, `l1` and `l2` are on the official 0-100 scale."""
    score: float
    l1: dict[str, float]
    l2: dict[str, float]
    images: dict[str, ImageScore]
    failed: dict[str, str]
    parity: bool

    def to_dict(self) -> dict:
        """JSON-ready form (per-image category lists dropped to keep it small)."""
        return {
            "score": self.score, "l1": self.l1, "l2": self.l2, "parity": self.parity,
            "n_images": len(self.images), "failed": self.failed,
            "images": {name: {"tile_scores": s.tile_scores, "score": s.score} for name, s in self.images.items()},
        }


class MissingParentError(KeyError):
    """A question depends on a question id the item does not have (official: KeyError, image skipped)."""


def category_of(tuple_text: str) -> str:
    """L2 category used for scoring, e.g. 'entity - whole (parent)' -> 'entity - whole'."""
    return tuple_text.split("(")[0].strip()


def l1_of(category: str) -> str:
    """L1 group of an L2 category, e.g. 'entity - whole' -> 'entity'."""
    return category.split("-")[0].strip()


def image_key(filename: str) -> str:
    """Item id of an image file: the basename up to its first dot (official rule)."""
    return os.path.basename(filename).split(".")[0]


def answer_is_yes(text: str) -> bool:
    """Official answer test: exact, case-sensitive match with 'yes'."""
    return text == "yes"


# --- CSV --------------------------------------------------------------------------------------------------------

def _parse_int(value: Any, what: str, where: str) -> int:
    """An integer from a CSV cell ('3' or '3.0'); ValueError naming the row otherwise."""
    text = "" if value is None else str(value).strip()
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or not number.is_integer():
        raise ValueError(f"{where}: {what} must be an integer, got {value!r}")
    return int(number)


def parse_dpg_rows(rows: Iterable[dict], *, parity: bool = True, source: str = "dpg_bench.csv") -> dict[str, DpgItem]:
    """Group CSV rows (dicts keyed by column name) into items; parity=True skips the first data row, as the official."""
    items: dict[str, DpgItem] = {}
    previous_id = None
    for index, row in enumerate(rows):
        where = f"{source}: data row {index + 1}"
        if None in row:
            raise ValueError(f"{where}: more fields than the {len(CSV_COLUMNS)} header columns")
        if parity and index == 0:
            continue  # official prepare_dpg_data skips DataFrame row 0 (never even reads it)
        for column in REQUIRED_COLUMNS:
            value = row.get(column)
            if value is None or not str(value).strip():
                raise ValueError(f"{where}: missing value for column {column!r}")
        item_id = str(row["item_id"]).strip()
        qid = _parse_int(row["proposition_id"], "proposition_id", where)
        parents = [_parse_int(p, "each dependency id", where) for p in str(row["dependency"]).split(",")]
        if item_id != previous_id:
            if item_id in items and not parity:
                raise ValueError(f"{where}: item_id {item_id!r} appears again after other items; "
                                 f"the rows of one item must be contiguous")
            items[item_id] = DpgItem(item_id)  # official: a repeated block replaces the earlier one
        item = items[item_id]
        if qid in item.questions and not parity:
            raise ValueError(f"{where}: item {item_id!r} repeats proposition_id {qid}")
        item.questions[qid] = str(row["question_natural_language"])
        item.dependencies[qid] = parents
        item.tuples[qid] = str(row["tuple"])
        previous_id = item_id
    if not parity:
        for item in items.values():
            for qid, parents in item.dependencies.items():
                bad = [p for p in parents if p != 0 and (p == qid or p not in item.questions)]
                if bad:
                    raise ValueError(f"{source}: item {item.item_id!r} question {qid} depends on {bad}, "
                                     f"which are not other questions of that item")
    if not items:
        raise ValueError(f"{source}: no question rows")
    return items


def load_dpg_csv(path: str | os.PathLike, *, parity: bool = True) -> dict[str, DpgItem]:
    """Read dpg_bench.csv (header + one row per question) into items keyed by item_id."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DPG-Bench CSV not found: {path} (dpg_bench/dpg_bench.csv in TencentQQGYLab/ELLA)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: header lacks column(s) {missing}; expected the columns {list(CSV_COLUMNS)}")
        return parse_dpg_rows(list(reader), parity=parity, source=str(path))


# --- scoring ----------------------------------------------------------------------------------------------------

def _check_answers(item: DpgItem, answers: dict[int, bool], where: str) -> None:
    """ValueError unless `answers` has a bool for every question of the item."""
    if not isinstance(answers, dict):
        raise ValueError(f"{where}: tile answers must be a dict question id -> bool, got {type(answers).__name__}")
    missing = [qid for qid in item.questions if qid not in answers]
    if missing:
        raise ValueError(f"{where}: no answer for question id(s) {missing} of item {item.item_id!r}")
    for qid in item.questions:
        if not isinstance(answers[qid], (bool, np.bool_)):
            raise ValueError(f"{where}: answer to question {qid} must be a bool, got {answers[qid]!r} "
                             f"(convert VQA text with answer_is_yes)")


def score_tile(item: DpgItem, answers: dict[int, bool]) -> tuple[float, dict[int, float], dict[int, float]]:
    """(tile score, raw scores, dependency-adjusted scores) for one tile's answers."""
    _check_answers(item, answers, f"item {item.item_id!r}")
    raw = {qid: 1.0 if answers[qid] else 0.0 for qid in item.questions}
    adjusted = dict(raw)
    # One pass in CSV order, reading the dict it writes: a zeroed parent zeroes children that come after it.
    for qid, parents in item.dependencies.items():
        for parent in parents:
            if parent == 0:
                continue
            if parent not in adjusted:
                raise MissingParentError(f"item {item.item_id!r}: question {qid} depends on missing question {parent}")
            if adjusted[parent] == 0:
                adjusted[qid] = 0.0
                break
    return sum(adjusted.values()) / len(adjusted), raw, adjusted


def score_image(item: DpgItem, tiles: list[dict[int, bool]], *, parity: bool = True) -> ImageScore:
    """Score one grid image from its tiles' answers (tile mean), with its category contributions."""
    if not tiles:
        raise ValueError(f"item {item.item_id!r}: no tiles answered")
    tile_scores, raw_per_tile, adjusted_per_tile = [], [], []
    for tile in tiles:
        tile_score, raw, adjusted = score_tile(item, tile)
        tile_scores.append(tile_score)
        raw_per_tile.append(raw)
        adjusted_per_tile.append(adjusted)
    categories: dict[str, list[float]] = {}
    # parity: the official loop keeps only the last tile's pre-dependency scores for categories (ELLA#60).
    used = raw_per_tile[-1:] if parity else adjusted_per_tile
    for scores in used:
        for qid, tuple_text in item.tuples.items():
            categories.setdefault(category_of(tuple_text), []).append(scores[qid])
    return ImageScore(tile_scores=tile_scores, score=sum(tile_scores) / len(tile_scores), category_scores=categories)


def score_dpg(items: dict[str, DpgItem], answers: dict[str, list[dict[int, bool]]], *, parity: bool = True) -> DpgSummary:
    """DPG-Bench summary from precomputed answers: image file name -> per-tile {question id: bool}."""
    images: dict[str, ImageScore] = {}
    failed: dict[str, str] = {}
    for name, tiles in answers.items():
        item = items.get(image_key(name))
        if item is None:
            if not parity:
                raise ValueError(f"image {name!r}: no questions for item id {image_key(name)!r} in the CSV")
            failed[name] = f"no questions for item id {image_key(name)!r}"
            continue
        try:
            images[name] = score_image(item, tiles, parity=parity)
        except MissingParentError as e:
            if not parity:
                raise ValueError(str(e)) from e
            failed[name] = str(e)
    if not images:
        raise ValueError(f"no image could be scored (failed: {failed or 'none given'})")
    pooled: dict[str, list[float]] = {}
    for image in images.values():
        for category, values in image.category_scores.items():
            pooled.setdefault(category, []).extend(values)
    l1_pooled: dict[str, list[float]] = {}
    for category, values in pooled.items():
        l1_pooled.setdefault(l1_of(category), []).extend(values)  # question-weighted, not a mean of L2 means
    return DpgSummary(
        score=100.0 * sum(s.score for s in images.values()) / len(images),
        l1={k: 100.0 * sum(v) / len(v) for k, v in sorted(l1_pooled.items())},
        l2={k: 100.0 * sum(v) / len(v) for k, v in sorted(pooled.items())},
        images=images,
        failed=failed,
        parity=parity,
    )


# --- images and the VQA seam ------------------------------------------------------------------------------------

def split_grid(image: Image.Image, tile_size: int | None = None) -> list[Image.Image]:
    """The 4 tiles of a 2x2 grid: top-left, top-right, bottom-left, bottom-right.

    With tile_size=None the image must have even sides and is cut in half each way. With an explicit tile_size the
    official crop boxes are used as is (PIL pads any part outside the image with black, as the official does).
    """
    if tile_size is None:
        width, height = image.size
        if width % 2 or height % 2:
            raise ValueError(f"split_grid: image size {image.size} has an odd side; pass tile_size explicitly")
        tw, th = width // 2, height // 2
    else:
        if tile_size < 1:
            raise ValueError(f"split_grid: tile_size must be >= 1, got {tile_size}")
        tw = th = tile_size
    boxes = [(0, 0, tw, th), (tw, 0, 2 * tw, th), (0, th, tw, 2 * th), (tw, th, 2 * tw, 2 * th)]
    return [image.crop(box) for box in boxes]


def make_grid(images: list[Image.Image]) -> Image.Image:
    """Paste 4 equal-size images into a 2x2 grid in split_grid's order."""
    if len(images) != 4:
        raise ValueError(f"make_grid: need exactly 4 images, got {len(images)}")
    size = images[0].size
    if any(im.size != size for im in images):
        raise ValueError(f"make_grid: images differ in size: {[im.size for im in images]}")
    width, height = size
    grid = Image.new("RGB", (2 * width, 2 * height))
    for im, (x, y) in zip(images, [(0, 0), (width, 0), (0, height), (width, height)]):
        grid.paste(im.convert("RGB"), (x, y))
    return grid


def answer_tiles(item: DpgItem, tiles: list[Image.Image],
                 answer: Callable[[Image.Image, str], bool]) -> list[dict[int, bool]]:
    """Ask every question of the item on every tile; `answer` must return a bool."""
    out = []
    for tile in tiles:
        tile_answers = {}
        for qid, question in item.questions.items():
            result = answer(tile, question)
            if not isinstance(result, (bool, np.bool_)):
                raise ValueError(f"answer() returned {result!r} for {question!r}; it must return a bool "
                                 f"(wrap VQA text with answer_is_yes)")
            tile_answers[qid] = bool(result)
        out.append(tile_answers)
    return out


def answer_grid(item: DpgItem, image: Image.Image, answer: Callable[[Image.Image, str], bool], *,
                pic_num: int = 4, tile_size: int | None = None) -> list[dict[int, bool]]:
    """Split a grid image and answer the item's questions on its first `pic_num` tiles (official default 4)."""
    if not 1 <= pic_num <= 4:
        raise ValueError(f"pic_num must be 1..4, got {pic_num}")
    return answer_tiles(item, split_grid(image, tile_size)[:pic_num], answer)
