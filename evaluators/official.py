"""Evaluators that run an official implementation in its own env (harness/envs.py) as a worker process
(harness/worker.py): the exact official numbers, and the parity oracle of our native scorers.

| evaluator | env | worker | same files and records as |
|---|---|---|---|
| `dpg-official` | dpg-official (modelscope 1.40.2 MPlug) | harness/workers/dpg_worker.py | `dpg` |
| `imagereward-official` | imagereward-official (image-reward 1.5) | workers/imagereward_worker.py | `imagereward` |
| `hpsv2-official` | hpsv2-official (PyPI hpsv2 1.2.0) | harness/workers/hpsv2_worker.py | `hpsv21` |

Each is a plain registered Evaluator: its score function writes the samples as PNG files, sends one request per
batch and returns records only once the whole batch is answered, so evaluators/run.py stores complete answers
or nothing. A missing env is reported by check_ready, before any image is drawn (`harness env build NAME`).
$HARNESS_WORKER_TIMEOUT (seconds per request) and $HARNESS_WORKER_THREADS (torch threads of the worker) tune them.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from evaluators.base import Evaluator, Sample
from harness import envs, worker

WORKERS = Path(__file__).resolve().parent.parent / "harness" / "workers"
THREADS_ENV = "HARNESS_WORKER_THREADS"


def _threads() -> str:
    raw = os.environ.get(THREADS_ENV)
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"${THREADS_ENV} must be a whole number >= 1, got {raw!r}")
        return raw
    import torch
    return str(torch.get_num_threads())


def start(env_name: str, script: str) -> worker.Worker:
    """The shared worker of `env_name` (started on first use; a one-line error when the env is not built)."""
    return worker.shared([envs.require(env_name), WORKERS / script, _threads()], name=env_name)


def _complete(result, n: int, what: str, per_item=None) -> list:
    """A batch answer with one entry per item (and per question), or a WorkerError: never half of one."""
    if not isinstance(result, list) or len(result) != n:
        raise worker.WorkerError(f"worker {what} answered {len(result) if isinstance(result, list) else result!r} "
                                 f"items for a batch of {n}; nothing stored")
    if per_item is not None:
        for i, (row, want) in enumerate(zip(result, per_item)):
            if not isinstance(row, list) or len(row) != want:
                raise worker.WorkerError(f"worker {what} answered item {i} incompletely; nothing stored")
    return result


# --- dpg-official: modelscope's MPlug answers DPG-Bench's questions --------------------------------------------

DPG_TIMEOUT = 3600.0     # one request = one chunk of tiles, every question asked anew (~10 s each on a CPU)


class OfficialJudge:
    """mplug.MPlugJudge's answer_many, answered by modelscope's own model in the dpg-official worker."""

    def __init__(self, folder: Path):
        self.folder = folder

    def answer_many(self, images: list[np.ndarray], questions: list[list[str]]):
        from evaluators.mplug import Answer
        w = start("dpg-official", "dpg_worker.py")
        with worker.png_files(images) as paths:
            result = w.request("answer", {"model_dir": str(self.folder.resolve()),
                                          "items": [{"image": p, "questions": q} for p, q in zip(paths, questions)]},
                               timeout=DPG_TIMEOUT)
        rows = _complete(result, len(images), "dpg-official", [len(q) for q in questions])
        return [[Answer(text=a["text"], ids=list(a["ids"]), score=float(a["score"])) for a in row] for row in rows]


def check_dpg_official() -> None:
    from evaluators import dpg_judge, mplug
    envs.require("dpg-official")
    mplug.model_folder()
    dpg_judge.csv_path()


def score_dpg_official(samples: list[Sample]) -> dict[str, dict]:
    """dpg_judge's records (same item lookup, answer cache, official tile rule), answered by the worker. The cache
    keys its answers by a judge identity of its own, so official and native answers never mix."""
    from evaluators import dpg_judge, mplug
    folder = mplug.model_folder()
    judge = OfficialJudge(folder)
    identity = hashlib.sha256(f"dpg-official:{dpg_judge.judge_identity(folder)}:"
                              f"{envs.recipe('dpg-official').digest()}".encode()).hexdigest()
    return dpg_judge.score_with_judge(samples, judge.answer_many, identity)


def _aggregate_dpg(records):
    from evaluators import dpg_judge
    return dpg_judge.aggregate_dpg(records)


DPG_OFFICIAL = Evaluator(
    name="dpg-official", version="1",
    description="DPG-Bench with modelscope 1.40.2's own MPlug VQA (env dpg-official, one question at a time as the "
                "official pipeline); official rules; same model folder ($HARNESS_MPLUG_DIR) and records as `dpg`.",
    score=score_dpg_official, aggregate=_aggregate_dpg, reward_field="score", check_ready=check_dpg_official)


# --- imagereward-official: ImageReward.load + score ------------------------------------------------------------

IMAGEREWARD_TIMEOUT = 1800.0
VIT_LARGE = {"width": 1024, "depth": 24, "heads": 16, "patch": 16}     # what ImageReward.load builds
_VIT_OF: dict[tuple, dict | None] = {}


def checkpoint_vit(path: Path) -> dict | None:
    """The ViT size of an ImageReward checkpoint, None when it is the ViT-L the package hard-codes (memory-mapped:
    only the shapes are read)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _VIT_OF:
        import torch
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        patch = state.get("blip.visual_encoder.patch_embed.proj.weight")
        if patch is None:
            raise ValueError(f"{path} has no 'blip.visual_encoder.patch_embed.proj.weight'; is it ImageReward.pt?")
        width = int(patch.shape[0])
        depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("blip.visual_encoder.blocks."))
        vit = {"width": width, "depth": depth, "heads": width // 64, "patch": int(patch.shape[-1])}
        _VIT_OF[key] = None if vit == VIT_LARGE else vit
        del state
    return _VIT_OF[key]


def check_imagereward_official() -> None:
    from evaluators import imagereward
    envs.require("imagereward-official")
    imagereward.check_files()


def score_imagereward_official(samples: list[Sample]) -> dict[str, dict]:
    from evaluators import imagereward
    from evaluators.preference import score_records
    folder = imagereward.model_folder()
    checkpoint = folder / imagereward.CHECKPOINT_NAME
    args = {"checkpoint": str(checkpoint.resolve()), "med_config": str((folder / imagereward.CONFIG_NAME).resolve()),
            "tokenizer_dir": str(imagereward.tokenizer_folder(folder).resolve()), "vit": checkpoint_vit(checkpoint)}
    w = start("imagereward-official", "imagereward_worker.py")
    records: dict[str, dict] = {}
    for lo in range(0, len(samples), imagereward.BATCH):
        part = samples[lo:lo + imagereward.BATCH]
        with worker.png_files([s.image for s in part]) as paths:
            result = w.request("score", {**args, "items": [{"image": p, "prompt": s.metadata["prompt"]}
                                                          for p, s in zip(paths, part)]}, timeout=IMAGEREWARD_TIMEOUT)
        records.update(score_records(part, _complete(result, len(part), "imagereward-official")))
    return records


def _mean(name: str, scale: str):
    def aggregate(records):
        from evaluators.preference import mean_score_metric
        return mean_score_metric(name, scale)(records)
    return aggregate


IMAGEREWARD_OFFICIAL = Evaluator(
    name="imagereward-official", version="1",
    description="ImageReward v1.0 by the PyPI image-reward 1.5 package itself (env imagereward-official: "
                "ImageReward.load + score); same files ($HARNESS_IMAGEREWARD_DIR) and records as `imagereward`.",
    score=score_imagereward_official, aggregate=_mean("imagereward-official", "~N(0,1)"), reward_field="score",
    check_ready=check_imagereward_official)


# --- hpsv2-official: hpsv2's open_clip ViT-H-14 and img_score's scoring path -----------------------------------

HPS_TIMEOUT = 1800.0
HPS_MODEL_ENV = "HARNESS_HPS_OFFICIAL_MODEL"   # an open_clip model config JSON instead of ViT-H-14 (tests)


def check_hpsv2_official() -> None:
    from evaluators import hps
    envs.require("hpsv2-official")
    hps.checkpoint_path()


def score_hpsv2_official(samples: list[Sample]) -> dict[str, dict]:
    from evaluators import hps
    from evaluators.preference import score_records
    args = {"checkpoint": str(hps.checkpoint_path().resolve()), "model_config": os.environ.get(HPS_MODEL_ENV)}
    w = start("hpsv2-official", "hpsv2_worker.py")
    records: dict[str, dict] = {}
    for lo in range(0, len(samples), hps.BATCH):
        part = samples[lo:lo + hps.BATCH]
        with worker.png_files([s.image for s in part]) as paths:
            result = w.request("score", {**args, "items": [{"image": p, "prompt": s.metadata["prompt"]}
                                                          for p, s in zip(paths, part)]}, timeout=HPS_TIMEOUT)
        values = _complete(result, len(part), "hpsv2-official")
        records.update(score_records(part, [100.0 * v for v in values]))     # the tables' scale, as hpsv21
    return records


HPSV2_OFFICIAL = Evaluator(
    name="hpsv2-official", version="1",
    description="HPS v2.1 by the PyPI hpsv2 1.2.0 package's own scoring path (env hpsv2-official: its open_clip "
                "ViT-H-14, preprocess_val, cosine of normalised features) x 100; same checkpoint "
                "($HARNESS_HPS_CHECKPOINT) and records as `hpsv21`.",
    score=score_hpsv2_official, aggregate=_mean("hpsv2-official", "100 x cos"), reward_field="score",
    check_ready=check_hpsv2_official)
