"""HPSv2.1 on transformers' CLIPModel, loading the official open_clip checkpoint by its own key names.

HPS v2 / v2.1 (tgxs002/HPSv2) is OpenCLIP ViT-H-14 fine-tuned on human preferences; the score of an image for
its prompt is the cosine of the two normalised embeddings (`hpsv2.score`), and the benchmark tables report
100 x that. Our records and metric use the table scale (100 x cos; SDXL base scores ~30.6 on v2.1).
Image transform (open_clip's val transform with HPS's ResizeMaxSize): to a [0, 1] tensor, the longest side to
224 (bicubic, antialiased), zero padding centred to 224 x 224, OpenAI CLIP mean / std. fp16 autocast on CUDA, as
the reference scores under amp. Text: open_clip's tokenizer, i.e. the OpenAI cleaning (ftfy, html.unescape,
whitespace, lower case; evaluators.clip_colors.openai_clean) before BPE, 77 tokens with the end-of-text token kept.

Weights: $HARNESS_HPS_CHECKPOINT = `HPS_v2.1_compressed.pt` from the HF repo xswu/HPSv2 (a dict whose
'state_dict' holds open_clip names); the tokenizer is OpenAI CLIP's BPE (open_clip's ViT-H-14 uses it), read from
$HARNESS_CLIP_DIR (the folder GenEval's colour classifier uses) or $HARNESS_HPS_TOKENIZER_DIR. Nothing is
downloaded. Key mapping onto transformers (W = width, E = embedding size):
  visual.conv1 / class_embedding / positional_embedding / ln_pre / ln_post -> vision_model.embeddings.{patch_embedding,
      class_embedding, position_embedding} / pre_layrnorm / post_layernorm
  visual.proj [W, E] -> visual_projection.weight [E, W];  text_projection [W, E] -> text_projection.weight [E, W]
  token_embedding / positional_embedding / ln_final -> text_model.embeddings.{token,position}_embedding / final_layer_norm
  *.transformer.resblocks.i.{ln_1, ln_2, mlp.c_fc, mlp.c_proj, attn.out_proj} -> *.encoder.layers.i.{layer_norm1,
      layer_norm2, mlp.fc1, mlp.fc2, self_attn.out_proj};  attn.in_proj_{weight,bias} -> q_proj / k_proj / v_proj (thirds)
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evaluators import clip_colors
from evaluators.base import Evaluator, Sample
from evaluators.local_weights import weights_file
from evaluators.preference import mean_score_metric, score_records

CHECKPOINT_ENV = "HARNESS_HPS_CHECKPOINT"
TOKENIZER_ENV = "HARNESS_HPS_TOKENIZER_DIR"
HF_ID = "xswu/HPSv2"
CHECKPOINT_NAME = "HPS_v2.1_compressed.pt"
IMAGE_SIZE = 224
# Attention head widths of open_clip's ViT-H-14 (open_clip/src/open_clip/model_configs/ViT-H-14.json, the copy in
# tgxs002/HPSv2 hpsv2/src/open_clip/model_configs/ViT-H-14.json is the same): vision_cfg "head_width": 80, so
# 1280 / 80 = 16 heads; text_cfg "heads": 16 for width 1024, i.e. 64 per head. Head counts are not in the
# checkpoint's shapes, so they come from here; a width they do not divide is an error, not a guess.
VISION_HEAD_WIDTH = 80
TEXT_HEAD_WIDTH = 64
BATCH = 16

_LOADED: dict[str, tuple] = {}


def checkpoint_path() -> Path:
    return weights_file(CHECKPOINT_ENV, f"HPSv2.1 checkpoint ({CHECKPOINT_NAME})",
                        f"download {CHECKPOINT_NAME} from the HF repo {HF_ID} and set ${CHECKPOINT_ENV} to the file")


def tokenizer_folder() -> Path:
    raw = os.environ.get(TOKENIZER_ENV)
    if raw:
        return Path(raw).expanduser()
    return clip_colors.clip_dir()      # names $HARNESS_CLIP_DIR and how to fill it when missing


def check_files() -> None:
    checkpoint_path()
    tokenizer_folder()


# --- the open_clip checkpoint onto transformers' CLIPModel -----------------------------------------------------

BLOCK_RENAMES = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2.",
                 "attn.out_proj.": "self_attn.out_proj."}
TOP_RENAMES = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
               "visual.class_embedding": "vision_model.embeddings.class_embedding",
               "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
               "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
               "positional_embedding": "text_model.embeddings.position_embedding.weight",
               "logit_scale": "logit_scale"}
TOP_PREFIXES = {"visual.ln_pre.": "vision_model.pre_layrnorm.", "visual.ln_post.": "vision_model.post_layernorm.",
                "ln_final.": "text_model.final_layer_norm."}


def open_clip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPModel state dict from an open_clip one; an unknown key is an error, not a silent skip."""
    out = {}
    for key, value in state.items():
        block = re.match(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$", key)
        if block:
            tower = "vision_model" if block.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{block.group(2)}.", block.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{rest.rsplit('_', 1)[1]}"] = part.clone()
                continue
            for old, new in BLOCK_RENAMES.items():
                if rest.startswith(old):
                    out[prefix + new + rest[len(old):]] = value
                    break
            else:
                raise ValueError(f"unexpected block key {key!r} in the HPS checkpoint")
        elif key in TOP_RENAMES:
            out[TOP_RENAMES[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key == "attn_mask":
            continue                      # open_clip's causal mask buffer, rebuilt by transformers
        elif any(key.startswith(p) for p in TOP_PREFIXES):
            p = next(p for p in TOP_PREFIXES if key.startswith(p))
            out[TOP_PREFIXES[p] + key[len(p):]] = value
        else:
            raise ValueError(f"unexpected key {key!r} in the HPS checkpoint (not an open_clip CLIP)")
    return out


def _layers(state: dict, prefix: str) -> int:
    return 1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k)))


def _heads(width: int, head_width: int, tower: str) -> int:
    if width % head_width:
        raise ValueError(f"the HPS checkpoint's {tower} width {width} is not a multiple of open_clip ViT-H-14's head "
                         f"width {head_width}: not the ViT-H-14 HPS v2.1 is built on")
    return width // head_width


def hps_config(state: dict[str, torch.Tensor], tokenizer):
    """transformers CLIPConfig for a (transformers-named) HPS state dict: sizes from the tensors' shapes, head
    counts from open_clip's ViT-H-14 head widths. Works on meta tensors."""
    from transformers import CLIPConfig

    patch = state["vision_model.embeddings.patch_embedding.weight"]
    positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
    words = state["text_model.embeddings.token_embedding.weight"]
    vision_width, text_width = patch.shape[0], words.shape[1]
    return CLIPConfig(
        vision_config=dict(hidden_size=vision_width, num_attention_heads=_heads(vision_width, VISION_HEAD_WIDTH, "vision"),
                           intermediate_size=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                           num_hidden_layers=_layers(state, "vision_model.encoder.layers."), patch_size=patch.shape[-1],
                           image_size=patch.shape[-1] * round((positions - 1) ** 0.5), hidden_act="gelu"),
        text_config=dict(hidden_size=text_width, num_attention_heads=_heads(text_width, TEXT_HEAD_WIDTH, "text"),
                         vocab_size=words.shape[0],
                         intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                         num_hidden_layers=_layers(state, "text_model.encoder.layers."), hidden_act="gelu",
                         max_position_embeddings=state["text_model.embeddings.position_embedding.weight"].shape[0],
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        projection_dim=state["visual_projection.weight"].shape[0])


def load_hps(path: Path, tokenizer_dir: Path, device: str = "cpu"):
    """(CLIPModel, tokenizer) with every weight of the checkpoint loaded (strictly)."""
    from transformers import CLIPModel, CLIPTokenizer

    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or "visual.conv1.weight" not in {k.removeprefix("module.") for k in state}:
        raise ValueError(f"{path} is not an open_clip checkpoint (no 'visual.conv1.weight' in its state_dict)")
    state = open_clip_to_transformers({k.removeprefix("module."): v for k, v in state.items()})
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    model = CLIPModel(hps_config(state, tokenizer))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the CLIP it describes: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval().to(device), tokenizer


def hps_model():
    path = checkpoint_path()
    if str(path) not in _LOADED:
        _LOADED[str(path)] = load_hps(path, tokenizer_folder(), "cuda" if torch.cuda.is_available() else "cpu")
    return _LOADED[str(path)]


def preprocess(image: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """HPS's val transform: [0, 1] tensor, longest side to `size` (bicubic, antialiased), centred zero padding,
    OpenAI mean / std. Returns [3, size, size]."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    height, width = pixels.shape[1:]
    scale = size / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    if (new_h, new_w) != (height, width):     # ResizeMaxSize leaves an image whose longest side is `size` as it is
        pixels = F.interpolate(pixels[None], size=(new_h, new_w), mode="bicubic", align_corners=False,
                               antialias=True)[0]
    pad_h, pad_w = size - new_h, size - new_w
    pixels = F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    mean = torch.tensor(clip_colors.OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(clip_colors.OPENAI_STD).view(3, 1, 1)
    return (pixels - mean) / std


@torch.no_grad()
def score_hps(samples: list[Sample]) -> dict[str, dict]:
    model, tokenizer = hps_model()
    device = next(model.parameters()).device
    values = []
    for i in range(0, len(samples), BATCH):
        part = samples[i:i + BATCH]
        pixels = torch.stack([preprocess(s.image, model.config.vision_config.image_size) for s in part]).to(device)
        tokens = clip_colors.tokenize(tokenizer, [s.metadata["prompt"] for s in part], clean=True, truncation="eot",
                                      context=model.config.text_config.max_position_embeddings, padding="max_length")
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            image = clip_colors.projected_features(model.get_image_features(pixel_values=pixels)).float()
            text = clip_colors.projected_features(model.get_text_features(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device))).float()
        values.append(100.0 * (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1).cpu())
    return score_records(samples, torch.cat(values) if values else torch.zeros(0))


HPSV21 = Evaluator(
    name="hpsv21", version="2",          # no dot in the name: config overrides use dotted paths
    # version 2: 16 vision heads of 80 (was 20 of 64), the open_clip text cleaning
    description="HPS v2.1: 100 x cos(prompt, image) with the preference-tuned OpenCLIP ViT-H-14 (the benchmark "
                "tables' scale); mean over images.",
    score=score_hps, aggregate=mean_score_metric("hpsv21", "~20-35 (100 x cos)"), reward_field="score",
    check_ready=check_files)
