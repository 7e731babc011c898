"""GenEval's colour classifier: zero-shot CLIP ViT-L/14 over ten colours (docs: evaluators.md 1.7).

For each object whose colour matters, the image is composited onto a #999999 grey canvas through the instance
mask (so only the object's own pixels stay), cropped to the object's box, and classified by CLIP against one
text classifier per class name: for each colour, the three official templates are embedded, each embedding is
L2-normalised, the three are averaged and the mean is normalised again. Prediction = argmax of 100 * cosine.

The weights are the HF port of OpenAI's CLIP ViT-L/14 (`openai/clip-vit-large-patch14`), read from a local
folder (argument or $HARNESS_CLIP_DIR); nothing is downloaded. The official scorer uses open_clip's "ViT-L-14"
with pretrained="openai", the same weights. Its image transform (shortest side to 224 bicubic, centre crop,
OpenAI mean/std) is reproduced here with PIL, so no torchvision is needed, and its text goes through the
open_clip / OpenAI CLIP cleaning (`openai_clean`) before BPE.

The helpers here serve every CLIP-family scorer, each with its own official rules:
  image  `preprocess(..., rule=TORCHVISION)`: torchvision's Resize(224, BICUBIC) + CenterCrop(224) on a PIL image
         (OpenAI CLIP's `_transform`, open_clip's val transform, ImageReward, Hessel's CLIPScore): new long side
         int(224 * long / short), crop offset int(round((side - 224) / 2.0));
         `rule=HF_PROCESSOR`: transformers' CLIPImageProcessor (PickScore's AutoProcessor, torchmetrics'
         CLIPProcessor): the same resize (int truncation, PIL bicubic in its PIL backend) but crop offset
         (side - 224) // 2, so sides with (side - 224) % 4 == 3 land one pixel apart from torchvision.
  text   `openai_clean` = ftfy.fix_text, html.unescape twice, strip, whitespace runs to one space, lower case:
         what open_clip's and OpenAI's SimpleTokenizer do before BPE; transformers' CLIPTokenizer only does NFC,
         whitespace and lower case, so curly quotes, `&amp;` or ligatures get other ids without it.
         truncation "eot" keeps the end-of-text token at position 76 (open_clip, `clip.tokenize(truncate=True)`,
         the HF tokenizer with truncation=True); "slice" cuts the ids at 77 as torchmetrics' CLIPScore does.
"""
from __future__ import annotations

import copy
import html
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from evaluators.coco_prompts import COLORS

CLIP_HF_ID = "openai/clip-vit-large-patch14"
CLIP_DIR_ENV = "HARNESS_CLIP_DIR"
# GenEval's templates; {classname} is the COCO class, {c} the colour.
COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} {classname}",
    "a photo of a {c}-colored {classname}",
    "a photo of a {c} object",
)
BACKGROUND_RGB = (0x99, 0x99, 0x99)   # GenEval's bgcolor "#999"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
LOGIT_SCALE = 100.0                   # clip_benchmark's fixed 100 * cos (not the model's learnt logit scale)
CONTEXT_LENGTH = 77                   # every CLIP text tower here (open_clip model_configs "context_length": 77)
TORCHVISION = "torchvision"           # image rules, see the module docstring
HF_PROCESSOR = "hf-processor"
IMAGE_RULES = (TORCHVISION, HF_PROCESSOR)
TRUNCATIONS = ("eot", "slice")


@dataclass
class ColorClassifier:
    """A loaded CLIP model and its tokenizer (the preference scorers use it too), plus the per-class-name colour
    classifiers built so far."""
    model: Any                          # transformers CLIPModel, eval mode
    tokenizer: Any                      # CLIPTokenizer from the same folder
    device: str = "cpu"
    classifiers: dict[str, torch.Tensor] = field(default_factory=dict)   # class name -> [D, len(COLORS)]

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)


# --- loading ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClipWeights:
    """A CLIP model read from a local folder: the variable naming the folder and the HF model to put in it."""
    env: str
    hf_id: str

    def folder(self, path: str | os.PathLike | None = None) -> Path:
        """`path`, else $env; FileNotFoundError saying how to get the model."""
        from evaluators.local_weights import weights_folder
        how = (f"download the HF model {self.hf_id!r} once (e.g. `huggingface-cli download {self.hf_id} "
               f"--local-dir DIR`) and pass its folder or set ${self.env}=DIR")
        return weights_folder(self.env, self.hf_id, how, ("config.json",), path)


CLIP_L14 = ClipWeights(CLIP_DIR_ENV, CLIP_HF_ID)


def clip_dir(path: str | os.PathLike | None = None) -> Path:
    """The local CLIP ViT-L/14 folder: `path`, else $HARNESS_CLIP_DIR."""
    return CLIP_L14.folder(path)


def load_clip(path: str | os.PathLike | None = None, device: str = "cpu",
              tokenizer_path: str | os.PathLike | None = None) -> ColorClassifier:
    """CLIPModel + CLIPTokenizer from a local folder (no network), float32, eval mode. tokenizer_path: a
    different folder for the tokenizer (PickScore's weights come without one)."""
    from transformers import CLIPModel, CLIPTokenizer

    folder = clip_dir(path)
    model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32).to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_path or folder, local_files_only=True)
    return ColorClassifier(model=model, tokenizer=tokenizer, device=device)


# --- crops ------------------------------------------------------------------------------------------------------

def masked_crop(image: np.ndarray | Image.Image, mask: np.ndarray, bbox) -> Image.Image:
    """The object's pixels on a #999999 canvas, cropped to its box (PIL rounds the float box, as GenEval's
    `.crop(bbox[:4])` does). A box that rounds to zero width or height is widened to one pixel so that a
    degenerate detection cannot stop a whole evaluation."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    picture = picture.convert("RGB")
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (picture.height, picture.width):
        raise ValueError(f"mask shape {mask.shape} does not match the image ({picture.height}, {picture.width})")
    canvas = Image.new("RGB", picture.size, BACKGROUND_RGB)
    composite = Image.composite(picture, canvas, Image.fromarray(mask.astype(np.uint8) * 255, mode="L"))
    x1, y1, x2, y2 = (round(float(v)) for v in bbox[:4])
    return composite.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side at `size` and the longer one int(size * long / short): torchvision's
    Resize(int) (_compute_resized_output_size) and transformers' get_resize_output_image_size alike."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def crop_offset(side: int, size: int, rule: str = TORCHVISION) -> int:
    """Where a centre crop of `size` starts in `side`: torchvision's CenterCrop int(round((side - size) / 2.0))
    (round half to even), transformers' center_crop (side - size) // 2."""
    if rule == TORCHVISION:
        return int(round((side - size) / 2.0))
    if rule == HF_PROCESSOR:
        return (side - size) // 2
    raise ValueError(f"unknown image rule {rule!r}; known: {', '.join(IMAGE_RULES)}")


def preprocess(crop: Image.Image, size: int, rule: str = TORCHVISION) -> torch.Tensor:
    """Shortest side to `size` (PIL bicubic), centre crop (offset by `rule`), [0, 1], OpenAI mean / std.
    rule=TORCHVISION: the OpenAI / open_clip val transform; rule=HF_PROCESSOR: CLIPImageProcessor (PIL backend),
    which also rescales as float64 * (1 / 255) before casting. Returns [3, size, size] float32."""
    if rule not in IMAGE_RULES:
        raise ValueError(f"unknown image rule {rule!r}; known: {', '.join(IMAGE_RULES)}")
    picture = crop.convert("RGB")
    new_size = resized_size(picture.width, picture.height, size)
    resized = picture if new_size == picture.size else picture.resize(new_size, Image.BICUBIC)
    left = crop_offset(resized.width, size, rule)
    top = crop_offset(resized.height, size, rule)
    square = np.asarray(resized.crop((left, top, left + size, top + size)))
    if rule == HF_PROCESSOR:
        scaled = (square.astype(np.float64) * (1 / 255)).astype(np.float32)
    else:
        scaled = square.astype(np.float32) / np.float32(255.0)
    pixels = torch.from_numpy(scaled).permute(2, 0, 1)
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    return (pixels - mean) / std


# --- text -------------------------------------------------------------------------------------------------------

def openai_clean(text: str) -> str:
    """The text OpenAI's / open_clip's SimpleTokenizer feeds to BPE: ftfy.fix_text, html.unescape twice, strip;
    whitespace runs (the `regex` module's \\s) to one space, strip; lower case."""
    import ftfy
    import regex

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


_RAW_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def raw_tokenizer(tokenizer):
    """A copy of a tokenizers-backed CLIPTokenizer without its normaliser (NFC, whitespace, lower case), for text
    that `openai_clean` already normalised the official way; the original is left as it is (it may be shared with
    a scorer that tokenises with the plain HF rules). A tokenizer without a backend is returned as it is."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return tokenizer
    if tokenizer not in _RAW_TOKENIZERS:
        raw = copy.deepcopy(tokenizer)
        raw.backend_tokenizer.normalizer = None
        _RAW_TOKENIZERS[tokenizer] = raw
    return _RAW_TOKENIZERS[tokenizer]


def tokenize(tokenizer, texts: list[str], *, clean: bool = False, truncation: str = "eot",
             context: int = CONTEXT_LENGTH, padding: str | bool = True) -> dict[str, torch.Tensor]:
    """{"input_ids", "attention_mask"} for a CLIP text tower. clean: the official open_clip / OpenAI cleaning
    first (then no HF normaliser); truncation "eot": at most `context` tokens, the last one end-of-text;
    "slice": tokenised whole, then ids and mask cut at `context` (torchmetrics' CLIPScore; a prompt longer than
    that loses its end-of-text token)."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"unknown truncation {truncation!r}; known: {', '.join(TRUNCATIONS)}")
    if clean:
        texts, tokenizer = [openai_clean(t) for t in texts], raw_tokenizer(tokenizer)
    if truncation == "eot":
        tokens = tokenizer(texts, padding=padding, truncation=True, max_length=context, return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    tokens = tokenizer(texts, padding=padding, return_tensors="pt")
    return {"input_ids": tokens["input_ids"][..., :context], "attention_mask": tokens["attention_mask"][..., :context]}


# --- embeddings -------------------------------------------------------------------------------------------------

def projected_features(output: Any) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and an output with the projected pooler_output in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def text_embeddings(clf: ColorClassifier, texts: list[str], clean: bool = False, truncation: str = "eot") -> torch.Tensor:
    """L2-normalised CLIP text embeddings [len(texts), D]; `clean` and `truncation` as in `tokenize`."""
    context = int(clf.model.config.text_config.max_position_embeddings)
    tokens = tokenize(clf.tokenizer, texts, clean=clean, truncation=truncation, context=context)
    features = projected_features(clf.model.get_text_features(input_ids=tokens["input_ids"].to(clf.device),
                                                     attention_mask=tokens["attention_mask"].to(clf.device)))
    return torch.nn.functional.normalize(features.float(), dim=-1)


@torch.no_grad()
def image_embeddings(clf: ColorClassifier, crops: list[Image.Image], fp16_on_cuda: bool = True,
                     rule: str = TORCHVISION) -> torch.Tensor:
    """L2-normalised CLIP image embeddings [len(crops), D]; by default fp16 autocast on CUDA like GenEval's
    amp=True (scorers whose reference runs in float32 pass fp16_on_cuda=False); `rule` as in `preprocess`."""
    pixels = torch.stack([preprocess(c, clf.image_size, rule) for c in crops]).to(clf.device)
    with torch.autocast("cuda", dtype=torch.float16, enabled=fp16_on_cuda and str(clf.device).startswith("cuda")):
        features = projected_features(clf.model.get_image_features(pixel_values=pixels))
    return torch.nn.functional.normalize(features.float(), dim=-1)


def color_classifier(clf: ColorClassifier, classname: str) -> torch.Tensor:
    """Zero-shot weights [D, len(COLORS)] for one class name, built once and cached on `clf`."""
    if classname not in clf.classifiers:
        columns = []
        for color in COLORS:
            # open_clip's tokenizer cleans the text (a no-op on these ASCII templates, kept for exactness)
            texts = [openai_clean(t.format(c=color, classname=classname)) for t in COLOR_TEMPLATES]
            mean = text_embeddings(clf, texts).mean(dim=0)
            columns.append(mean / mean.norm())
        clf.classifiers[classname] = torch.stack(columns, dim=1)
    return clf.classifiers[classname]


def color_logits(clf: ColorClassifier, classname: str, crops: list[Image.Image]) -> torch.Tensor:
    """100 * cos(image, colour) for crops of objects of one class: [len(crops), len(COLORS)]."""
    weights = color_classifier(clf, classname)
    return LOGIT_SCALE * image_embeddings(clf, crops) @ weights.to(clf.device)


def classify_colors(clf: ColorClassifier, image: np.ndarray | Image.Image, detections: list[dict]) -> list[str]:
    """The colour name of each detection ({"class", "bbox", "mask"}), in order."""
    by_class: dict[str, list[int]] = {}
    for i, det in enumerate(detections):
        by_class.setdefault(det["class"], []).append(i)
    colors: list[str] = [""] * len(detections)
    for classname, indices in by_class.items():
        crops = [masked_crop(image, detections[i]["mask"], detections[i]["bbox"]) for i in indices]
        best = color_logits(clf, classname, crops).argmax(dim=1).tolist()
        for i, k in zip(indices, best):
            colors[i] = COLORS[k]
    return colors
