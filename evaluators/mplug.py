"""mPLUG-large VQA (DPG-Bench's judge) in plain PyTorch, under modelscope's own state-dict key names.

The model is `damo/mplug_visual-question-answering_coco_large_en` as modelscope 1.40.2 runs it
(modelscope/models/multi_modal/mplug/{modeling_mplug.py, clip/clip.py, predictor.py}; measured facts:
../shared/docs/dpg_vqa.md sections 1-4):
- vision: an OpenAI-CLIP ViT (`visual_encoder.visual.*`: conv1 without bias, class token, learned positions,
  ln_pre, pre-norm blocks with nn.MultiheadAttention (packed in_proj) and a QuickGELU MLP, `width // 64` heads);
  ln_post on every token, no `proj`. image_res = patch * sqrt(rows - 1) of the positional table;
- `visn_fc` + `visn_layer_norm` (eps 1e-12) when the BERT width differs from the vision width;
- text encoder: BERT embeddings + `text_encoder_layers` self-attention layers; padding mask (1 - m) * -10000;
- fusion: only the last `fusion_layers` of `num_hidden_layers` run; relative layer k is co-attention (text
  self-attention, text -> image cross-attention, FFN) unless k > 0 and k % stride_layer == 0, where one
  self-attention + FFN runs over [image; text] and the image part is *added* to the image states (modelscope
  does this in place; here it is out of place, so cached image states are never changed);
- decoder: BERT with causal self-attention and cross-attention to [fused image; fused question] (its mask
  inverted with finfo.min), MLM head tied to the word embeddings;
- generation: predictor.TextGenerator._fast_translate_batch, an ONMT-style beam search: start 101, end 102,
  scores log(softmax) + cumulative, GNMT length penalty ((5 + step + 1) / 6) ** 0.6, [SEP] at -1e20 while
  step < min_length, a question stops when its beam 0 ends (or at max_length), best stored hypothesis wins.
  Finished non-top beams stay alive (as the official); hypotheses are sorted stably by score.

Speed: `answer_many` encodes each image once, runs every question of every image in one batch, and decodes with a
KV cache (self-attention keys/values kept per beam, reordered on beam moves; cross-attention keys/values of the
memory computed once per question). `reference_answer` is the official per-question path (image encoded per
question, prefix recomputed every step) kept as the parity oracle and the benchmark baseline.

Files ($HARNESS_MPLUG_DIR, the modelscope repo folder; nothing is downloaded): configuration.json, config.yaml,
the BERT config named by its `bert_config` (config_bert.json), vocab.txt, pytorch_model.bin.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

DIR_ENV = "HARNESS_MPLUG_DIR"
MODEL_ID = "damo/mplug_visual-question-answering_coco_large_en"
CHECKPOINT_NAME = "pytorch_model.bin"
REQUIRED = ("configuration.json", "config.yaml", "vocab.txt", CHECKPOINT_NAME)
# modelscope MPlugConfig defaults (configuration_mplug.py), used when config.yaml leaves a key out
CONFIG_DEFAULTS = {"bert_config": "config_bert.json", "image_res": 504, "vision_width": 1024, "min_length": 1,
                   "max_length": 10, "beam_size": 5}
START_ID, END_ID = 101, 102            # predictor.TextGenerator: hard-coded [CLS] / [SEP]
LENGTH_ALPHA = 0.6                     # predictor.TextGenerator.alpha
QUESTION_TOKENS = 25                   # preprocessors/multi_modal.py MPlugPreprocessor tokenizer_max_length
MEAN = (0.48145466, 0.4578275, 0.40821073)   # MPlugPreprocessor Normalize (OpenAI CLIP)
STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_MASK = -10000.0                   # modeling_mplug get_extended_attention_mask
# keys of the modelscope checkpoint that inference never reads (dpg_vqa.md 3-4): momentum copies, the CLIP text
# tower, the ViT projection (skip_last_layer), position_ids buffers, the never-run fusion layers (checked apart)
UNUSED_KEYS = [
    r"^(visual_encoder|text_encoder|fusion_encoder|text_decoder|visn_fc|visn_layer_norm)_m\.",
    r"^visual_encoder\.(transformer\.|token_embedding\.|positional_embedding$|ln_final\.|text_projection$|logit_scale$)",
    r"^visual_encoder\.visual\.proj$",
    r"(^|\.)position_ids$",
    r"^text_decoder\.cls\.predictions\.decoder\.bias$",        # the same tensor as cls.predictions.bias
]


def how_to_get() -> str:
    return (f"download the modelscope model {MODEL_ID} (`modelscope download --model {MODEL_ID} --local_dir DIR`, "
            f"files configuration.json, config.yaml, config_bert.json, vocab.txt, {CHECKPOINT_NAME}) and set "
            f"${DIR_ENV}=DIR")


def model_folder(path=None) -> Path:
    """The model folder ($HARNESS_MPLUG_DIR or `path`) with every file the model reads."""
    from evaluators.local_weights import weights_folder
    folder = weights_folder(DIR_ENV, f"mPLUG-large VQA ({MODEL_ID})", how_to_get(), REQUIRED, path)
    bert = read_config(folder)["bert_config"]
    if not (folder / bert).is_file():
        raise FileNotFoundError(f"{folder} lacks {bert} (the BERT config named by config.yaml's bert_config, "
                                f"expected mPLUG-large VQA ({MODEL_ID})): {how_to_get()}")
    return folder


def read_config(folder: Path) -> dict:
    import yaml
    raw = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{folder / 'config.yaml'} is not a mapping")
    config = {**CONFIG_DEFAULTS, **raw}
    config["bert_config"] = Path(str(config["bert_config"])).name   # modelscope joins it to the model dir
    return config


# --- configs ----------------------------------------------------------------------------------------------------

@dataclass
class BertDims:
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    act: str
    pad_id: int
    num_hidden_layers: int
    text_encoder_layers: int
    fusion_layers: int
    text_decode_layers: int
    stride_layer: int
    encoder_width: int

    @classmethod
    def from_json(cls, path: Path) -> "BertDims":
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))

    @classmethod
    def from_dict(cls, c: dict, path: str = "config_bert.json") -> "BertDims":
        need = ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size", "num_hidden_layers",
                "text_encoder_layers", "fusion_layers", "text_decode_layers")
        missing = [k for k in need if k not in c]
        if missing:
            raise ValueError(f"{path} lacks {missing} (an mPLUG BERT config has text_encoder_layers, fusion_layers, "
                             f"text_decode_layers, stride_layer, encoder_width)")
        return cls(hidden=c["hidden_size"], heads=c["num_attention_heads"], intermediate=c["intermediate_size"],
                   vocab=c["vocab_size"], max_positions=c.get("max_position_embeddings", 512),
                   type_vocab=c.get("type_vocab_size", 2), eps=c.get("layer_norm_eps", 1e-12),
                   act=c.get("hidden_act", "gelu"), pad_id=c.get("pad_token_id", 0),
                   num_hidden_layers=c["num_hidden_layers"], text_encoder_layers=c["text_encoder_layers"],
                   fusion_layers=c["fusion_layers"], text_decode_layers=c["text_decode_layers"],
                   # FusionLayer: getattr(config, 'stride_layer', 100); BertConfig: encoder_width
                   stride_layer=c.get("stride_layer", 100), encoder_width=c.get("encoder_width", c["hidden_size"]))

    @property
    def fusion_start(self) -> int:
        return max(0, self.num_hidden_layers - self.fusion_layers)

    def connected(self, k: int) -> bool:
        """Relative fusion layer k runs connected attention over [image; text]."""
        return k != 0 and k % self.stride_layer == 0


@dataclass
class VisionDims:
    width: int
    layers: int
    patch: int
    rows: int          # positional table rows = grid ** 2 + 1

    @property
    def grid(self) -> int:
        return math.isqrt(self.rows - 1)

    @property
    def image_res(self) -> int:
        return self.grid * self.patch


_ACT = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


# --- vision -----------------------------------------------------------------------------------------------------

class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class CLIPBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, width // 64)     # clip.py: vision_heads = vision_width // 64
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):                      # x: [L, N, D], as CLIP
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class CLIPVision(nn.Module):
    def __init__(self, d: VisionDims):
        super().__init__()
        self.conv1 = nn.Conv2d(3, d.width, d.patch, stride=d.patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(d.width))
        self.positional_embedding = nn.Parameter(torch.zeros(d.rows, d.width))
        self.ln_pre = nn.LayerNorm(d.width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[CLIPBlock(d.width) for _ in range(d.layers)])
        self.ln_post = nn.LayerNorm(d.width)

    def forward(self, pixels):
        x = self.conv1(pixels.to(self.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        zeros = torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([self.class_embedding.to(x.dtype) + zeros, x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)[:x.size(1), :]
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer.resblocks(x).permute(1, 0, 2)
        return self.ln_post(x)


# --- BERT parts -------------------------------------------------------------------------------------------------

class SelfAttn(nn.Module):
    """BertSelfAttention's arithmetic: (q @ k^T) / sqrt(d) + mask, softmax, @ v."""

    def __init__(self, d: BertDims, kv_width: int):
        super().__init__()
        self.heads, self.head_dim = d.heads, d.hidden // d.heads
        self.query = nn.Linear(d.hidden, d.hidden)
        self.key = nn.Linear(kv_width, d.hidden)
        self.value = nn.Linear(kv_width, d.hidden)

    def split(self, x):
        return x.view(*x.shape[:-1], self.heads, self.head_dim).permute(0, 2, 1, 3)

    def kv(self, x):
        return self.split(self.key(x)), self.split(self.value(x))

    def attend(self, q, k, v, mask):
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        context = context.permute(0, 2, 1, 3).contiguous()
        return context.view(*context.shape[:-2], self.heads * self.head_dim)


class Residual(nn.Module):
    """BertSelfOutput / BertOutput: LayerNorm(dense(x) + residual)."""

    def __init__(self, width_in: int, d: BertDims):
        super().__init__()
        self.dense = nn.Linear(width_in, d.hidden)
        self.LayerNorm = nn.LayerNorm(d.hidden, eps=d.eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, d: BertDims, kv_width: int | None = None):
        super().__init__()
        setattr(self, "self", SelfAttn(d, kv_width or d.hidden))
        self.output = Residual(d.hidden, d)

    @property
    def core(self) -> SelfAttn:
        return getattr(self, "self")


class Intermediate(nn.Module):
    def __init__(self, d: BertDims):
        super().__init__()
        self.dense = nn.Linear(d.hidden, d.intermediate)
        self.act = _ACT[d.act]

    def forward(self, x):
        return self.act(self.dense(x))


class Layer(nn.Module):
    """A BERT layer (text encoder), a FusionLayer, or a decoder BertLayer with cross-attention."""

    def __init__(self, d: BertDims, cross_width: int | None):
        super().__init__()
        self.attention = Attention(d)
        if cross_width is not None:
            self.crossattention = Attention(d, cross_width)
        self.intermediate = Intermediate(d)
        self.output = Residual(d.intermediate, d)

    def ffn(self, x):
        return self.output(self.intermediate(x), x)

    def self_attend(self, x, mask, past=None):
        """Self-attention sublayer; with `past` (k, v) the new keys are appended. Returns (out, (k, v))."""
        a = self.attention.core
        k, v = a.kv(x)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        return self.attention.output(a.attend(a.split(a.query(x)), k, v, mask), x), (k, v)

    def cross_attend(self, x, kv, mask, group: int = 1):
        """Cross-attention; with group > 1, rows come in groups of `group` consecutive rows (the beams of one
        question) sharing one memory: kv [B / group, H, M, hd], mask [B / group, 1, 1, M], x [B, L, D]."""
        a = self.crossattention.core
        q = a.split(a.query(x))                                         # [B, H, L, hd]
        if group == 1:
            return self.crossattention.output(a.attend(q, kv[0], kv[1], mask), x)
        rows, _, length, _ = q.shape
        if length == 1:
            # one query row per beam, as the official's first step: broadcast the memory over the beams (a stride-0
            # view, which matmul copies to the layout the official's per-beam tensors get, so rounding is the same)
            q5 = q.reshape(rows // group, group, a.heads, 1, a.head_dim)
            scores = torch.matmul(q5, kv[0][:, None].transpose(-1, -2)) / math.sqrt(a.head_dim) + mask[:, None]
            context = torch.matmul(torch.softmax(scores, dim=-1), kv[1][:, None])
            context = context.reshape(rows, a.heads, 1, a.head_dim).permute(0, 2, 1, 3).contiguous()
            return self.crossattention.output(context.view(rows, 1, -1), x)
        q = q.reshape(rows // group, group, a.heads, length, a.head_dim).transpose(1, 2)
        q = q.reshape(rows // group, a.heads, group * length, a.head_dim)
        context = a.attend(q, kv[0], kv[1], mask)                      # [B / group, group * L, D]
        return self.crossattention.output(context.reshape(rows, length, -1), x)


class Embeddings(nn.Module):
    def __init__(self, d: BertDims):
        super().__init__()
        self.word_embeddings = nn.Embedding(d.vocab, d.hidden, padding_idx=d.pad_id)
        self.position_embeddings = nn.Embedding(d.max_positions, d.hidden)
        self.token_type_embeddings = nn.Embedding(d.type_vocab, d.hidden)
        self.LayerNorm = nn.LayerNorm(d.hidden, eps=d.eps)

    def forward(self, ids, start: int = 0):
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
        x = self.word_embeddings(ids) + self.token_type_embeddings(torch.zeros_like(ids))
        x = x + self.position_embeddings(positions)
        return self.LayerNorm(x)


class Stack(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layer = layers


class BertPart(nn.Module):
    def __init__(self, d: BertDims, n_layers: int, cross_width: int | None, embeddings: bool = True):
        super().__init__()
        if embeddings:
            self.embeddings = Embeddings(d)
        self.encoder = Stack(nn.ModuleList([Layer(d, cross_width) for _ in range(n_layers)]))


class PredictionHead(nn.Module):
    def __init__(self, d: BertDims, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(d.hidden, d.hidden)
        self.transform.LayerNorm = nn.LayerNorm(d.hidden, eps=d.eps)
        self.act = _ACT[d.act]
        self.decoder = nn.Linear(d.hidden, d.vocab, bias=False)
        self.decoder.weight = word_embeddings.weight          # tied, as transformers ties BertLMHeadModel
        self.bias = nn.Parameter(torch.zeros(d.vocab))

    def forward(self, x):
        x = self.transform.LayerNorm(self.act(self.transform.dense(x)))
        return F.linear(x, self.decoder.weight, self.bias)


# --- the model --------------------------------------------------------------------------------------------------

def text_mask(attention_mask: torch.Tensor, dtype) -> torch.Tensor:
    """[B, L] 1/0 -> [B, 1, 1, L] additive mask (1 - m) * -10000 (get_extended_attention_mask)."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * TEXT_MASK


def memory_mask(attention_mask: torch.Tensor, dtype) -> torch.Tensor:
    """[B, L] -> [B, 1, 1, L] additive (1 - m) * finfo.min (transformers invert_attention_mask)."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


@dataclass
class Generation:
    beam_size: int = 5
    min_length: int = 1
    max_length: int = 10


class MPlugVQA(nn.Module):
    """MPlugForVisualQuestionAnswering's inference parts, under its state-dict names."""

    def __init__(self, bert: BertDims, vision: VisionDims, vision_width: int, generation: Generation):
        super().__init__()
        self.bert, self.vision, self.generation = bert, vision, generation
        self.visual_encoder = nn.Module()
        self.visual_encoder.visual = CLIPVision(vision)
        self.large = bert.hidden != vision_width
        if self.large:
            self.visn_fc = nn.Linear(vision_width, bert.hidden)
            self.visn_layer_norm = nn.LayerNorm(bert.hidden, eps=1e-12)
        self.text_encoder = BertPart(bert, bert.text_encoder_layers, None)
        # only the fusion layers that run are built; ModuleDict keeps their absolute indices in the key names
        self.fusion_encoder = nn.Module()
        self.fusion_encoder.encoder = Stack(nn.ModuleDict(
            {str(i): Layer(bert, bert.encoder_width) for i in range(bert.fusion_start, bert.num_hidden_layers)}))
        self.text_decoder = nn.Module()
        self.text_decoder.bert = BertPart(bert, bert.text_decode_layers, bert.encoder_width)
        self.text_decoder.cls = nn.Module()
        self.text_decoder.cls.predictions = PredictionHead(bert, self.text_decoder.bert.embeddings.word_embeddings)

    @property
    def image_res(self) -> int:
        return self.vision.image_res

    @property
    def dtype(self):
        return self.visn_fc.weight.dtype if self.large else self.text_decoder.cls.predictions.bias.dtype

    # encoders
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, R, R] -> image states [N, 1 + grid^2, hidden]."""
        x = self.visual_encoder.visual(pixels)
        if self.large:
            x = self.visn_layer_norm(self.visn_fc(x))
        return x

    def encode_text(self, ids, mask):
        x = self.text_encoder.embeddings(ids)
        m = text_mask(mask, x.dtype)
        for layer in self.text_encoder.encoder.layer:
            x = layer.ffn(layer.self_attend(x, m)[0])
        return x

    def fuse(self, image: torch.Tensor, which: torch.Tensor, text: torch.Tensor, mask: torch.Tensor):
        """FusionEncoder over questions: image states [N, I, D] of the distinct images, `which` [Q] the image of each
        question, text [Q, T, D]. Image states are shared (not copied per question) until a connected layer
        changes them. Returns (image states [Q, I, D], text states [Q, T, D])."""
        tm = text_mask(mask, text.dtype)
        image_mask = torch.zeros(1, 1, 1, image.shape[1], dtype=text.dtype, device=text.device)  # inverted ones
        per_question = False
        for k, (name, layer) in enumerate(self.fusion_encoder.encoder.layer.items()):
            if self.bert.connected(k):
                if not per_question:
                    image, per_question = image[which], True
                joint = torch.cat([image, text], 1)
                joint_mask = torch.cat([image_mask.expand(tm.shape[0], 1, 1, -1), tm], 3)
                out = layer.ffn(layer.self_attend(joint, joint_mask)[0])
                new_image, text = out.split((image.shape[1], text.shape[1]), 1)
                image = image + new_image                         # modelscope: encoder_hidden_states += (in place)
            else:
                x = layer.self_attend(text, tm)[0]
                a = layer.crossattention.core
                k_img, v_img = a.kv(image)
                if not per_question:
                    k_img, v_img = k_img[which], v_img[which]
                x = layer.crossattention.output(a.attend(a.split(a.query(x)), k_img, v_img, None), x)
                text = layer.ffn(x)
        if not per_question:
            image = image[which]
        return image, text

    def memory(self, image_states, which, ids, mask):
        """Decoder memory [Q, I + T, D] and its 0/1 mask [Q, I + T]."""
        fused_image, fused_text = self.fuse(image_states, which, self.encode_text(ids, mask), mask)
        ones = torch.ones(fused_image.shape[:2], dtype=mask.dtype, device=mask.device)
        return torch.cat([fused_image, fused_text], 1), torch.cat([ones, mask], 1)

    # decoder
    def decoder_kv(self, memory):
        """Cross-attention keys/values of every decoder layer for a memory [B, M, D]."""
        return [layer.crossattention.core.kv(memory) for layer in self.text_decoder.bert.encoder.layer]

    def decode_full(self, seq, cross_kv, cross_mask, group: int = 1):
        """Logits of the last position, recomputing the whole prefix [B, L] (the official decoder call).
        group: rows per memory (see Layer.cross_attend)."""
        x = self.text_decoder.bert.embeddings(seq)
        n = seq.shape[1]
        causal = (torch.arange(n, device=seq.device)[None, :] <= torch.arange(n, device=seq.device)[:, None])
        m = (1.0 - causal[None, None].to(x.dtype)) * TEXT_MASK
        for layer, kv in zip(self.text_decoder.bert.encoder.layer, cross_kv):
            x = layer.self_attend(x, m)[0]
            x = layer.ffn(layer.cross_attend(x, kv, cross_mask, group))
        return self.text_decoder.cls.predictions(x[:, -1])

    def decode_step(self, tokens, start, cache, cross_kv, cross_mask, group: int = 1):
        """Logits for one new token per row [B, 1] at position `start`; `cache` (list of (k, v) per layer, or None)
        is returned extended. group: rows per memory (see Layer.cross_attend)."""
        x = self.text_decoder.bert.embeddings(tokens, start)
        new_cache = []
        for i, (layer, kv) in enumerate(zip(self.text_decoder.bert.encoder.layer, cross_kv)):
            x, past = layer.self_attend(x, None, None if cache is None else cache[i])
            new_cache.append(past)
            x = layer.ffn(layer.cross_attend(x, kv, cross_mask, group))
        return self.text_decoder.cls.predictions(x[:, -1]), new_cache


# --- beam search ------------------------------------------------------------------------------------------------

def beam_search(n: int, step, reorder, gen: Generation, device) -> list[tuple[list[int], float]]:
    """The official _fast_translate_batch for n inputs (out_size 1): `step(alive_seq)` -> next-token logits
    [rows, V] for the alive rows; `reorder(index)` moves the decoder state to rows `index` of the last step's
    layout. Returns per input (token ids incl. the start token, score)."""
    beam = gen.beam_size
    batch_offset = torch.arange(n, device=device)
    beam_offset = torch.arange(0, n * beam, step=beam, device=device)
    alive_seq = torch.full([n * beam, 1], START_ID, dtype=torch.long, device=device)
    topk_log_probs = torch.tensor([0.0] + [float("-inf")] * (beam - 1), device=device).repeat(n)
    hypotheses: list[list] = [[] for _ in range(n)]
    results: list[tuple[list[int], float] | None] = [None] * n
    for t in range(gen.max_length):
        logits = step(alive_seq).float()
        vocab = logits.shape[-1]
        log_probs = torch.log(torch.softmax(logits.view(-1, vocab), dim=-1))
        if t < gen.min_length:
            log_probs[:, END_ID] = -1e20
        penalty = ((5.0 + (t + 1)) / 6.0) ** LENGTH_ALPHA
        log_probs += topk_log_probs.view(-1).unsqueeze(1)
        curr = (log_probs / penalty).reshape(-1, beam * vocab)
        topk_scores, topk_ids = curr.topk(beam, dim=-1)
        topk_log_probs = topk_scores * penalty
        topk_beam_index = torch.div(topk_ids, vocab, rounding_mode="floor")
        topk_ids = topk_ids.fmod(vocab)
        batch_index = topk_beam_index + beam_offset[:topk_beam_index.size(0)].unsqueeze(1)
        select = batch_index.view(-1)
        alive_seq = torch.cat([alive_seq.index_select(0, select), topk_ids.view(-1, 1)], -1)
        finished = topk_ids.eq(END_ID)
        if t + 1 == gen.max_length:
            finished.fill_(True)
        end = finished[:, 0].clone()
        if finished.any():
            predictions = alive_seq.view(-1, beam, alive_seq.size(-1))
            scores_cpu, finished_cpu, end_cpu = topk_scores.cpu(), finished.cpu(), end.cpu()
            for i in range(finished_cpu.size(0)):
                b = int(batch_offset[i])
                if end_cpu[i]:
                    finished_cpu[i].fill_(True)
                for j in finished_cpu[i].nonzero().view(-1).tolist():
                    hypotheses[b].append((float(scores_cpu[i, j]), predictions[i, j].tolist()))
                if end_cpu[i]:
                    best = sorted(hypotheses[b], key=lambda h: h[0], reverse=True)[0]   # stable, as the official
                    results[b] = (best[1], best[0])
            keep = (~end).nonzero().view(-1)
            if len(keep) == 0:
                break
            topk_log_probs = topk_log_probs.index_select(0, keep)
            batch_index = batch_index.index_select(0, keep)
            batch_offset = batch_offset.index_select(0, keep)
            alive_seq = predictions.index_select(0, keep).view(-1, alive_seq.size(-1))
        reorder(batch_index.view(-1))
    return results


# --- text -------------------------------------------------------------------------------------------------------

class Tokenizer:
    """bert-base-uncased WordPiece from vocab.txt, written out so that it does not depend on a transformers version:
    encoding as BertTokenizer(do_lower_case=True) (clean text, CJK split, lower-case, strip accents, split on
    punctuation, greedy longest-match wordpieces, [UNK] for a word it cannot split or longer than 100 characters);
    decoding as BertTokenizer.decode(skip_special_tokens=True) with clean_up_tokenization_spaces (transformers 4.57,
    modelscope's pin)."""

    CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
               (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
    SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

    def __init__(self, vocab_file: Path):
        self.vocab = [line.rstrip("\n") for line in open(vocab_file, encoding="utf-8")]
        self.ids = {tok: i for i, tok in reversed(list(enumerate(self.vocab)))}
        if len(self.vocab) <= END_ID or self.vocab[START_ID] != "[CLS]" or self.vocab[END_ID] != "[SEP]":
            raise ValueError(f"{vocab_file}: ids {START_ID}/{END_ID} must be [CLS]/[SEP] (the beam search "
                             f"hard-codes them); is it bert-base-uncased's vocab.txt?")
        self.special_ids = {i for i, tok in enumerate(self.vocab) if tok in self.SPECIAL}
        self.pad_id, self.unk_id = self.ids.get("[PAD]", 0), self.ids.get("[UNK]", 100)

    @staticmethod
    def _words(text: str) -> list[str]:
        import unicodedata

        def is_punct(ch):
            cp = ord(ch)
            return (33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126
                    or unicodedata.category(ch).startswith("P"))

        def is_cjk(cp):
            return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                                     (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                                     (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))
        cleaned = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
                continue
            if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
                cleaned.append(" ")
            elif is_cjk(cp):
                cleaned.append(f" {ch} ")
            else:
                cleaned.append(ch)
        words = []
        for token in "".join(cleaned).split():
            token = "".join(c for c in unicodedata.normalize("NFD", token.lower()) if unicodedata.category(c) != "Mn")
            current = ""
            for ch in token:
                if is_punct(ch):
                    if current:
                        words.append(current)
                    words.append(ch)
                    current = ""
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def wordpieces(self, text: str) -> list[int]:
        out = []
        for word in self._words(text):
            if len(word) > 100:
                out.append(self.unk_id)
                continue
            pieces, start = [], 0
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.ids:
                        break
                    end -= 1
                if end == start:
                    pieces = [self.unk_id]
                    break
                pieces.append(self.ids[piece])
                start = end
            out += pieces
        return out

    def questions(self, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """As tokenizer(q.lower(), padding='max_length', truncation=True, max_length=25)."""
        ids = torch.full((len(questions), QUESTION_TOKENS), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(questions), QUESTION_TOKENS), dtype=torch.long)
        for i, q in enumerate(questions):
            row = [START_ID] + self.wordpieces(q.lower())[:QUESTION_TOKENS - 2] + [END_ID]
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return ids, mask

    def decode(self, ids: list[int]) -> str:
        tokens = [self.vocab[i] for i in ids if i not in self.special_ids]
        text = " ".join(tokens).replace(" ##", "").strip()
        for old, new in self.CLEANUP:
            text = text.replace(old, new)
        return text


def preprocess(image: Image.Image, res: int) -> torch.Tensor:
    """MPlugPreprocessor: RGB, Resize((res, res), BICUBIC), ToTensor, Normalize -> [3, res, res] float32."""
    image = image.convert("RGB").resize((res, res), Image.BICUBIC)
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


# --- loading ----------------------------------------------------------------------------------------------------

def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict as modelscope's MPlug.from_pretrained reads it: {'model': sd} / {'module': sd} unwrapped,
    every 'model.' removed from the keys."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    if isinstance(state, dict) and "module" in state:
        state = state["module"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no flat state dict of tensors")
    return {k.replace("model.", ""): v for k, v in state.items()}


def vision_dims(state: dict, path: Path) -> VisionDims:
    try:
        conv = state["visual_encoder.visual.conv1.weight"]
        rows = state["visual_encoder.visual.positional_embedding"].shape[0]
    except KeyError as e:
        raise ValueError(f"{path} has no {e.args[0]!r}; is it the checkpoint of {MODEL_ID}?") from None
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"visual_encoder\.visual\.transformer\.resblocks\.(\d+)\.", k))}
    d = VisionDims(width=conv.shape[0], layers=len(blocks), patch=conv.shape[-1], rows=rows)
    if d.grid ** 2 + 1 != rows:
        raise ValueError(f"{path}: positional table of {rows} rows is not grid^2 + 1")
    return d


def unused_key(key: str, bert: BertDims) -> bool:
    if any(re.search(p, key) for p in UNUSED_KEYS):
        return True
    m = re.match(r"fusion_encoder\.encoder\.layer\.(\d+)\.", key)
    return m is not None and int(m.group(1)) < bert.fusion_start          # built but never run


def load_mplug(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[MPlugVQA, Tokenizer]:
    """Build the model from the folder's configs and load pytorch_model.bin strictly (only UNUSED_KEYS may be
    extra; nothing the inference reads may be absent)."""
    folder = model_folder(folder)
    config = read_config(folder)
    bert = BertDims.from_json(folder / config["bert_config"])
    path = folder / CHECKPOINT_NAME
    state = read_checkpoint(path)
    vision = vision_dims(state, path)
    if int(config["image_res"]) != vision.image_res:
        raise ValueError(f"{folder / 'config.yaml'}: image_res {config['image_res']} but the checkpoint's positional "
                         f"table ({vision.rows} rows, patch {vision.patch}) is for {vision.image_res} px")
    generation = Generation(int(config["beam_size"]), int(config["min_length"]), int(config["max_length"]))
    model = MPlugVQA(bert, vision, int(config["vision_width"]), generation)
    expected = model.state_dict()
    used = {k: v for k, v in state.items() if not unused_key(k, bert)}
    tied = "text_decoder.cls.predictions.decoder.weight"
    if tied not in used and "text_decoder.bert.embeddings.word_embeddings.weight" in used:
        used[tied] = used["text_decoder.bert.embeddings.word_embeddings.weight"]
    missing = sorted(set(expected) - set(used))
    unexpected = sorted(set(used) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit mPLUG VQA ({MODEL_ID}) as its configs describe it: "
                         f"missing {len(missing)} key(s) {missing[:8]}, unexpected {len(unexpected)} key(s) "
                         f"{unexpected[:8]}")
    wrong = [f"{k} {tuple(used[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if used[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{path}: tensor shapes do not fit the configs: {wrong[:6]}")
    # module order (word embeddings before the tied decoder weight) as modelscope's load_state_dict applies it
    model.load_state_dict(used, strict=True)
    model = model.to(device=device, dtype=dtype).eval()
    return model, Tokenizer(folder / "vocab.txt")


# --- answering --------------------------------------------------------------------------------------------------

@dataclass
class Answer:
    text: str
    ids: list[int]
    score: float


class MPlugJudge:
    """Answers questions about images with mPLUG VQA."""

    def __init__(self, model: MPlugVQA, tokenizer: Tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @property
    def device(self):
        return self.model.text_decoder.cls.predictions.bias.device

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([preprocess(im, self.model.image_res) for im in images]).to(self.device, self.model.dtype)

    def _answers(self, results) -> list[Answer]:
        return [Answer(self.tokenizer.decode(ids), ids, score) for ids, score in results]

    @torch.no_grad()
    def answer_many(self, images: list[Image.Image], questions: list[list[str]], *, exact: bool = True,
                    chunk: int = 64, kv_cache: bool = False) -> list[list[Answer]]:
        """Every question of every image, each image encoded once, the beams of a question sharing its memory's
        cross-attention keys/values (computed once, not per beam and step as the official does).

        exact=True (default): one image per ViT call and one question per beam search, so every matrix product
        has the official's shapes and the answers and scores are bit-equal to the official per-question path.
        exact=False: all images in one ViT call and up to `chunk` questions per beam search (faster; BLAS may
        round rows differently when it multiplies more of them, about 1e-6 on scores). kv_cache=True also
        caches self-attention keys/values instead of recomputing the (at most max_length) answer prefix.
        """
        if exact:
            out = []
            for image, qs in zip(images, questions):
                states = self.model.encode_image(self.pixels([image])) if qs else None
                out.append([a for q in qs for a in self._search(states, [0], [q], kv_cache)])
            return out
        pairs = [(i, q) for i, qs in enumerate(questions) for q in qs]
        flat: list[Answer] = []
        states = self.model.encode_image(self.pixels(images)) if pairs else None
        for lo in range(0, len(pairs), chunk):
            part = pairs[lo:lo + chunk]
            flat += self._search(states, [i for i, _ in part], [q for _, q in part], kv_cache)
        grouped, k = [], 0
        for qs in questions:
            grouped.append(flat[k:k + len(qs)])
            k += len(qs)
        return grouped

    def _search(self, image_states, which: list[int], questions: list[str], kv_cache: bool) -> list[Answer]:
        """One beam search over questions, question i about image_states[which[i]]."""
        m, gen = self.model, self.model.generation
        ids, mask = self.tokenizer.questions(questions)
        memory, mem_mask = m.memory(image_states, torch.tensor(which, device=self.device), ids.to(self.device),
                                    mask.to(self.device))
        beam = gen.beam_size
        state = {"cross": m.decoder_kv(memory), "mask": memory_mask(mem_mask, memory.dtype), "cache": None}

        def step(seq):
            if not kv_cache:
                return m.decode_full(seq, state["cross"], state["mask"], group=beam)
            logits, state["cache"] = m.decode_step(seq[:, -1:], seq.shape[1] - 1, state["cache"], state["cross"],
                                                   state["mask"], group=beam)
            return logits

        def reorder(index):
            # beams stay grouped by question; a question that ended drops its group
            kept = torch.div(index.view(-1, beam)[:, 0], beam, rounding_mode="floor")
            if kept.numel() != state["mask"].shape[0]:
                state["cross"] = [(k[kept], v[kept]) for k, v in state["cross"]]
                state["mask"] = state["mask"][kept]
            if state["cache"] is not None:
                state["cache"] = [(k[index], v[index]) for k, v in state["cache"]]

        return self._answers(beam_search(len(questions), step, reorder, gen, self.device))

    @torch.no_grad()
    def reference_answer(self, image: Image.Image, question: str) -> Answer:
        """The official per-question path: preprocess and encode the image for this question, then the beam search
        recomputing the whole prefix every step (no cache), memory tiled per beam."""
        m, gen = self.model, self.model.generation
        ids, mask = self.tokenizer.questions([question])
        states = m.encode_image(self.pixels([image]))
        memory, mem_mask = m.memory(states, torch.zeros(1, dtype=torch.long, device=self.device),
                                    ids.to(self.device), mask.to(self.device))
        state = {"memory": memory.repeat_interleave(gen.beam_size, 0),
                 "mask": memory_mask(mem_mask, memory.dtype).repeat_interleave(gen.beam_size, 0)}

        def step(seq):
            return m.decode_full(seq, m.decoder_kv(state["memory"]), state["mask"])

        def reorder(index):
            state["memory"], state["mask"] = state["memory"][index], state["mask"][index]

        return self._answers(beam_search(1, step, reorder, gen, self.device))[0]


def write_model_dir(model: MPlugVQA, folder: str | Path, vocab: list[str], *, image_res: int, vision_width: int,
                    bert_config: dict, clip_name: str = "ViT-L-14", extra: dict[str, torch.Tensor] | None = None,
                    wrap: str | None = None) -> Path:
    """Write `model` as a modelscope model folder (configuration.json, config.yaml, config_bert.json, vocab.txt,
    pytorch_model.bin under modelscope's key names); `extra` adds keys (e.g. momentum copies), `wrap` nests the
    state dict under 'model' or 'module'. For tests and benchmarks."""
    import yaml
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "visual-question-answering", "model": {"type": "mplug"},
        "pipeline": {"type": "visual-question-answering"}}))
    g = model.generation
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "task": "visual-question-answering", "bert_config": "config_bert.json", "image_res": image_res,
        "vision_width": vision_width, "distill": True, "clip_name": clip_name, "beam_size": g.beam_size,
        "min_length": g.min_length, "max_length": g.max_length}))
    (folder / "config_bert.json").write_text(json.dumps(bert_config))
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in vocab))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.update(extra or {})
    torch.save({wrap: state} if wrap else state, folder / CHECKPOINT_NAME)
    return folder


def random_model(bert_config: dict, *, image_res: int, patch: int, width: int, layers: int, vision_width: int,
                 generation: Generation | None = None, seed: int = 0, std: float = 0.05) -> MPlugVQA:
    """A randomly initialised MPlugVQA (tests and benchmarks): weights N(0, std), LayerNorm weights near 1."""
    vision = VisionDims(width=width, layers=layers, patch=patch, rows=(image_res // patch) ** 2 + 1)
    model = MPlugVQA(BertDims.from_dict(bert_config), vision, vision_width, generation or Generation())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"(LayerNorm|ln_\w+|layer_norm)\.weight$", name):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()
