"""ImageReward v1.0 on transformers' BLIP modules, loading the official `ImageReward.pt` by its own key names.

The model (THUDM/ImageReward): BLIP's ViT-L/16 at 224 px encodes the image; BLIP's BERT-base text encoder reads
the prompt ([CLS] prompt [SEP], padded to 35 tokens, bert-base-uncased vocabulary) with cross-attention to every
image token; an MLP (768-1024-128-64-16-1, no activations) maps the [CLS] state to r, and the score is
(r - 0.16717362830052426) / 1.0333394966054072, so scores are roughly N(0, 1). Image transform: shortest side
to 224 (bicubic), centre crop, OpenAI CLIP mean / std (evaluators.clip_colors.preprocess).

Weights: the folder $HARNESS_IMAGEREWARD_DIR holding `ImageReward.pt` and `med_config.json` (both from the HF
repo THUDM/ImageReward, now zai-org/ImageReward), plus a bert-base-uncased tokenizer (`vocab.txt`) in that
folder or in $HARNESS_BERT_TOKENIZER_DIR. Nothing is downloaded. Key mapping onto transformers:
  blip.visual_encoder.{cls_token, pos_embed, patch_embed.proj}   -> embeddings.{class_embedding, position_embedding, patch_embedding}
  blip.visual_encoder.blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}
                                    -> encoder.layers.i.{layer_norm1, self_attn.qkv, self_attn.projection, layer_norm2, mlp.fc1, mlp.fc2}
  blip.visual_encoder.norm          -> post_layernorm        (BLIP's ViT uses LayerNorm eps 1e-6)
  blip.text_encoder.*               -> BlipTextModel with the same names (BLIP's med BERT is its source)
  mlp.layers.{0,2,4,6,7}            -> the same MLP as the LAION aesthetic head
blip.vision_proj / blip.text_proj (retrieval heads) are not used by the score.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evaluators import clip_colors
from evaluators.base import Evaluator, Sample
from evaluators.local_weights import renamed, weights_folder
from evaluators.preference import AestheticHead, mean_score_metric, score_records

DIR_ENV = "HARNESS_IMAGEREWARD_DIR"
TOKENIZER_ENV = "HARNESS_BERT_TOKENIZER_DIR"
HF_ID = "THUDM/ImageReward"
CHECKPOINT_NAME = "ImageReward.pt"
CONFIG_NAME = "med_config.json"
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TEXT_TOKENS = 35
IMAGE_SIZE = 224
VIT_EPS = 1e-6
BATCH = 16

_LOADED: dict[str, "ImageRewardModel"] = {}


def model_folder() -> Path:
    how = (f"download {CHECKPOINT_NAME} and {CONFIG_NAME} from the HF repo {HF_ID} (`huggingface-cli download {HF_ID} "
           f"{CHECKPOINT_NAME} {CONFIG_NAME} --local-dir DIR`) and set ${DIR_ENV}=DIR")
    return weights_folder(DIR_ENV, f"ImageReward ({HF_ID})", how, (CHECKPOINT_NAME, CONFIG_NAME))


def tokenizer_folder(folder: Path) -> Path:
    candidates = [folder] + ([Path(os.environ[TOKENIZER_ENV]).expanduser()] if os.environ.get(TOKENIZER_ENV) else [])
    for candidate in candidates:
        if (candidate / "vocab.txt").is_file():
            return candidate
    raise FileNotFoundError(f"no bert-base-uncased tokenizer: put its vocab.txt in {folder} or download "
                            f"'google-bert/bert-base-uncased' and set ${TOKENIZER_ENV} to its folder")


def check_files() -> None:
    tokenizer_folder(model_folder())


# --- the official checkpoint onto transformers' modules --------------------------------------------------------

VISION_RENAMES = [   # (official, transformers) on the names inside blip.visual_encoder.
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def split_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """(vision, text, mlp) state dicts in transformers' names; an unknown vision key is an error."""
    vision, text, mlp = {}, {}, {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder."):]
            new = renamed(name, VISION_RENAMES)
            if new is None:
                raise ValueError(f"unexpected vision key {key!r} in the ImageReward checkpoint")
            vision[new] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            text[key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp."):
            mlp[key[len("mlp."):]] = value
    return vision, text, mlp


class ImageRewardModel(torch.nn.Module):
    def __init__(self, vision, text, head: AestheticHead, tokenizer):
        super().__init__()
        self.vision, self.text, self.head = vision, text, head
        self.tokenizer = tokenizer

    @torch.no_grad()
    def forward(self, prompts: list[str], pixels: torch.Tensor) -> torch.Tensor:
        """Normalised ImageReward scores [B] for matching prompts and preprocessed images."""
        device = pixels.device
        image_states = self.vision(pixel_values=pixels).last_hidden_state
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS,
                                return_tensors="pt").to(device)
        text = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                         encoder_hidden_states=image_states,
                         encoder_attention_mask=torch.ones(image_states.shape[:-1], dtype=torch.long, device=device))
        reward = self.head(text.last_hidden_state[:, 0, :].float())
        return (reward - MEAN) / STD


def _require(state: dict, key: str, path: Path) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{path} has no {key!r}; is it ImageReward.pt from {HF_ID}?")
    return state[key]


def load_imagereward(folder: Path, device: str = "cpu") -> ImageRewardModel:
    """Build BLIP's towers at the checkpoint's sizes and load every weight (strictly)."""
    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    path = folder / CHECKPOINT_NAME
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict")
    med = json.loads((folder / CONFIG_NAME).read_text())
    vision_state, text_state, mlp_state = split_checkpoint(state)

    patch = _require(vision_state, "embeddings.patch_embedding.weight", path)
    width = patch.shape[0]
    depth = 1 + max(int(k.split(".")[2]) for k in vision_state if k.startswith("encoder.layers."))
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=width, intermediate_size=vision_state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth, num_attention_heads=width // 64,      # BLIP's ViT-B and ViT-L: 64 per head
        image_size=IMAGE_SIZE, patch_size=patch.shape[-1], layer_norm_eps=VIT_EPS))
    words = _require(text_state, "embeddings.word_embeddings.weight", path)
    text = BlipTextModel(BlipTextConfig(
        vocab_size=words.shape[0], hidden_size=words.shape[1], encoder_hidden_size=width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        layer_norm_eps=med["layer_norm_eps"], hidden_act=med.get("hidden_act", "gelu"),
        pad_token_id=med.get("pad_token_id", 0), bos_token_id=None, sep_token_id=None, eos_token_id=None),
        add_pooling_layer=False)
    head = AestheticHead(words.shape[1])
    for module, part, what in ((vision, vision_state, "vision"), (text, text_state, "text"), (head, mlp_state, "mlp")):
        missing, unexpected = module.load_state_dict(part, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"{path} does not fit ImageReward's {what} tower: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    tokenizer = BertTokenizer.from_pretrained(tokenizer_folder(folder), local_files_only=True)
    return ImageRewardModel(vision, text, head, tokenizer).eval().to(device)


def imagereward_model() -> ImageRewardModel:
    folder = model_folder()
    if str(folder) not in _LOADED:
        _LOADED[str(folder)] = load_imagereward(folder, "cuda" if torch.cuda.is_available() else "cpu")
    return _LOADED[str(folder)]


def score_imagereward(samples: list[Sample]) -> dict[str, dict]:
    model = imagereward_model()
    device = next(model.parameters()).device
    records = {}
    for i in range(0, len(samples), BATCH):
        part = samples[i:i + BATCH]
        pixels = torch.stack([clip_colors.preprocess(Image.fromarray(np.asarray(s.image, dtype=np.uint8)), IMAGE_SIZE)
                              for s in part]).to(device)
        records.update(score_records(part, model([s.metadata["prompt"] for s in part], pixels).cpu()))
    return records


IMAGEREWARD = Evaluator(
    name="imagereward", version="1",
    description="ImageReward v1.0 (BLIP ViT-L + BERT cross-attention + MLP), normalised as the official scorer; "
                "mean over images.",
    score=score_imagereward, aggregate=mean_score_metric("imagereward", "~N(0,1)"), reward_field="score", check_ready=check_files)
