"""The official GenEval evaluator on real images: Mask2Former (mmdet) -> CLIP colours -> GenEval's rules.

Per image: the detector lists every instance (evaluators/mmdet_backend.py); the engine picks the objects whose
colour the official scorer would classify (geneval.colors_needed); the CLIP ViT-L/14 classifier names their
colours (evaluators/clip_colors.py); the engine decides correct/incorrect (geneval.score_detections). Records
are official results.jsonl lines; metrics are summary_scores.py's (overall = mean of the six tag accuracies).

Models load on first use and stay cached in this module:
  $HARNESS_GENEVAL_MODELS  folder holding mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth
  $HARNESS_CLIP_DIR        local copy of openai/clip-vit-large-patch14
  $HARNESS_GENEVAL_DEVICE  "cpu" (default) or e.g. "cuda"; mmcv must then be compiled with CUDA ops

Importing this module fails with ImportError when mmdet or compiled mmcv is missing, and `check_models` fails
when a model file is, so a suite or reward that uses "geneval" stops before generating any image
(evaluators/run.py and trainers/rewards.py resolve evaluators first).
"""
from __future__ import annotations

import importlib.util
import os

from evaluators import clip_colors, geneval, mmdet_backend
from evaluators.base import Evaluator, Metric, Sample
from evaluators.coco_prompts import TAGS

_MISSING = mmdet_backend.missing_dependencies()
if _MISSING is None and importlib.util.find_spec("transformers") is None:
    _MISSING = "transformers (the CLIP colour classifier) is not installed"
if _MISSING is not None:
    raise ImportError(f"the GenEval detector backend is not available: {_MISSING}. Install it with `make mmdet` "
                      f"(compiles mmcv 2.1.0 once, about 10-20 min on 2 cores, then installs mmdet 3.3.0)")

DEVICE_ENV = "HARNESS_GENEVAL_DEVICE"
_DETECTOR = None            # mmdet model, loaded on first use
_COLOR_CLASSIFIER = None    # clip_colors.ColorClassifier, loaded on first use


def _device() -> str:
    return os.environ.get(DEVICE_ENV, "cpu")


def detector():
    """The cached Mask2Former (loaded from $HARNESS_GENEVAL_MODELS on first call)."""
    global _DETECTOR
    if _DETECTOR is None:
        _DETECTOR = mmdet_backend.load_detector(device=_device())
    return _DETECTOR


def color_classifier() -> clip_colors.ColorClassifier:
    """The cached CLIP colour classifier (loaded from $HARNESS_CLIP_DIR on first call)."""
    global _COLOR_CLASSIFIER
    if _COLOR_CLASSIFIER is None:
        _COLOR_CLASSIFIER = clip_colors.load_clip(device=_device())
    return _COLOR_CLASSIFIER


def check_models() -> None:
    """The detector checkpoint and the CLIP folder are where they should be (or already loaded); cheap."""
    if _DETECTOR is None:
        mmdet_backend.checkpoint_path()
    if _COLOR_CLASSIFIER is None:
        clip_colors.clip_dir()


def score_image(sample: Sample) -> dict:
    """The official results.jsonl record of one image (filename = sample key)."""
    geneval.check_metadata(sample.metadata, f"sample {sample.key!r}")
    if sample.metadata["tag"] not in TAGS:
        raise ValueError(f"geneval: sample {sample.key!r} has tag {sample.metadata['tag']!r}; GenEval scores the "
                         f"tags {', '.join(TAGS)}")
    detections = mmdet_backend.detect(detector(), sample.image)
    needed = geneval.colors_needed(sample.metadata, detections)
    if needed:
        colors = clip_colors.classify_colors(color_classifier(), sample.image, [detections[i] for i in needed])
        for i, color in zip(needed, colors):
            detections[i]["color"] = color
    correct, reason = geneval.score_detections(sample.metadata, detections)
    details = geneval.kept_details(sample.metadata, detections)
    return geneval.results_record(sample.key, sample.metadata, correct, reason, details)


def score_geneval(samples: list[Sample]) -> dict[str, dict]:
    return {s.key: score_image(s) for s in samples}


def aggregate_geneval(records: list[dict]) -> list[Metric]:
    """summary_scores.py: overall (mean of tag accuracies), each tag, correct images and correct prompts."""
    if not records:
        raise ValueError("geneval: no records to aggregate (was the sample list empty?)")
    return geneval.summary_metrics(records)


GENEVAL = Evaluator(
    name="geneval", version="1",
    description="Official GenEval: mmdet Mask2Former Swin-S detector, CLIP ViT-L/14 colour classifier, official "
                "thresholds and correctness rule; overall = mean of the six tag accuracies.",
    score=score_geneval, aggregate=aggregate_geneval, reward_field="correct", check_ready=check_models)
