"""UniPercept aesthetics / quality / structure on transformers' InternVL, from the official checkpoint.

UniPercept (arXiv 2512.21675) is InternVL3-8B trained to rate images; HT-GRPO's Table 3 reports its three
dimensions on a 0-100 scale. "Token as score": one forward pass per image and dimension; the next-token
distribution after the question, restricted to 101 two-letter tokens (aa..az = 0..25, ca..cy = 26..50,
da..dy = 51..75, ea..ey = 76..100), gives score = softmax(logits[those]) @ [0..100] (float32 here; the official
code rounds it to bf16). The question names the dimension ("aesthetics", "quality", "structure and texture
richness"); conversation format internvl2_5: <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n
{question}<|im_end|>\\n<|im_start|>assistant\\n, with <image> replaced by <img> + <IMG_CONTEXT> x 256 + </img>.
Image: squashed to 448 x 448 (bicubic, aspect ignored, one tile), ImageNet mean / std.
Facts from ../shared/docs/metrics_vlm.md section 4, checked against the unipercept-reward 1.0.3 wheel.

Files (nothing is downloaded): $HARNESS_UNIPERCEPT_DIR = the HF repo Thunderbolt215215/UniPercept (config.json,
*.safetensors in InternVL's own layout, tokenizer); the question and default system message come from
`harness data fetch unipercept` (<data>/unipercept/prompts.json), read from the pinned official wheel; a
`system_message` key in config.json overrides that default even when null (official: the text "None"). Every part
is built in the dtype asked for, whatever torch_dtype the config's sub-dicts carry. The
checkpoint is mapped onto transformers' InternVLForConditionalGeneration (names as transformers' InternVL
conversion script: vision_model -> model.vision_tower, attn.qkv split into q/k/v, ls1/ls2 -> lambda_1/2,
norm1/2 -> layernorm_before/after, attn.proj -> attention.projection_layer, mlp1.{0,1,3} ->
multi_modal_projector.{layer_norm,linear_1,linear_2}, language_model.model -> model.language_model).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evaluators.base import Evaluator, Sample
from evaluators.local_weights import build_in, fetched_json, loaded_once, renamed, weights_folder
from evaluators.preference import mean_score_metric, score_records

DIR_ENV = "HARNESS_UNIPERCEPT_DIR"
HF_ID = "Thunderbolt215215/UniPercept"
DIMENSIONS = {"aesthetics": "aesthetics", "quality": "quality", "structure": "structure and texture richness"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_TOKEN, IMAGE_START, IMAGE_END = "<IMG_CONTEXT>", "<img>", "</img>"
BATCH = 8

_LOADED: dict[str, tuple] = {}


def score_tokens() -> list[str]:
    """The 101 score tokens: score n -> two letters (there is no 'b' block)."""
    blocks = [("a", 0, 25), ("c", 26, 50), ("d", 51, 75), ("e", 76, 100)]
    return [first + chr(ord("a") + n - lo) for first, lo, hi in blocks for n in range(lo, hi + 1)]


def model_folder() -> Path:
    how = f"download the HF repo {HF_ID} (gated: accept its terms first) and set ${DIR_ENV} to its folder"
    folder = weights_folder(DIR_ENV, f"UniPercept ({HF_ID})", how, ("config.json",))
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder} has no *.safetensors weights (expected {HF_ID}): {how}")
    return folder


def prompts() -> dict[str, str]:
    texts = fetched_json("unipercept/prompts.json", "unipercept")
    if "{desc}" not in texts.get("question", "") or "<image>" not in texts["question"]:
        raise ValueError("unipercept/prompts.json is not the UniPercept question (no {desc} / <image>); fetch it again")
    return texts


def check_files() -> None:
    model_folder()
    prompts()


# --- the InternVL checkpoint onto transformers' InternVL --------------------------------------------------------

VISION_RENAMES = [   # (InternVL name after "vision_model.", transformers name after "model.vision_tower.")
    (r"^embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"^embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"^embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"^encoder\.layers\.(\d+)\.ls1$", r"encoder.layer.\1.lambda_1"),
    (r"^encoder\.layers\.(\d+)\.ls2$", r"encoder.layer.\1.lambda_2"),
    (r"^encoder\.layers\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
    (r"^encoder\.layers\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"^encoder\.layers\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.projection_layer."),
    (r"^encoder\.layers\.(\d+)\.attn\.q_norm\.", r"encoder.layer.\1.attention.q_norm."),
    (r"^encoder\.layers\.(\d+)\.attn\.k_norm\.", r"encoder.layer.\1.attention.k_norm."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"encoder.layer.\1.mlp."),
]
PROJECTOR = {"mlp1.0.": "model.multi_modal_projector.layer_norm.", "mlp1.1.": "model.multi_modal_projector.linear_1.",
             "mlp1.3.": "model.multi_modal_projector.linear_2."}


def convert_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith("vision_model."):
            name = key[len("vision_model."):]
            qkv = re.match(r"^encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$", name)
            if qkv:
                prefix = f"model.vision_tower.encoder.layer.{qkv.group(1)}.attention."
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}{part}.{qkv.group(2)}"] = chunk.clone()
                continue
            new = renamed(name, VISION_RENAMES)
            if new is None:
                raise ValueError(f"unexpected vision key {key!r} in the UniPercept checkpoint")
            out["model.vision_tower." + new] = value
        elif key.startswith("mlp1."):
            head = next((p for p in PROJECTOR if key.startswith(p)), None)
            if head is None:
                raise ValueError(f"unexpected projector key {key!r} in the UniPercept checkpoint")
            out[PROJECTOR[head] + key[len(head):]] = value
        elif key.startswith("language_model.model."):
            out["model.language_model." + key[len("language_model.model."):]] = value
        elif key == "language_model.lm_head.weight":
            out["lm_head.weight"] = value
        else:
            raise ValueError(f"unexpected key {key!r} in the UniPercept checkpoint (not InternVL-chat)")
    return out


# Keys of InternVL-chat's llm_config that are not architecture: the class and remote-code entries, and the dtype
# and attention backend the checkpoint was saved with. Copying `torch_dtype` / `dtype` would make transformers
# build the language model in that dtype beside a vision tower in the dtype asked for (bf16 LLM + float32 ViT
# crashes on the CPU / float32 path); the dtype asked for at load time is the one every part gets.
LLM_CONFIG_DROPPED = ("architectures", "auto_map", "_name_or_path", "torch_dtype", "dtype", "use_bfloat16",
                      "attn_implementation", "_attn_implementation")

# InternViT's config defaults, for keys a config.json leaves out (OpenGVLab/InternVL @ 2410d1dbf208f0e799459aff9376e5747dbf41a2,
# internvl_chat/internvl/model/internvl_chat/configuration_intern_vit.py, InternVisionConfig.__init__; the released
# InternVL3 / UniPercept configs set all of them explicitly: qkv_bias true, qk_normalization false, layer_norm).
INTERNVIT_DEFAULTS = {"qkv_bias": False, "qk_normalization": True, "norm_type": "rms_norm", "layer_norm_eps": 1e-6,
                      "hidden_act": "gelu"}


def image_size(original: dict) -> int:
    """The tile size: InternVL-chat uses `force_image_size or vision_config.image_size` (modeling_internvl_chat.py
    and UniPercept's modeling_unipercept.py, InternVLChatModel.__init__)."""
    size = original["vision_config"]["image_size"]
    forced = original.get("force_image_size") or size
    if forced != size:
        raise ValueError(f"force_image_size {forced} != vision_config.image_size {size}: position-embedding "
                         "interpolation is not implemented here")
    return size


def num_image_token(original: dict) -> int:
    """<IMG_CONTEXT> tokens per tile, as InternVL-chat: int((size // patch) ** 2 * downsample_ratio ** 2) (256 for
    InternVL3: 448 px, patch 14, ratio 0.5)."""
    patch = original["vision_config"]["patch_size"]
    return int((image_size(original) // patch) ** 2 * original.get("downsample_ratio", 0.5) ** 2)


def system_message(original: dict, default) -> str:
    """The system text InternVL-chat puts in the internvl2_5 template. The official model reads it with
    `hasattr(config, "system_message")` (OpenGVLab/InternVL @ 2410d1d, modeling_internvl_chat.py L98-101; thunderbolt215/UniPercept
    @ 34660fffc4a1bf3f6b815ae38adb5edea26a20b1, src/internvl/model/internvl_chat/modeling_unipercept.py L98-101): a
    `system_message` key in config.json wins even when it is null or empty, and the template formats it with
    str.format, so null becomes the text "None". Only a config without the key gets the template's default.
    `default` is a callable giving that default (read only when needed)."""
    if "system_message" in original:
        return "{}".format(original["system_message"])
    return default()


def transformers_config(original: dict, image_token_id: int):
    """transformers' InternVLConfig from InternVL-chat's config.json."""
    from transformers import InternVLConfig
    if original.get("ps_version", "v1") != "v2":
        raise ValueError(f"ps_version {original.get('ps_version')!r}: transformers' InternVL implements 'v2' only")
    vision, llm = {**INTERNVIT_DEFAULTS, **original["vision_config"]}, dict(original["llm_config"])
    size, patch = image_size(original), vision["patch_size"]
    vision_config = dict(hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
                         num_attention_heads=vision["num_attention_heads"], num_hidden_layers=vision["num_hidden_layers"],
                         image_size=[size, size], patch_size=[patch, patch], attention_bias=vision["qkv_bias"],
                         use_qk_norm=vision["qk_normalization"], norm_type=vision["norm_type"],
                         layer_norm_eps=vision["layer_norm_eps"], hidden_act=vision["hidden_act"])
    # InternVLChatConfig sets tie_word_embeddings = False for every model size, whatever llm_config says
    # (configuration_internvl_chat.py, InternVLChatConfig.__init__); transformers would tie by default.
    text_config = {k: v for k, v in llm.items() if k not in LLM_CONFIG_DROPPED}
    text_config["tie_word_embeddings"] = False
    return InternVLConfig(vision_config=vision_config, text_config=text_config, image_token_id=image_token_id,
                          downsample_ratio=original.get("downsample_ratio", 0.5),
                          vision_feature_layer=original.get("select_layer", -1), tie_word_embeddings=False)


def load_unipercept(folder: Path, device: str = "cpu", dtype: torch.dtype = torch.bfloat16):
    """(model, tokenizer, system message, image tokens per image)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    original = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids = tokenizer.convert_tokens_to_ids(score_tokens())
    if len(set(ids)) != 101 or tokenizer.unk_token_id in ids or image_token_id == tokenizer.unk_token_id:
        raise ValueError(f"{folder}: the tokenizer lacks {IMAGE_TOKEN} or one of the 101 score tokens as single tokens")
    config = transformers_config(original, image_token_id)
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(convert_checkpoint(load_file(str(shard))))
    model = build_in(InternVLForConditionalGeneration, config, device, dtype)
    if any(p.dtype != dtype for p in model.parameters()):      # every part in the dtype asked for, whatever the config
        model = model.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder} does not fit its InternVL config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    system = system_message(original, lambda: prompts()["system_message"])
    return model.eval(), tokenizer, system, num_image_token(original)


def unipercept_model():
    folder = model_folder()
    return loaded_once(_LOADED, str(folder), lambda device, dtype: load_unipercept(folder, device, dtype))


def preprocess(image: np.ndarray, size: int) -> torch.Tensor:
    """RGB, squashed to size x size (bicubic), ImageNet mean / std: [3, size, size]."""
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB").resize((size, size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def query(question: str, system: str, per_image: int) -> str:
    text = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n")
    return text.replace("<image>", IMAGE_START + IMAGE_TOKEN * per_image + IMAGE_END, 1)


@torch.no_grad()
def unipercept_scores(model, tokenizer, system: str, per_image: int, question: str, images: list[np.ndarray]) -> torch.Tensor:
    """0-100 score of each image for one question (every sequence is the same length: no padding)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    size = model.config.vision_config.image_size[0]
    pixels = torch.stack([preprocess(im, size) for im in images]).to(device, dtype)
    ids = tokenizer(query(question, system, per_image), return_tensors="pt")["input_ids"].to(device)
    ids = ids.expand(len(images), -1)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits[:, -1]
    chosen = logits[:, tokenizer.convert_tokens_to_ids(score_tokens())].float()
    return torch.softmax(chosen, -1) @ torch.arange(101, dtype=torch.float32, device=device)


def score_dimension(desc: str):
    def score(samples: list[Sample]) -> dict[str, dict]:
        model, tokenizer, system, per_image = unipercept_model()
        question = prompts()["question"].format(desc=desc)
        values = [unipercept_scores(model, tokenizer, system, per_image, question,
                                    [s.image for s in samples[i:i + BATCH]]).cpu()
                  for i in range(0, len(samples), BATCH)]
        return score_records(samples, torch.cat(values) if values else torch.zeros(0))
    return score


def _evaluator(short: str) -> Evaluator:
    return Evaluator(
        name=f"unipercept-{short}", version="1",
        description=f"UniPercept {DIMENSIONS[short]} (InternVL3-8B, token as score), 0-100; mean over images.",
        score=score_dimension(DIMENSIONS[short]), aggregate=mean_score_metric(f"unipercept_{short}", "0-100"),
        reward_field="score", check_ready=check_files)


UNIPERCEPT_AESTHETICS = _evaluator("aesthetics")
UNIPERCEPT_QUALITY = _evaluator("quality")
UNIPERCEPT_STRUCTURE = _evaluator("structure")
