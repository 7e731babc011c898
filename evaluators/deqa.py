"""DeQA-Score (zhiyuanyou/DeQA-Score-Mix3): mPLUG-Owl2 rebuilt in plain PyTorch under the checkpoint's own key names.

mPLUG-Owl2 has no transformers class, so its three parts are written here (facts: ../shared/docs/metrics_vlm.md
section 3 and the mPLUG-Owl2 sources it cites):
- vision (`model.vision_model`): CLIP-like ViT, cls token, conv patch embedding without bias, learned positions,
  pre-LayerNorm, pre-norm blocks whose fused `query_key_value` is laid out per head ([heads, 3, head_dim]),
  quick_gelu MLP, post-LayerNorm on every token;
- visual abstractor (`model.visual_abstractor`): learned queries cross-attend to [norm1(queries), normk(image)];
  fixed sin-cos positions (`q_pos_embed`, `k_pos_embed` buffers, read from the checkpoint) are added to the query
  and key inputs, not to the values; out = norm1(q) + out_proj(context), then + SwiGLU-with-LayerNorm MLP of
  norm2(out); `visual_fc` to the LLM width and a learned `vit_eos` appended: 65 visual tokens;
- LLaMA-2 whose k/v projections and both RMSNorms are "multiway": index 0 for text tokens, 1 for image tokens.
The prompt "USER: How would you rate the quality of this image?\\n<|image|>\\nASSISTANT: The quality of the image
is" is tokenised chunk by chunk around <|image|> (one BOS), the image tokens spliced in; score =
softmax(logits at the last position over "excellent good fair poor bad") @ [5, 4, 3, 2, 1] (1-5; float32 here).
Image: padded to a square with the mean colour (122, 116, 104), shortest side to 448 (bicubic), centre crop,
OpenAI CLIP mean / std.

Files (nothing is downloaded): $HARNESS_DEQA_DIR = the HF repo zhiyuanyou/DeQA-Score-Mix3 (config.json, weights as
*.safetensors or pytorch_model*.bin, tokenizer; a tokenizer without tokenizer.json needs `pip install sentencepiece`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from evaluators import clip_colors
from evaluators.base import Evaluator, Sample
from evaluators.local_weights import build_in, loaded_once, weights_folder
from evaluators.preference import mean_score_metric, score_records

DIR_ENV = "HARNESS_DEQA_DIR"
HF_ID = "zhiyuanyou/DeQA-Score-Mix3"
PROMPT = "USER: How would you rate the quality of this image?\n<|image|>\nASSISTANT: The quality of the image is"
LEVELS = ("excellent", "good", "fair", "poor", "bad")      # weights 5..1
BATCH = 8

_LOADED: dict[str, tuple] = {}


def model_folder() -> Path:
    how = f"download the HF repo {HF_ID} and set ${DIR_ENV} to its folder"
    folder = weights_folder(DIR_ENV, f"DeQA-Score ({HF_ID})", how, ("config.json",))
    if not (any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))):
        raise FileNotFoundError(f"{folder} has no weights (*.safetensors or pytorch_model*.bin; expected {HF_ID}): {how}")
    return folder


def check_files() -> None:
    model_folder()


# --- the model --------------------------------------------------------------------------------------------------

class VisionLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int, eps: float):
        super().__init__()
        self.heads = heads
        self.input_layernorm = nn.LayerNorm(width, eps=eps)
        self.self_attn = nn.Module()
        self.self_attn.query_key_value = nn.Linear(width, 3 * width)
        self.self_attn.dense = nn.Linear(width, width)
        self.post_attention_layernorm = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, mlp), nn.Linear(mlp, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.self_attn.query_key_value(self.input_layernorm(x))
        q, k, v = qkv.reshape(b, n, self.heads, 3, d // self.heads).permute(3, 0, 2, 1, 4)    # per-head layout
        context = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.self_attn.dense(context)
        h = self.mlp.fc1(self.post_attention_layernorm(x))
        return x + self.mlp.fc2(h * torch.sigmoid(1.702 * h))                                  # quick_gelu


class Vision(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        width, patch, size = cfg["hidden_size"], cfg["patch_size"], cfg["image_size"]
        eps = cfg.get("layer_norm_eps", 1e-6)
        self.embeddings = nn.Module()
        self.embeddings.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.embeddings.patch_embed = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.embeddings.position_embedding = nn.Parameter(torch.zeros(1, (size // patch) ** 2 + 1, width))
        self.embeddings.pre_layernorm = nn.LayerNorm(width, eps=eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionLayer(width, cfg["num_attention_heads"], cfg["intermediate_size"], eps)
                                            for _ in range(cfg["num_hidden_layers"]))
        self.post_layernorm = nn.LayerNorm(width, eps=eps) if cfg.get("use_post_layernorm", True) else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        e = self.embeddings
        x = e.patch_embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([e.cls_token.expand(len(x), -1, -1).to(x.dtype), x], 1) + e.position_embedding[:, :x.shape[1] + 1]
        x = e.pre_layernorm(x)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x) if self.post_layernorm is not None else x


class AbstractorLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int, eps: float, queries: int, keys: int):
        super().__init__()
        self.heads = heads
        c = self.crossattention = nn.Module()
        c.norm1, c.normk = nn.LayerNorm(width), nn.LayerNorm(width)
        a = c.attention = nn.Module()
        a.query, a.key, a.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        a.register_buffer("q_pos_embed", torch.zeros(queries, width))
        a.register_buffer("k_pos_embed", torch.zeros(keys, width))
        o = c.output = nn.Module()
        o.out_proj, o.norm2 = nn.Linear(width, width), nn.LayerNorm(width)
        o.mlp = nn.Module()
        o.mlp.w1, o.mlp.w2, o.mlp.w3 = nn.Linear(width, mlp), nn.Linear(mlp, width), nn.Linear(width, mlp)
        o.mlp.ffn_ln = nn.LayerNorm(mlp, eps=eps)

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        c, a = self.crossattention, self.crossattention.attention
        q_in = c.norm1(queries)
        kv_in = torch.cat([q_in, c.normk(image)], 1)
        pos = torch.cat([a.q_pos_embed, a.k_pos_embed], 0).to(kv_in.dtype)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)
        q = split(a.query(q_in + a.q_pos_embed.to(q_in.dtype)))
        k, v = split(a.key(kv_in + pos)), split(a.value(kv_in))
        context = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(q_in.shape)
        out = q_in + c.output.out_proj(context)          # the residual is the normed query, as in mPLUG-Owl2
        m, h = c.output.mlp, c.output.norm2(out)
        return out + m.w2(m.ffn_ln(F.silu(m.w1(h)) * m.w3(h)))


class Abstractor(nn.Module):
    def __init__(self, cfg: dict, image_tokens: int, text_width: int):
        super().__init__()
        width, queries = cfg["hidden_size"], cfg["num_learnable_queries"]
        self.query_embeds = nn.Parameter(torch.zeros(1, queries, width))
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            AbstractorLayer(width, cfg["num_attention_heads"], cfg["intermediate_size"], cfg.get("layer_norm_eps", 1e-6),
                            queries, image_tokens) for _ in range(cfg["num_hidden_layers"]))
        self.visual_fc = nn.Linear(width, text_width)
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, text_width))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.query_embeds.expand(len(image), -1, -1).to(image.dtype)
        for layer in self.encoder.layers:
            x = layer(x, image)
        x = self.visual_fc(x)
        return torch.cat([x, self.vit_eos.expand(len(x), -1, -1).to(x.dtype)], 1)


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(width)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


class Multiway(nn.Module):
    """Two copies of a module: index 0 applied to text tokens, 1 to image tokens."""

    def __init__(self, make):
        super().__init__()
        self.multiway = nn.ModuleList([make(), make()])

    def forward(self, x: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
        return torch.where(is_image[..., None], self.multiway[1](x), self.multiway[0](x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, -1)
    return torch.cat([-b, a], -1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads", heads) * (d // heads)
        eps, self.heads, self.kv_heads = cfg.get("rms_norm_eps", 1e-6), heads, cfg.get("num_key_value_heads", heads)
        bias = cfg.get("attention_bias", False)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(d, d, bias=bias)
        self.self_attn.k_proj = Multiway(lambda: nn.Linear(d, kv, bias=bias))
        self.self_attn.v_proj = Multiway(lambda: nn.Linear(d, kv, bias=bias))
        self.self_attn.o_proj = nn.Linear(d, d, bias=bias)
        self.mlp = nn.Module()
        inter = cfg["intermediate_size"]
        self.mlp.gate_proj, self.mlp.up_proj = nn.Linear(d, inter, bias=False), nn.Linear(d, inter, bias=False)
        self.mlp.down_proj = nn.Linear(inter, d, bias=False)
        self.input_layernorm = Multiway(lambda: RMSNorm(d, eps))
        self.post_attention_layernorm = Multiway(lambda: RMSNorm(d, eps))

    def forward(self, x, is_image, cos, sin):
        b, n, d = x.shape
        a = self.self_attn
        h = self.input_layernorm(x, is_image)
        split = lambda t, heads: t.reshape(b, n, heads, -1).transpose(1, 2)
        q, k, v = split(a.q_proj(h), self.heads), split(a.k_proj(h, is_image), self.kv_heads), split(a.v_proj(h, is_image), self.kv_heads)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = (t.repeat_interleave(self.heads // self.kv_heads, 1) for t in (k, v))
        context = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d)
        x = x + a.o_proj(context)
        h = self.post_attention_layernorm(x, is_image)
        return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


class MplugOwl2(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        vision, abstractor = cfg["visual_config"]["visual_model"], cfg["visual_config"]["visual_abstractor"]
        self.cfg = cfg
        self.model = nn.Module()
        self.model.vision_model = Vision(vision)
        image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
        self.model.visual_abstractor = Abstractor(abstractor, image_tokens, cfg["hidden_size"])
        self.model.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.model.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.model.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    def last_logits(self, ids_before: torch.Tensor, ids_after: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """Next-token logits after [text before, image tokens, text after] for a batch of images, [B, vocab]."""
        m = self.model
        visual = m.visual_abstractor(m.vision_model(pixels))
        b = len(pixels)
        x = torch.cat([m.embed_tokens(ids_before).expand(b, -1, -1), visual.to(m.embed_tokens.weight.dtype),
                       m.embed_tokens(ids_after).expand(b, -1, -1)], 1)
        is_image = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        is_image[:, ids_before.shape[1]:ids_before.shape[1] + visual.shape[1]] = True
        head_dim = self.cfg["hidden_size"] // self.cfg["num_attention_heads"]
        theta = self.cfg.get("rope_theta", 10000.0)
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=x.device).float() / head_dim)
        angles = torch.arange(x.shape[1], device=x.device).float()[:, None] * inv[None]
        cos, sin = (f(torch.cat([angles, angles], -1)).to(x.dtype) for f in (torch.cos, torch.sin))
        for layer in m.layers:
            x = layer(x, is_image, cos, sin)
        return self.lm_head(m.norm(x[:, -1]))


# --- loading and scoring ---------------------------------------------------------------------------------------

def read_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        from safetensors.torch import load_file
        state.update(load_file(str(path)))
    for path in sorted(folder.glob("pytorch_model*.bin")):
        state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def load_deqa(folder: Path, device: str = "cpu", dtype: torch.dtype = torch.float16):
    """(model, tokenizer, level token ids)."""
    from transformers import AutoTokenizer

    cfg = json.loads((folder / "config.json").read_text())
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (ImportError, ValueError) as e:
        raise ImportError(f"{folder}: cannot load the LLaMA tokenizer ({e}); `pip install sentencepiece` reads "
                          f"tokenizer.model") from None
    model = build_in(MplugOwl2, cfg, device, dtype)
    state = {k: v for k, v in read_state(folder).items() if not k.endswith("rotary_emb.inv_freq")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:          # a tensor of another shape
        raise ValueError(f"{folder} does not fit its own config.json: {e}") from None
    # the abstractor's attention-level sin-cos copies (add_v2t_pos_emb) are unused by the forward
    unexpected = [k for k in unexpected if not k.endswith(("crossattention.q_pos_embed", "crossattention.k_pos_embed"))]
    if missing or unexpected:
        raise ValueError(f"{folder} does not fit mPLUG-Owl2 as written here: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    levels = [without_bos(tokenizer, tokenizer(w).input_ids)[0] for w in LEVELS]     # the first piece of each word
    return model.eval(), tokenizer, levels


def deqa_model():
    folder = model_folder()
    return loaded_once(_LOADED, str(folder), lambda device, dtype: load_deqa(folder, device, dtype), "float16")


def without_bos(tokenizer, ids: list[int]) -> list[int]:
    return ids[1:] if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else ids


def prompt_ids(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids before and after <|image|>: each chunk tokenised alone, one BOS at the start."""
    before, after = PROMPT.split("<|image|>")
    return torch.tensor([tokenizer(before).input_ids]), torch.tensor([without_bos(tokenizer, tokenizer(after).input_ids)])


def preprocess(image: np.ndarray, size: int) -> torch.Tensor:
    """Pad to a square with the mean colour, then the CLIP transform at `size`."""
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    side = max(picture.size)
    square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in clip_colors.OPENAI_MEAN))
    square.paste(picture, ((side - picture.width) // 2, (side - picture.height) // 2))
    return clip_colors.preprocess(square, size)


@torch.no_grad()
def deqa_scores(model: MplugOwl2, tokenizer, levels: list[int], images: list[np.ndarray]) -> torch.Tensor:
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    size = model.cfg["visual_config"]["visual_model"]["image_size"]
    pixels = torch.stack([preprocess(im, size) for im in images]).to(device, dtype)
    before, after = (t.to(device) for t in prompt_ids(tokenizer))
    logits = model.last_logits(before, after, pixels)[:, levels].float()
    return torch.softmax(logits, -1) @ torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], device=device)


def score_deqa(samples: list[Sample]) -> dict[str, dict]:
    model, tokenizer, levels = deqa_model()
    values = [deqa_scores(model, tokenizer, levels, [s.image for s in samples[i:i + BATCH]]).cpu()
              for i in range(0, len(samples), BATCH)]
    return score_records(samples, torch.cat(values) if values else torch.zeros(0))


DEQA = Evaluator(
    name="deqa", version="1",
    description="DeQA-Score (mPLUG-Owl2, Mix3): expected quality level 1-5 from the next-token distribution over "
                "excellent..bad; mean over images.",
    score=score_deqa, aggregate=mean_score_metric("deqa", "1-5"), reward_field="score",
    check_ready=check_files)
