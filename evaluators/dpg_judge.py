"""The `dpg` evaluator: DPG-Bench's official scoring (evaluators/dpg.py) with the mPLUG-large VQA judge
(evaluators/mplug.py).

Each sample is one tile of a 2x2 grid (evaluators/run.py cuts the grids as the official script does; key
"<prompt_id>/<tile>"). Every question of the tile's item (dpg_bench.csv, official parity: first data row skipped) is
asked on the tile; the answer counts when it is exactly 'yes'. The record keeps the answer texts, the yes/no
answers and the tile's dependency-zeroed score; aggregation groups the four tiles of each grid and applies the
official rules (dpg.score_dpg, parity=True: image mean of tile means, categories from the last tile's raw
answers) -> dpg_overall, dpg_<L1>, dpg_<L2> on 0-100.

Resuming: the results store keeps a record per tile as each chunk of tiles is scored, and an interrupted evaluation
scores only tiles without one. Inside a chunk, answers are also cached per (judge, image hash, question) in an
SQLite file ($HARNESS_DPG_ANSWERS, default results/dpg_answers.sqlite), written as each tile is answered, so a
kill never asks a question twice; the judge identity is the sha256 of the model folder's config files, the
checkpoint's size and mtime, and the answering mode.

Question file: <data>/dpg/dpg_bench.csv (`harness data fetch dpg`, or $HARNESS_DPG_CSV).
Judge: $HARNESS_MPLUG_DIR (evaluators/mplug.py). $HARNESS_MPLUG_FAST=1 answers in the batched (non bit-exact)
mode; the default is the mode bit-equal to the official per-question pipeline.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evaluators import dpg, mplug
from evaluators.base import Evaluator, Metric, Sample, mean_and_stderr

CSV_ENV = "HARNESS_DPG_CSV"
ANSWERS_ENV = "HARNESS_DPG_ANSWERS"
FAST_ENV = "HARNESS_MPLUG_FAST"
CSV_RELATIVE = "dpg/dpg_bench.csv"
TILES_PER_CALL = 4          # tiles answered per judge call (one grid)

_JUDGES: dict[str, mplug.MPlugJudge] = {}
_ITEMS: dict[str, dict[str, dpg.DpgItem]] = {}


def csv_path() -> Path:
    if os.environ.get(CSV_ENV):
        path = Path(os.environ[CSV_ENV]).expanduser()
    else:
        from evaluators.suites import resolve_data_path
        path = resolve_data_path(CSV_RELATIVE)
    if not path.is_file():
        raise FileNotFoundError(f"DPG-Bench questions {path} are missing: run `harness data fetch dpg` (it takes "
                                f"dpg_bench/dpg_bench.csv from TencentQQGYLab/ELLA) or set ${CSV_ENV}")
    return path


def items() -> dict[str, dpg.DpgItem]:
    path = csv_path()
    key = f"{path}:{path.stat().st_mtime_ns}"
    if key not in _ITEMS:
        _ITEMS[key] = dpg.load_dpg_csv(path, parity=True)
    return _ITEMS[key]


def check_ready() -> None:
    mplug.model_folder()
    csv_path()


def fast_mode() -> bool:
    return os.environ.get(FAST_ENV, "") not in ("", "0")


def judge() -> mplug.MPlugJudge:
    folder = mplug.model_folder()
    if str(folder) not in _JUDGES:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        _JUDGES[str(folder)] = mplug.MPlugJudge(*mplug.load_mplug(folder, device))   # fp32, as the official
    return _JUDGES[str(folder)]


def judge_identity(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.yaml", mplug.read_config(folder)["bert_config"], "vocab.txt"):
        h.update(name.encode() + b"\0" + (folder / name).read_bytes())
    stat = (folder / mplug.CHECKPOINT_NAME).stat()
    h.update(f"{stat.st_size}:{stat.st_mtime_ns}:{'fast' if fast_mode() else 'exact'}".encode())
    return h.hexdigest()


class AnswerCache:
    """(judge, image sha256, question) -> answer text, in SQLite; every put is committed."""

    def __init__(self, path: Path, judge_id: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path), timeout=60)
        self.conn.execute("CREATE TABLE IF NOT EXISTS answers (judge TEXT, image TEXT, question TEXT, answer TEXT, "
                          "score REAL, PRIMARY KEY (judge, image, question))")
        self.judge_id = judge_id

    def get(self, image: str, questions: list[str]) -> dict[str, str]:
        rows = self.conn.execute(f"SELECT question, answer FROM answers WHERE judge = ? AND image = ? AND question IN "
                                 f"({','.join('?' * len(questions))})", (self.judge_id, image, *questions))
        return dict(rows.fetchall())

    def put(self, image: str, answers: dict[str, mplug.Answer]) -> None:
        with self.conn:
            self.conn.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                                  [(self.judge_id, image, q, a.text, a.score) for q, a in answers.items()])

    def close(self) -> None:
        self.conn.close()


def image_hash(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array, dtype=np.uint8)
    return hashlib.sha256(f"{a.shape}".encode() + a.tobytes()).hexdigest()


def _item_of(s: Sample, table: dict[str, dpg.DpgItem]) -> tuple[dpg.DpgItem | None, str]:
    item_id = dpg.image_key(str(s.metadata.get("item_id", s.key.split("/")[0])))
    return table.get(item_id), item_id


def score_dpg(samples: list[Sample]) -> dict[str, dict]:
    vqa = judge()
    folder = mplug.model_folder()
    return score_with_judge(
        samples, lambda images, questions: vqa.answer_many(
            [Image.fromarray(np.asarray(image, dtype=np.uint8)) for image in images], questions, exact=not fast_mode()),
        judge_identity(folder))


def score_with_judge(samples: list[Sample], answer_many, identity: str) -> dict[str, dict]:
    """DPG records of tiles: each tile's questions (item looked up from its prompt), answers from the cache or
    answer_many(images, questions per image) -> answers (with .text) per image, then the official tile rule.
    `identity` keys the answer cache, so the answers of different judges never mix."""
    table = items()
    cache = AnswerCache(Path(os.environ.get(ANSWERS_ENV, "results/dpg_answers.sqlite")).expanduser(), identity)
    records: dict[str, dict] = {}
    try:
        for lo in range(0, len(samples), TILES_PER_CALL):
            part = samples[lo:lo + TILES_PER_CALL]
            todo, texts = [], {}
            for s in part:
                item, item_id = _item_of(s, table)
                if item is None:
                    continue
                h = image_hash(s.image)
                questions = list(dict.fromkeys(item.questions.values()))
                texts[s.key] = (h, cache.get(h, questions))
                missing = [q for q in questions if q not in texts[s.key][1]]
                if missing:
                    todo.append((s, h, missing))
            if todo:
                found = answer_many([s.image for s, _, _ in todo], [qs for _, _, qs in todo])
                for (s, h, qs), answers in zip(todo, found):
                    new = dict(zip(qs, answers))
                    cache.put(h, new)
                    texts[s.key][1].update({q: a.text for q, a in new.items()})
            for s in part:
                item, item_id = _item_of(s, table)
                tile = int(s.key.rsplit("/", 1)[-1]) if s.key.rsplit("/", 1)[-1].isdigit() else 0
                record = {"item_id": item_id, "tile": tile, "prompt": s.metadata.get("prompt", "")}
                if item is None:
                    record.update({"failed": f"no questions for item id {item_id!r} in dpg_bench.csv",
                                   "answers": {}, "yes": {}, "score": None})
                else:
                    said = texts[s.key][1]
                    answers = {qid: said[q] for qid, q in item.questions.items()}
                    yes = {qid: dpg.answer_is_yes(t) for qid, t in answers.items()}
                    try:
                        score = dpg.score_tile(item, yes)[0]
                    except dpg.MissingParentError:
                        score = None        # official: the image is left out (aggregate lists it as failed)
                    record.update({"answers": {str(k): v for k, v in answers.items()},
                                   "yes": {str(k): v for k, v in yes.items()}, "score": score})
                records[s.key] = record
    finally:
        cache.close()
    return records


def aggregate_dpg(records: list[dict]) -> list[Metric]:
    if not records:
        raise ValueError("dpg: no records to aggregate")
    table = items()
    tiles: dict[str, dict[int, dict[int, bool]]] = {}
    for r in records:
        tiles.setdefault(r["item_id"], {})[int(r["tile"])] = {int(k): bool(v) for k, v in r["yes"].items()}
    answers = {f"{item_id}.png": [t[k] for k in sorted(t)] for item_id, t in tiles.items() if item_id in table}
    summary = dpg.score_dpg(table, answers, parity=True)
    metrics = [Metric("dpg_overall", summary.score, stderr=_image_stderr(summary), n=len(summary.images), scale="0-100")]
    metrics += [Metric(f"dpg_{k}", v, scale="0-100") for k, v in summary.l1.items()]
    metrics += [Metric("dpg_" + k.replace(" - ", "_").replace(" ", "_"), v, scale="0-100")
                for k, v in summary.l2.items() if "dpg_" + k.replace(" - ", "_").replace(" ", "_")
                not in {f"dpg_{x}" for x in summary.l1}]
    left_out = len(tiles) - len(summary.images)
    metrics.append(Metric("dpg_images_left_out", float(left_out), scale="count", higher_is_better=False))
    return metrics


DPG = Evaluator(
    name="dpg", version="1",
    description="DPG-Bench: mPLUG-large VQA (damo/mplug_visual-question-answering_coco_large_en, native) answers "
                "dpg_bench.csv's questions per tile; official rules (dependency zeroing, tile -> image mean, "
                "categories from the last tile); overall = mean over images x 100.",
    score=score_dpg, aggregate=aggregate_dpg, reward_field="score", check_ready=check_ready)


def _image_stderr(summary) -> float | None:
    """Standard error of DPG's overall score (100 x the mean over images of each image's score)."""
    scores = [100.0 * image.score for image in summary.images.values()]
    return mean_and_stderr(scores)[1] if scores else None

