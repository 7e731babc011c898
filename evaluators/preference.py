"""CLIP-family preference and quality scorers on real images: PickScore, three CLIPScores, LAION aesthetic v2.

Definitions (the official ones; ../shared/docs/evaluators.md section 3), per image with its prompt:
  pickscore         logit_scale.exp() * cos(text, image) with PickScore_v1 (CLIP-H fine-tuned on Pick-a-Pic);
                    typically 18-24
  clipscore         torchmetrics' CLIPScore exactly: 100 * cos(text, image) with openai/clip-vit-large-patch14;
                    the metric is max(mean, 0), the clamp after the mean as in torchmetrics; 0-100. Like
                    torchmetrics it cuts a prompt of more than 77 tokens at 77 ids, end-of-text token included,
                    so the text tower pools some other token (an 86-token DPG prompt: 7.2 instead of 1.7)
  clipscore-eot     the same, but a long prompt is truncated keeping its end-of-text token (what open_clip and
                    OpenAI's `clip.tokenize(truncate=True)` do); equal to clipscore for prompts of <= 77 tokens
  clipscore-hessel  Hessel et al. 2021: 2.5 * max(cos, 0) with ViT-B/32 and the caption prefix
                    "A photo depicts "; 0-2.5
  laion-aesthetic   improved-aesthetic-predictor v2: MLP 768-1024-128-64-16-1 (no activations) on the
                    L2-normalised CLIP ViT-L/14 image embedding (sac+logos+ava1-l14-linearMSE.pth); ~1-10
The CLIPScore name says the variant because the two scales are the most common mix-up in papers.

Each scorer follows its own official preprocessing (`ClipProtocol`, rules in evaluators/clip_colors.py):
  scorer            official code                         image rule     text cleaning     long prompts
  pickscore         PickScore README (HF AutoProcessor)   HF processor   HF only           truncate, keep EOT
  clipscore         torchmetrics clip_score.py            HF processor   HF only           ids[..., :77]
  clipscore-eot     (torchmetrics, corrected)             HF processor   HF only           truncate, keep EOT
  clipscore-hessel  jmhessel/clipscore clipscore.py       torchvision    ftfy/html (clip)  truncate, keep EOT
  laion-aesthetic   improved-aesthetic-predictor          torchvision    (no text)
The HF processor rule is transformers' CLIPImageProcessor in its PIL backend (the only one in transformers 4,
the fallback without torchvision in 5); its torchvision backend resizes with torch's bicubic instead.

Weights are local folders named by environment variables (nothing is downloaded); a missing one is reported,
with how to get it, before any image is drawn (Evaluator.check_ready). Images are scored in float32, except
where the reference implementation runs fp16 on CUDA (Hessel's and the aesthetic predictor's `clip.load`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evaluators import clip_colors
from evaluators.base import Evaluator, Metric, Sample, mean_and_stderr
from evaluators.local_weights import weights_file

AESTHETIC_HEAD_ENV = "HARNESS_AESTHETIC_HEAD"
AESTHETIC_HEAD_NAME = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_HEAD_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                      + AESTHETIC_HEAD_NAME.replace("+", "%2B"))
PICKSCORE_TOKENIZER_ENV = "HARNESS_PICKSCORE_TOKENIZER_DIR"
BATCH = 32


PICKSCORE_WEIGHTS = clip_colors.ClipWeights("HARNESS_PICKSCORE_DIR", "yuvalkirstain/PickScore_v1")
CLIP_L14_WEIGHTS = clip_colors.CLIP_L14          # the same weights as GenEval's colour classifier
CLIP_B32_WEIGHTS = clip_colors.ClipWeights("HARNESS_CLIP_B32_DIR", "openai/clip-vit-base-patch32")

_LOADED: dict[tuple, object] = {}      # (what, folder) -> loaded model, so a run loads each once


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pickscore_tokenizer_folder(weights_folder: Path) -> Path:
    """PickScore_v1 ships without a tokenizer (its authors load laion/CLIP-ViT-H-14-laion2B-s32B-b79K's):
    the weights folder if it has one, else $HARNESS_PICKSCORE_TOKENIZER_DIR."""
    if any((weights_folder / n).is_file() for n in ("tokenizer.json", "vocab.json")):
        return weights_folder
    raw = os.environ.get(PICKSCORE_TOKENIZER_ENV)
    if raw and any((Path(raw).expanduser() / n).is_file() for n in ("tokenizer.json", "vocab.json")):
        return Path(raw).expanduser()
    raise FileNotFoundError(f"{weights_folder} has no tokenizer (PickScore_v1 ships none): download "
                            f"'laion/CLIP-ViT-H-14-laion2B-s32B-b79K' and set ${PICKSCORE_TOKENIZER_ENV} to its folder")


def clip_model(weights: clip_colors.ClipWeights) -> clip_colors.ColorClassifier:
    folder = weights.folder()
    key = ("clip", str(folder))
    if key not in _LOADED:
        tokenizer = pickscore_tokenizer_folder(folder) if weights is PICKSCORE_WEIGHTS else None
        _LOADED[key] = clip_colors.load_clip(folder, device=_device(), tokenizer_path=tokenizer)
    return _LOADED[key]


def aesthetic_head_path() -> Path:
    return weights_file(AESTHETIC_HEAD_ENV, f"LAION aesthetic head ({AESTHETIC_HEAD_NAME})",
                        f"download {AESTHETIC_HEAD_URL} and set ${AESTHETIC_HEAD_ENV} to the file")


class AestheticHead(torch.nn.Module):
    """The predictor's MLP; the dropouts keep the official key names (layers.0, .2, .4, .6, .7)."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding).squeeze(-1)


def load_aesthetic_head(path: Path, dim: int) -> AestheticHead:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    head = AestheticHead(dim)
    expected = head.state_dict()
    if not isinstance(state, dict) or set(state) != set(expected):
        got = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not the LAION aesthetic predictor's MLP: expected keys {sorted(expected)}, got {got}")
    if state["layers.0.weight"].shape != expected["layers.0.weight"].shape:
        raise ValueError(f"{path} takes {state['layers.0.weight'].shape[1]}-dim embeddings but the CLIP model gives "
                         f"{dim} (the head belongs to CLIP ViT-L/14, 768)")
    head.load_state_dict(state)
    return head.eval().to(_device())


def aesthetic_head(clip: clip_colors.ColorClassifier) -> AestheticHead:
    path = aesthetic_head_path()
    key = ("aesthetic", str(path))
    if key not in _LOADED:
        _LOADED[key] = load_aesthetic_head(path, int(clip.model.config.projection_dim))
    return _LOADED[key]


# --- scoring ------------------------------------------------------------------------------------------------------

def _pictures(samples: list[Sample]) -> list[Image.Image]:
    return [Image.fromarray(np.asarray(s.image, dtype=np.uint8)) for s in samples]


@dataclass(frozen=True)
class ClipProtocol:
    """How one official scorer turns (prompt, image) into CLIP inputs (rules: evaluators/clip_colors.py)."""
    image_rule: str                 # clip_colors.TORCHVISION or clip_colors.HF_PROCESSOR
    clean_text: bool                # OpenAI / open_clip text cleaning (ftfy, html) before BPE
    truncation: str = "eot"         # "eot": keep the end-of-text token; "slice": torchmetrics' ids[..., :77]
    prefix: str = ""                # put before the prompt
    fp16_on_cuda: bool = False      # fp16 image tower on CUDA, as the reference's clip.load


# PickScore README: AutoProcessor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, text padding=True, truncation=True,
# max_length=77
PICKSCORE_PROTOCOL = ClipProtocol(image_rule=clip_colors.HF_PROCESSOR, clean_text=False, truncation="eot")
# torchmetrics functional/multimodal/clip_score.py _get_features: CLIPProcessor(text, padding=True), then
# input_ids / attention_mask [..., :max_position_embeddings]
CLIPSCORE_PROTOCOL = ClipProtocol(image_rule=clip_colors.HF_PROCESSOR, clean_text=False, truncation="slice")
CLIPSCORE_EOT_PROTOCOL = ClipProtocol(image_rule=clip_colors.HF_PROCESSOR, clean_text=False, truncation="eot")
# jmhessel/clipscore clipscore.py: CLIPCapDataset prefix 'A photo depicts' + ' ', clip.tokenize(truncate=True);
# CLIPImageDataset Resize(224, BICUBIC), CenterCrop(224) on PIL; fp16 images on CUDA
HESSEL_PROTOCOL = ClipProtocol(image_rule=clip_colors.TORCHVISION, clean_text=True, truncation="eot",
                               prefix="A photo depicts ", fp16_on_cuda=True)
# improved-aesthetic-predictor simple_inference.py: clip.load("ViT-L/14") preprocess (torchvision), fp16 on CUDA
AESTHETIC_PROTOCOL = ClipProtocol(image_rule=clip_colors.TORCHVISION, clean_text=False, fp16_on_cuda=True)


def cosines(clip: clip_colors.ColorClassifier, samples: list[Sample], protocol: ClipProtocol) -> torch.Tensor:
    """cos(text of each sample's prompt, its image), [len(samples)], in batches, by the scorer's protocol."""
    out = []
    for i in range(0, len(samples), BATCH):
        part = samples[i:i + BATCH]
        texts = clip_colors.text_embeddings(clip, [protocol.prefix + s.metadata["prompt"] for s in part],
                                            clean=protocol.clean_text, truncation=protocol.truncation)
        images = clip_colors.image_embeddings(clip, _pictures(part), fp16_on_cuda=protocol.fp16_on_cuda,
                                              rule=protocol.image_rule)
        out.append((texts * images).sum(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def score_records(samples: list[Sample], values) -> dict[str, dict]:
    """{sample key: {prompt, score}} for one score per sample, in order."""
    values = values.tolist() if isinstance(values, torch.Tensor) else values
    return {s.key: {"prompt": s.metadata["prompt"], "score": float(v)} for s, v in zip(samples, values)}


@torch.no_grad()
def score_pickscore(samples: list[Sample]) -> dict[str, dict]:
    clip = clip_model(PICKSCORE_WEIGHTS)
    return score_records(samples, clip.model.logit_scale.exp().cpu() * cosines(clip, samples, PICKSCORE_PROTOCOL))


def score_clipscore(samples: list[Sample]) -> dict[str, dict]:
    return score_records(samples, 100.0 * cosines(clip_model(CLIP_L14_WEIGHTS), samples, CLIPSCORE_PROTOCOL))


def score_clipscore_eot(samples: list[Sample]) -> dict[str, dict]:
    return score_records(samples, 100.0 * cosines(clip_model(CLIP_L14_WEIGHTS), samples, CLIPSCORE_EOT_PROTOCOL))


def score_clipscore_hessel(samples: list[Sample]) -> dict[str, dict]:
    cos = cosines(clip_model(CLIP_B32_WEIGHTS), samples, HESSEL_PROTOCOL)
    return score_records(samples, 2.5 * cos.clamp(min=0))


@torch.no_grad()
def score_aesthetic(samples: list[Sample]) -> dict[str, dict]:
    clip = clip_model(CLIP_L14_WEIGHTS)
    head = aesthetic_head(clip)
    values = []
    for i in range(0, len(samples), BATCH):
        embedding = clip_colors.image_embeddings(clip, _pictures(samples[i:i + BATCH]),
                                                 fp16_on_cuda=AESTHETIC_PROTOCOL.fp16_on_cuda,
                                                 rule=AESTHETIC_PROTOCOL.image_rule)
        values.append(head(embedding.to(next(head.parameters()).device)).float().cpu())
    return score_records(samples, torch.cat(values) if values else torch.zeros(0))


def mean_score_metric(name: str, scale: str, clamp_at_zero: bool = False):
    """An aggregate: the mean of the records' scores as one metric (clamped at 0 after the mean if asked)."""
    def aggregate(records: list[dict]) -> list[Metric]:
        if not records:
            raise ValueError(f"{name}: no records to aggregate (was the sample list empty?)")
        mean, se, n = mean_and_stderr(r["score"] for r in records)
        return [Metric(name, max(mean, 0.0) if clamp_at_zero else mean, scale=scale, stderr=se, n=n)]
    return aggregate


def _check(*weights: clip_colors.ClipWeights, head: bool = False):
    def check() -> None:
        for w in weights:
            folder = w.folder()
            if w is PICKSCORE_WEIGHTS:
                pickscore_tokenizer_folder(folder)
        if head:
            aesthetic_head_path()
    return check


# version 2: the official preprocessing of each scorer (HF processor's floor crop for pickscore / clipscore,
# the OpenAI text cleaning for clipscore-hessel, torchmetrics' 77-id slice for clipscore)
PICKSCORE = Evaluator(
    name="pickscore", version="2",
    description="PickScore_v1: logit_scale.exp() * cos(prompt, image), CLIP-H fine-tuned on Pick-a-Pic; mean over images.",
    score=score_pickscore, aggregate=mean_score_metric("pickscore", "~18-24"), reward_field="score",
    check_ready=_check(PICKSCORE_WEIGHTS))
CLIPSCORE = Evaluator(
    name="clipscore", version="2",
    description="CLIPScore exactly as torchmetrics: 100 * cos(prompt, image), CLIP ViT-L/14; metric = max(mean, 0); "
                "a prompt over 77 tokens is cut at 77 ids, losing its end-of-text token, as torchmetrics does "
                "(see clipscore-eot).",
    score=score_clipscore, aggregate=mean_score_metric("clipscore", "0-100", clamp_at_zero=True), reward_field="score",
    check_ready=_check(CLIP_L14_WEIGHTS))
CLIPSCORE_EOT = Evaluator(
    name="clipscore-eot", version="1",
    description="CLIPScore (torchmetrics' definition, corrected): as clipscore, but a prompt over 77 tokens is "
                "truncated keeping its end-of-text token; equal to clipscore on prompts of <= 77 tokens.",
    score=score_clipscore_eot, aggregate=mean_score_metric("clipscore_eot", "0-100", clamp_at_zero=True),
    reward_field="score", check_ready=_check(CLIP_L14_WEIGHTS))
CLIPSCORE_HESSEL = Evaluator(
    name="clipscore-hessel", version="2",
    description="CLIPScore (Hessel et al. 2021): 2.5 * max(cos, 0), CLIP ViT-B/32, caption 'A photo depicts <prompt>'.",
    score=score_clipscore_hessel, aggregate=mean_score_metric("clipscore_hessel", "0-2.5"), reward_field="score",
    check_ready=_check(CLIP_B32_WEIGHTS))
LAION_AESTHETIC = Evaluator(
    name="laion-aesthetic", version="1",
    description="LAION aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE) on the normalised CLIP ViT-L/14 "
                "image embedding; mean over images.",
    score=score_aesthetic, aggregate=mean_score_metric("laion_aesthetic", "~1-10"), reward_field="score",
    check_ready=_check(CLIP_L14_WEIGHTS, head=True))
