"""HPSv3 on transformers' Qwen2-VL, loading the official `HPSv3.safetensors` by its own key names.

HPSv3 (MizzenAI/HPSv3, ICCV 2025) is Qwen2-VL-7B-Instruct fine-tuned as a reward model: one user turn holds the
image and the text instruction.format(text_prompt=<prompt>) + suffix, where the suffix ends in the added special
token <|Reward|>; a head MLP (H-1024, ReLU, Dropout, 1024-16, ReLU, 16-2; float32) reads the language model's
last hidden state at that token and gives (mu, log sigma). The score is mu: unbounded, roughly -1..12 for
current generators (HT-GRPO's Table 3: 8.8-12.5). Facts from ../shared/docs/metrics_vlm.md section 2, checked
against the hpsv3 1.0.0 wheel:
- the language model runs with plain sequential positions 0..L-1 on all three M-RoPE axes (the official forward
  calls the decoder without position ids, so it never uses Qwen2-VL's 3D image positions); we pass them explicitly;
- images: RGB, resized (bicubic) to Qwen's smart_resize with min = max = 256 x 28 x 28 pixels (a square becomes
  448 x 448), then the base model's image processor; chat template of the base model with the generation prompt;
  right padding;
- the checkpoint uses the transformers <= 4.51 layout (`model.layers...`, `visual...`), renamed here to
  `model.language_model...` / `model.visual...`; `rm_head.{0,3,5}` is the head.

Files (nothing is downloaded): $HARNESS_HPSV3_DIR holds HPSv3.safetensors; $HARNESS_QWEN2VL_DIR holds the small
files of Qwen/Qwen2-VL-7B-Instruct (config.json, tokenizer, preprocessor and chat template; its weights are not
read); the instruction text comes from `harness data fetch hpsv3` (<data>/hpsv3/instruction.json), since it is
the official model input and is not ours to copy.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evaluators.base import Evaluator, Sample
from evaluators.local_weights import build_in, fetched_json, loaded_once, weights_folder
from evaluators.preference import mean_score_metric, score_records

DIR_ENV = "HARNESS_HPSV3_DIR"
BASE_ENV = "HARNESS_QWEN2VL_DIR"
HF_ID = "MizzenAI/HPSv3"
BASE_HF_ID = "Qwen/Qwen2-VL-7B-Instruct"
CHECKPOINT_NAME = "HPSv3.safetensors"
REWARD_TOKEN = "<|Reward|>"
IMAGE_TOKEN = "<|image_pad|>"
PIXELS = 256 * 28 * 28          # min = max pixels of the official inference
FACTOR = 28                     # patch 14 x spatial merge 2
BATCH = 8

_LOADED: dict[str, tuple] = {}


def checkpoint_path() -> Path:
    how = f"download {CHECKPOINT_NAME} from the HF repo {HF_ID} into a folder and set ${DIR_ENV} to it"
    return weights_folder(DIR_ENV, f"HPSv3 ({HF_ID})", how, (CHECKPOINT_NAME,)) / CHECKPOINT_NAME


def base_folder() -> Path:
    how = (f"download the small files of {BASE_HF_ID} (`huggingface-cli download {BASE_HF_ID} --exclude '*.safetensors' "
           f"--local-dir DIR`) and set ${BASE_ENV}=DIR")
    return weights_folder(BASE_ENV, f"the config, tokenizer and processor of {BASE_HF_ID}", how,
                          ("config.json", "preprocessor_config.json"))


def instruction() -> dict[str, str]:
    texts = fetched_json("hpsv3/instruction.json", "hpsv3")
    if REWARD_TOKEN not in texts.get("suffix", "") or "{text_prompt}" not in texts.get("instruction", ""):
        raise ValueError(f"hpsv3/instruction.json is not the HPSv3 instruction (no {REWARD_TOKEN} / {{text_prompt}}); "
                         f"fetch it again")
    return texts


def check_files() -> None:
    checkpoint_path()
    base_folder()
    instruction()


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = PIXELS,
                 max_pixels: int = PIXELS) -> tuple[int, int]:
    """Qwen2-VL's rule: both sides multiples of `factor`, the area within [min_pixels, max_pixels], the aspect
    ratio kept as closely as that allows."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


# --- the official checkpoint onto transformers' Qwen2-VL ------------------------------------------------------

def rename_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(model state in transformers 5 names, head state): `visual.` -> `model.visual.`, `model.` ->
    `model.language_model.`; keys already in the new layout pass unchanged."""
    model, head = {}, {}
    for key, value in state.items():
        if key.startswith("rm_head."):
            head[key[len("rm_head."):]] = value
        elif key.startswith("visual."):
            model["model." + key] = value
        elif re.match(r"^model\.(?!language_model\.|visual\.)", key):
            model["model.language_model." + key[len("model."):]] = value
        else:
            model[key] = value
    return model, head


def reward_head(hidden: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(hidden, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def load_hpsv3(path: Path, base: Path, device: str = "cpu", dtype: torch.dtype = torch.bfloat16):
    """(model, head, ModelInputs): the base config with the reward token added, every weight from the checkpoint."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    # the parts of Qwen2VLProcessor we need (the class itself also builds a video processor, which needs torchvision)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True, padding_side="right")
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    inputs = ModelInputs(tokenizer, Qwen2VLImageProcessor.from_pretrained(base, local_files_only=True),
                         chat_template(base, tokenizer))
    state, head_state = rename_checkpoint(load_file(str(path)))
    config = AutoConfig.from_pretrained(base, local_files_only=True)
    rows = state.get("model.language_model.embed_tokens.weight")
    if rows is None or rows.shape[0] != len(tokenizer):
        raise ValueError(f"{path} does not fit {base}: its embedding has "
                         f"{None if rows is None else rows.shape[0]} rows, the tokenizer with {REWARD_TOKEN} has "
                         f"{len(tokenizer)} tokens")
    config.text_config.vocab_size = rows.shape[0]
    model = build_in(Qwen2VLForConditionalGeneration, config, device, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {BASE_HF_ID}'s architecture: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    head = reward_head(config.text_config.hidden_size)      # float32, as the official head
    try:
        head.load_state_dict(head_state)
    except RuntimeError as e:
        raise ValueError(f"{path}: its rm_head does not fit the RankNet head ({e})") from None
    return model.eval(), head.to(device).eval(), inputs


def hpsv3_model():
    path, base = checkpoint_path(), base_folder()
    return loaded_once(_LOADED, str(path), lambda device, dtype: load_hpsv3(path, base, device, dtype))


def chat_template(base: Path, tokenizer) -> str:
    """The base model's chat template: the tokenizer's, else chat_template.jinja / chat_template.json."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if (base / "chat_template.jinja").is_file():
        return (base / "chat_template.jinja").read_text()
    if (base / "chat_template.json").is_file():
        return json.loads((base / "chat_template.json").read_text())["chat_template"]
    raise FileNotFoundError(f"{base} has no chat template (tokenizer_config.json, chat_template.jinja or .json)")


@dataclass
class ModelInputs:
    """Builds the official model input: one user turn [image, instruction + suffix] under the chat template with
    the generation prompt, the image resized by smart_resize then Qwen2-VL's image processor, its
    <|image_pad|> expanded to one token per merged patch, right padding."""
    tokenizer: object
    image_processor: object
    template: str

    def __call__(self, prompts: list[str], images: list[np.ndarray], texts: dict[str, str]) -> dict:
        conversations = [[{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": texts["instruction"].format(text_prompt=p) + texts["suffix"]}]}]
            for p in prompts]
        pictures = []
        for array in images:
            picture = Image.fromarray(np.asarray(array, dtype=np.uint8)).convert("RGB")
            h, w = smart_resize(picture.height, picture.width)
            pictures.append(picture.resize((w, h), Image.BICUBIC))
        vision = self.image_processor(images=pictures, return_tensors="pt")
        per_image = (vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size ** 2).tolist()
        chats = [self.tokenizer.apply_chat_template(c, chat_template=self.template, tokenize=False,
                                                    add_generation_prompt=True) for c in conversations]
        for text in chats:
            if text.count(IMAGE_TOKEN) != 1:
                raise ValueError(f"the chat template gave {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} for one image")
        chats = [t.replace(IMAGE_TOKEN, IMAGE_TOKEN * n) for t, n in zip(chats, per_image)]
        tokens = self.tokenizer(chats, padding=True, return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                "pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}


@torch.no_grad()
def hpsv3_scores(model, head, inputs: ModelInputs, prompts: list[str], images: list[np.ndarray],
                 texts: dict[str, str]) -> torch.Tensor:
    """mu for each (prompt, image): the head on the last hidden state at the reward token."""
    batch = inputs(prompts, images, texts)
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    reward_id = inputs.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    at = ids == reward_id
    if not (at.sum(1) == 1).all():
        raise ValueError(f"each HPSv3 input must hold {REWARD_TOKEN} exactly once; got {at.sum(1).tolist()}")
    # sequential positions on all three M-RoPE axes, as the official forward (see the module docstring)
    positions = torch.arange(ids.shape[1], device=device).view(1, 1, -1).expand(3, ids.shape[0], -1)
    hidden = model.model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), position_ids=positions,
                         pixel_values=batch["pixel_values"].to(device, next(model.parameters()).dtype),
                         image_grid_thw=batch["image_grid_thw"].to(device)).last_hidden_state
    return head(hidden[at].float())[:, 0]


def score_hpsv3(samples: list[Sample]) -> dict[str, dict]:
    model, head, inputs = hpsv3_model()
    texts = instruction()
    values = [hpsv3_scores(model, head, inputs, [s.metadata["prompt"] for s in samples[i:i + BATCH]],
                           [s.image for s in samples[i:i + BATCH]], texts).cpu()
              for i in range(0, len(samples), BATCH)]
    return score_records(samples, torch.cat(values) if values else torch.zeros(0))


HPSV3 = Evaluator(
    name="hpsv3", version="1",
    description="HPSv3 (Qwen2-VL-7B reward model): mu at the <|Reward|> token; mean over images.",
    score=score_hpsv3, aggregate=mean_score_metric("hpsv3", "~-1..12 (mu)"), reward_field="score",
    check_ready=check_files)
