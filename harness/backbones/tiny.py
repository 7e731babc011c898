"""The built-in tiny dMLLM: a small bidirectional transformer over [prompt words; image codes].

Like MMaDA / LLaDA it is one sequence model with no causal mask (RMSNorm, SwiGLU), trained with
the masked-token objective; unlike them it has learned positions (1D for words, 2D for image
slots) and a word-level tokenizer for the shapes grammar, and its image tokenizer is the exact
2x2 patch codebook of harness.shapes.world. It runs on a laptop CPU.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.backbones.base import MASKED, PromptBatch
from harness.shapes import world
from harness.shapes.prompts import COUNT_WORDS, RELATIONS, SIZE_WORDS

PAD, T2I, UNK, TEXT_MASK = "[PAD]", "[T2I]", "[UNK]", "[MASK]"
WORDS = sorted(set(
    "a an photo of and the ,".split()
    + list(COUNT_WORDS.values()) + list(SIZE_WORDS.values())
    + [w for r in RELATIONS for w in r.split()]
    + list(world.COLORS) + list(world.SHAPES)
    + [s + ("es" if s.endswith(("s", "x", "sh", "ch")) else "s") for s in world.SHAPES]
))
VOCAB = [PAD, T2I, UNK, TEXT_MASK] + WORDS


class WordTokenizer:
    """Word-level tokenizer of the shapes grammar. Unknown words raise: the tiny model knows no others."""

    def __init__(self, vocab: list[str] = VOCAB, max_len: int = 48):
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_len = max_len
        self.pad_id, self.t2i_id, self.mask_id = self.index[PAD], self.index[T2I], self.index[TEXT_MASK]

    def words(self, text: str) -> list[str]:
        return text.lower().replace(",", " , ").split()

    def encode(self, text: str) -> list[int]:
        words = self.words(text)
        unknown = [w for w in words if w not in self.index]
        if unknown:
            raise ValueError(f"prompt {text!r} has words the tiny model does not know: {unknown}. "
                             f"Its vocabulary: {' '.join(WORDS)}")
        ids = [self.t2i_id] + [self.index[w] for w in words]
        if len(ids) > self.max_len:
            raise ValueError(f"prompt {text!r} is {len(ids)} tokens; the tiny model takes at most {self.max_len}")
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i not in (self.pad_id, self.t2i_id)).replace(" ,", ",")

    def batch(self, texts: list[str]) -> PromptBatch:
        rows = [self.encode(t) for t in texts]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        attn = ids != self.pad_id
        maskable = attn & (ids != self.t2i_id)
        return PromptBatch(ids=ids, attn=attn, maskable=maskable, texts=list(texts), pad_id=self.pad_id, pad_side="right")


@dataclass
class TinyConfig:
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    mlp_hidden: int = 683          # ~ 8/3 * d, as in SwiGLU models
    text_vocab: int = len(VOCAB)
    max_text_len: int = 48
    codebook_size: int = world.CODEBOOK_SIZE
    grid: int = world.TOKENS_SIDE
    dropout: float = 0.0


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.n_heads = c.n_heads
        self.attn_norm = RMSNorm(c.d_model)
        self.q_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.attn_out = nn.Linear(c.d_model, c.d_model, bias=False)
        self.ff_norm = RMSNorm(c.d_model)
        self.ff_proj = nn.Linear(c.d_model, c.mlp_hidden, bias=False)   # gate (LLaDA's names)
        self.up_proj = nn.Linear(c.d_model, c.mlp_hidden, bias=False)
        self.ff_out = nn.Linear(c.mlp_hidden, c.d_model, bias=False)

    def forward(self, x, key_mask):
        b, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        # bidirectional: every position sees every real (non-pad) position
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, d))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class TinyDMLLM(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.config = c
        n = c.grid * c.grid
        self.text_emb = nn.Embedding(c.text_vocab, c.d_model)
        self.text_pos = nn.Parameter(torch.zeros(c.max_text_len, c.d_model))
        self.code_emb = nn.Embedding(c.codebook_size + 1, c.d_model)   # last row = [MASK]
        self.code_pos = nn.Parameter(torch.zeros(n, c.d_model))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln_f = RMSNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.codebook_size, bias=False)
        self.apply(self._init)
        nn.init.normal_(self.text_pos, std=0.02)
        nn.init.normal_(self.code_pos, std=0.02)
        for blk in self.blocks:  # scaled residual init (GPT-2)
            nn.init.normal_(blk.attn_out.weight, std=0.02 / math.sqrt(2 * c.n_layers))
            nn.init.normal_(blk.ff_out.weight, std=0.02 / math.sqrt(2 * c.n_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, text_ids, text_attn, codes):
        """text_ids/text_attn [B, L]; codes [B, N] with MASKED = -1. Returns logits [B, N, K]."""
        b, length = text_ids.shape
        n = codes.shape[1]
        code_in = torch.where(codes < 0, torch.full_like(codes, self.config.codebook_size), codes)
        x = torch.cat([self.text_emb(text_ids) + self.text_pos[:length], self.code_emb(code_in) + self.code_pos[:n]], dim=1)
        key_mask = torch.cat([text_attn, torch.ones(b, n, dtype=torch.bool, device=codes.device)], dim=1)
        for blk in self.blocks:
            x = blk(x, key_mask)
        return self.head(self.ln_f(x[:, length:]))


class TinyBackbone:
    """The tiny model behind the Backbone protocol."""
    name = "tiny"
    lora_targets = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")

    def __init__(self, config: TinyConfig | None = None, module: TinyDMLLM | None = None):
        self.config = config or TinyConfig()
        self.module = module or TinyDMLLM(self.config)
        self.tokenizer = WordTokenizer(max_len=self.config.max_text_len)
        self.grid = (self.config.grid, self.config.grid)
        self.codebook_size = self.config.codebook_size
        self.image_size = (world.GRID * world.CELL_PX, world.GRID * world.CELL_PX)
        self.text_mask_id = self.tokenizer.mask_id

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def tokenize(self, prompts: list[str]) -> PromptBatch:
        return self.tokenizer.batch(prompts).to(self.device)

    def uncond(self, n: int) -> PromptBatch:
        return self.tokenizer.batch([""] * n).to(self.device)

    def image_logits(self, prompts: PromptBatch, codes: torch.LongTensor) -> torch.Tensor:
        return self.module(prompts.ids, prompts.attn, codes).float()

    def decode_cells(self, codes: torch.LongTensor) -> np.ndarray:
        return world.decode_codes(codes.detach().cpu().numpy())

    def decode(self, codes: torch.LongTensor) -> torch.Tensor:
        rgb = world.cells_to_rgb(self.decode_cells(codes))                  # [B, H, W, 3] uint8
        return torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255.0

    def encode(self, images: torch.Tensor) -> torch.LongTensor:
        rgb = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        cells = np.stack([world.rgb_to_cells(im) for im in rgb])
        return torch.from_numpy(world.encode_cells(cells)).to(self.device)

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        from harness.checkpoint import save_weights
        save_weights(path, self.module.state_dict(), {"backbone": "tiny", "config": json.dumps(asdict(self.config)),
                                                      **{k: str(v) for k, v in (metadata or {}).items()}})


DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "tiny_base.safetensors"


def load_tiny(checkpoint: str | Path | None = None, device: str = "cpu", **overrides) -> TinyBackbone:
    """The tiny backbone: the shipped base checkpoint by default, `checkpoint=""` for random init."""
    from harness.checkpoint import load_weights
    if checkpoint == "":
        return _to(TinyBackbone(TinyConfig(**overrides)), device)
    path = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
    if path.is_dir():   # a run checkpoint folder: its weights file (harness.runs knows the layout)
        from harness.runs import weights_file
        path = weights_file(path)
    state, meta = load_weights(path)
    if meta.get("backbone") != "tiny":
        raise ValueError(f"{path} is a {meta.get('backbone')!r} checkpoint, not a tiny one")
    config = TinyConfig(**{**json.loads(meta["config"]), **overrides})
    bb = TinyBackbone(config)
    bb.module.load_state_dict(state)
    return _to(bb, device)


def _to(bb: TinyBackbone, device: str) -> TinyBackbone:
    bb.module.to(device)
    return bb
