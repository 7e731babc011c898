"""LLaDA-8B, the bidirectional transformer under MMaDA and Lumina-DiMOO, as a plain torch module.

Parameter names are the official checkpoint names (../shared backbones.md §1.1, and the LLaDA
`LLaDAModelLM` wrapper whose `base_model_prefix` is "model"):

    model.transformer.wte.weight                               [V, d]   token embedding
    model.transformer.blocks.{i}.attn_norm.weight              [d]      RMSNorm
    model.transformer.blocks.{i}.{q,k,v}_proj.weight           q: [d, d], k/v: [n_kv_heads * d/n_heads, d]
    model.transformer.blocks.{i}.attn_out.weight               [d, d]
    model.transformer.blocks.{i}.ff_norm.weight                [d]
    model.transformer.blocks.{i}.{ff_proj,up_proj}.weight      [hidden, d]   (ff_proj is the SiLU gate)
    model.transformer.blocks.{i}.ff_out.weight                 [d, hidden]
    model.transformer.ln_f.weight                              [d]
    model.transformer.ff_out.weight                            [V, d]   untied output head

Block: x += attn_out(attention(attn_norm(x))); x += ff_out(silu(ff_proj(h)) * up_proj(h)), h = ff_norm(x).
RMSNorm and RoPE run in fp32 and cast back, as upstream. RoPE is the rotate-half form over
positions 0..L-1 of the whole sequence (pads included), as upstream.

Attention is never causal. Padding is handled by a key mask only: every query sees every real
token. (Upstream builds a causal bias when it gets `attention_mask` without `attention_bias`, the
pitfall of backbones.md §1.1; this module has no such path.) Pad queries also see all real keys,
which differs from upstream's all-masked pad rows only at pad positions, whose outputs are unused.

`forward` can return logits for chosen positions and a chosen slice of the head's rows only: an
image forward needs [B, N, 8192], while the full head would be [B, L, 134k] (0.4-1.1 GB a sample).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from harness.backbones import hub

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


@dataclass
class LLaDAConfig:
    d_model: int
    n_layers: int
    n_heads: int
    mlp_hidden_size: int
    embedding_size: int                 # rows of wte and of the output head
    n_kv_heads: int | None = None       # None: = n_heads (LLaDA-8B is plain multi-head)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    include_bias: bool = False
    include_qkv_bias: bool = False
    norm_bias: bool = False
    weight_tying: bool = False
    max_sequence_length: int = 4096     # informational: RoPE is computed for any length

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"d_model {self.d_model}, n_heads {self.n_heads}, n_kv_heads {self.n_kv_heads} do not divide")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("RoPE needs an even head size")

    def to_json(self) -> dict:
        """config.json in LLaDA's own key names."""
        return {"model_type": "llada", "architectures": ["LLaDAModelLM"],
                "d_model": self.d_model, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "mlp_hidden_size": self.mlp_hidden_size,
                "vocab_size": self.embedding_size, "embedding_size": self.embedding_size,
                "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps,
                "include_bias": self.include_bias, "include_qkv_bias": self.include_qkv_bias,
                "bias_for_layer_norm": self.norm_bias, "weight_tying": self.weight_tying,
                "max_sequence_length": self.max_sequence_length, "block_type": "llama", "block_group_size": 1,
                "activation_type": "silu", "layer_norm_type": "rms", "rope": True, "rope_full_precision": True,
                "alibi": False, "scale_logits": False, "input_emb_norm": False, "attention_layer_norm": False}


# Config keys: LLaDA's names first, then the HF-Llama-style aliases some re-exports use.
_ALIASES = {
    "d_model": ("d_model", "hidden_size"),
    "n_layers": ("n_layers", "num_hidden_layers"),
    "n_heads": ("n_heads", "num_attention_heads"),
    "n_kv_heads": ("n_kv_heads", "num_key_value_heads"),
    "mlp_hidden_size": ("mlp_hidden_size", "intermediate_size"),
    # MMaDA resizes the vocabulary to new_vocab_size (134656); the checkpoint's wte shape decides anyway
    "embedding_size": ("new_vocab_size", "embedding_size", "vocab_size"),
    "rope_theta": ("rope_theta",),
    "rms_norm_eps": ("rms_norm_eps", "layer_norm_eps"),
    "max_sequence_length": ("max_sequence_length", "max_position_embeddings"),
}
# Features LLaDA's config can switch on that this module does not implement: (key, allowed values).
_UNSUPPORTED = {
    "block_type": (None, "llama"), "block_group_size": (None, 1), "layer_norm_type": (None, "rms"),
    "activation_type": (None, "silu"), "alibi": (None, False), "rope": (None, True),
    "scale_logits": (None, False), "input_emb_norm": (None, False), "attention_layer_norm": (None, False),
    "clip_qkv": (None,), "multi_query_attention": (None, False),
}


def config_from_json(raw: dict, source: str = "config.json") -> LLaDAConfig:
    """LLaDAConfig from a HF-style config dict, tolerant of key spellings; unsupported features raise."""
    if "d_model" not in raw and "hidden_size" not in raw:   # some wrappers nest the LLM config one level down
        nested = [v for v in raw.values() if isinstance(v, dict) and ("d_model" in v or "hidden_size" in v)]
        if len(nested) == 1:
            raw = {**raw, **nested[0]}

    def pick(field: str, default=None):
        for key in _ALIASES[field]:
            if raw.get(key) is not None:
                return raw[key]
        if default is None:
            raise ValueError(f"{source} has none of the keys {_ALIASES[field]} (needed for {field})")
        return default

    for key, allowed in _UNSUPPORTED.items():
        if raw.get(key) not in allowed:
            raise ValueError(f"{source}: {key}={raw.get(key)!r} is not supported by harness.backbones.llada "
                             f"(supported: {[a for a in allowed if a is not None]})")
    d_model = int(pick("d_model"))
    if any(raw.get(k) is not None for k in _ALIASES["mlp_hidden_size"]):
        hidden = int(pick("mlp_hidden_size"))
    elif raw.get("mlp_ratio") is not None:
        hidden = int(raw["mlp_ratio"] * d_model)
    else:
        raise ValueError(f"{source} has neither mlp_hidden_size nor mlp_ratio")
    include_bias = bool(raw.get("include_bias", False))
    norm_bias = raw.get("bias_for_layer_norm")
    return LLaDAConfig(
        d_model=d_model, n_layers=int(pick("n_layers")), n_heads=int(pick("n_heads")),
        n_kv_heads=int(pick("n_kv_heads", pick("n_heads"))), mlp_hidden_size=hidden,
        embedding_size=int(pick("embedding_size")), rope_theta=float(pick("rope_theta", 10000.0)),
        rms_norm_eps=float(pick("rms_norm_eps", 1e-5)), include_bias=include_bias,
        include_qkv_bias=bool(raw.get("include_qkv_bias", False)),
        norm_bias=include_bias if norm_bias is None else bool(norm_bias),
        weight_tying=bool(raw.get("weight_tying", raw.get("tie_word_embeddings", False))),
        max_sequence_length=int(pick("max_sequence_length", 4096)))


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return self.weight * x + self.bias if self.bias is not None else self.weight * x


def rope_tables(length: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin [L, head_dim] for positions 0..L-1 (frequencies repeated for both halves)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, hd]; rotate-half RoPE computed in fp32, returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    def __init__(self, c: LLaDAConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.d_model // c.n_heads
        kv_dim = c.n_kv_heads * self.head_dim
        qkv_bias = c.include_bias or c.include_qkv_bias
        self.attn_norm = RMSNorm(c.d_model, c.rms_norm_eps, c.norm_bias)
        self.q_proj = nn.Linear(c.d_model, c.d_model, bias=qkv_bias)
        self.k_proj = nn.Linear(c.d_model, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(c.d_model, kv_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(c.d_model, c.d_model, bias=c.include_bias)
        self.ff_norm = RMSNorm(c.d_model, c.rms_norm_eps, c.norm_bias)
        self.ff_proj = nn.Linear(c.d_model, c.mlp_hidden_size, bias=c.include_bias)
        self.up_proj = nn.Linear(c.d_model, c.mlp_hidden_size, bias=c.include_bias)
        self.ff_out = nn.Linear(c.mlp_hidden_size, c.d_model, bias=c.include_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None,
                kv_out: list | None = None) -> torch.Tensor:
        b, length, d = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_out is not None:          # ML-Cache refresh: keep this block's keys (after RoPE) and values
            kv_out.append((k, v))
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        # key_mask [B, 1, 1, L]: True = may be attended to. No causal mask, ever.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False)
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, length, d))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))

    def forward_rows(self, x: torch.Tensor, index: torch.LongTensor, cos: torch.Tensor, sin: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """The block at C of the L positions only (ML-Cache): x [B, C, d] are the rows at `index` [B, C], cos/sin
        [B, 1, C, hd] their RoPE rows. Their keys and values overwrite those rows of the cached `keys` / `values`
        [B, H_kv, L, hd] (in place); their queries attend to all L cached keys, the others' being stale."""
        b, c, d = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, c, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, c, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, c, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        where = index[:, None, :, None].expand(-1, self.n_kv_heads, -1, self.head_dim)
        keys.scatter_(2, where, k)
        values.scatter_(2, where, v)
        k, v = keys, values
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False)
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, c, d))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDABody(nn.Module):
    """Holds `transformer` so the state-dict keys read model.transformer.* under LLaDA."""

    def __init__(self, c: LLaDAConfig):
        super().__init__()
        parts = dict(wte=nn.Embedding(c.embedding_size, c.d_model),
                     blocks=nn.ModuleList(LLaDABlock(c) for _ in range(c.n_layers)),
                     ln_f=RMSNorm(c.d_model, c.rms_norm_eps, c.norm_bias))
        if not c.weight_tying:
            parts["ff_out"] = nn.Linear(c.d_model, c.embedding_size, bias=c.include_bias)
        self.transformer = nn.ModuleDict(parts)


class LLaDA(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.model = LLaDABody(config)
        self.gradient_checkpointing = False

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> "LLaDA":
        """Random init (replicas and tests); real use loads a checkpoint."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) * std)
        return self

    def gradient_checkpointing_enable(self, **_) -> None:
        """Recompute each block in the backward pass (the trainer calls this by name, as on HF models)."""
        self.gradient_checkpointing = True

    @property
    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = self.model.transformer
        if self.config.weight_tying:
            return t.wte.weight, None
        return t.ff_out.weight, t.ff_out.bias

    # key_mask [B, L] with nothing padded is passed to attention as None (plain SDPA; on CUDA the flash kernel takes
    # no mask). Deciding that reads one bool from the device, a host sync per forward; mask_check = False always
    # passes the mask (no sync). On CPU both give bit-identical outputs (tests/test_ml_cache.py); on CUDA they may
    # pick different SDPA kernels, so the default keeps the check.
    mask_check: bool = True

    def _attention_mask(self, key_mask: torch.BoolTensor | None) -> torch.Tensor | None:
        # key_mask [B, L], True on real tokens -> [B, 1, 1, L]; None when nothing is padded
        if key_mask is None or (self.mask_check and bool(key_mask.all())):
            return None
        return key_mask[:, None, None, :]

    def _rope(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        # RoPE tables for any length (upstream extends its cache past max_sequence_length too; DiMOO at
        # 1024x1024 px runs ~4.2k tokens against LLaDA's 4096)
        return rope_tables(length, self.config.d_model // self.config.n_heads, self.config.rope_theta, device)

    def _blocks(self, input_ids: torch.LongTensor, key_mask: torch.BoolTensor | None,
                kv_out: list | None = None) -> torch.Tensor:
        t = self.model.transformer
        x = t.wte(input_ids)
        cos, sin = self._rope(input_ids.shape[1], x.device)
        mask = self._attention_mask(key_mask)
        for blk in t.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, cos, sin, mask, use_reentrant=False)
            else:
                x = blk(x, cos, sin, mask, kv_out)
        return x

    def hidden_states(self, input_ids: torch.LongTensor, key_mask: torch.BoolTensor | None = None) -> torch.Tensor:
        """Final hidden states after ln_f, [B, L, d], at every position."""
        return self.model.transformer.ln_f(self._blocks(input_ids, key_mask))

    def _logits(self, x: torch.Tensor, positions: torch.LongTensor | None,
                vocab_slice: tuple[int, int] | None) -> torch.Tensor:
        if positions is not None:
            x = x.gather(1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = self.model.transformer.ln_f(x)
        weight, bias = self.head
        if vocab_slice is not None:
            start, count = vocab_slice
            if start < 0 or start + count > weight.shape[0]:
                raise ValueError(f"vocab slice [{start}, {start + count}) is outside the head's {weight.shape[0]} rows")
            weight = weight[start:start + count]
            bias = None if bias is None else bias[start:start + count]
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())

    def forward(self, input_ids: torch.LongTensor, key_mask: torch.BoolTensor | None = None,
                positions: torch.LongTensor | None = None, vocab_slice: tuple[int, int] | None = None) -> torch.Tensor:
        """fp32 logits. `positions` [B, N]: only those rows; `vocab_slice` (start, count): only those head rows.

        The head runs in fp32 (an 8192 x d slice is cheap) so RL log-probs do not carry bf16 logit error.
        """
        return self._logits(self._blocks(input_ids, key_mask), positions, vocab_slice)

    # --- Lumina-DiMOO's ML-Cache (max-logit cache) -----------------------------------------------------------
    # Alpha-VLLM/Lumina-DiMOO @ 81344e60545ae8d70f11039d3450717d974f831b: model/modeling_llada.py
    # (LLaDALlamaBlock.forward L911-940: per block and per 'cat' (cond / uncond) a cache of keys and values at every
    # position, overwritten at the computed rows; LLaDAModel.forward L1244-1245: only the to_compute_mask rows enter
    # the model; L1406-1413: a logit cache at every position, overwritten at the computed rows) and
    # generators/image_generation_generator.py (which steps refresh everything, which rows are recomputed: see
    # harness/sampling.py). Keys are kept after RoPE here (upstream keeps them before and rotates all L every
    # step; RoPE is per position, so the attention inputs are the same).

    @torch.no_grad()
    def ml_cache_refresh(self, input_ids: torch.LongTensor, key_mask: torch.BoolTensor | None,
                         positions: torch.LongTensor, vocab_slice: tuple[int, int]) -> tuple[torch.Tensor, "MLCacheState"]:
        """A full forward (the same arithmetic as `forward`, so its slot logits equal forward's bit for bit) that
        also returns the cache: every block's keys and values, and the head's `vocab_slice` rows at every position."""
        kv: list = []
        x = self._blocks(input_ids, key_mask, kv)
        slot_logits = self._logits(x, positions, vocab_slice)
        every = self._logits(x, None, vocab_slice)
        every.scatter_(1, positions.unsqueeze(-1).expand(-1, -1, every.shape[-1]), slot_logits)
        keys = [k.contiguous() for k, _ in kv]
        values = [v.contiguous() for _, v in kv]
        return slot_logits, MLCacheState(keys=keys, values=values, logits=every, positions=positions)

    @torch.no_grad()
    def ml_cache_step(self, input_ids: torch.LongTensor, key_mask: torch.BoolTensor | None,
                      state: "MLCacheState", index: torch.LongTensor, vocab_slice: tuple[int, int]) -> torch.Tensor:
        """A cached forward: only the positions `index` [B, C] go through the blocks (their current ids); their keys,
        values and logits overwrite the cache's, every other position keeps its cached ones. Returns the slot
        logits [B, N, K] from the (updated) logit cache."""
        t = self.model.transformer
        x = t.wte(input_ids.gather(1, index))
        cos, sin = self._rope(input_ids.shape[1], x.device)
        cos_rows, sin_rows = cos[index].unsqueeze(1), sin[index].unsqueeze(1)     # [B, 1, C, hd]
        mask = self._attention_mask(key_mask)
        for blk, keys, values in zip(t.blocks, state.keys, state.values):
            x = blk.forward_rows(x, index, cos_rows, sin_rows, keys, values, mask)
        rows = self._logits(x, None, vocab_slice)
        state.logits.scatter_(1, index.unsqueeze(-1).expand(-1, -1, rows.shape[-1]), rows)
        return state.logits.gather(1, state.positions.unsqueeze(-1).expand(-1, -1, rows.shape[-1]))


def ml_cache_count(length: int, compute_ratio: float) -> int:
    """How many of `length` positions upstream recomputes at a cached step: those whose max logit is <=
    torch.quantile(max logits, compute_ratio) (image_generation_generator.py L139-141), counted here on distinct
    values with the same torch.quantile arithmetic (float32, linear interpolation), so ties aside it is upstream's."""
    ranks = torch.arange(length, dtype=torch.float32)
    return int((ranks <= torch.quantile(ranks, compute_ratio)).sum())


@dataclass
class MLCacheState:
    """What the ML-Cache keeps between sampler steps for one batch of sequences (cond and uncond rows alike: each
    row is its own sequence, as upstream's separate 'cond' / 'uncond' caches)."""
    keys: list[torch.Tensor]        # per block [B, H_kv, L, hd], after RoPE
    values: list[torch.Tensor]      # per block [B, H_kv, L, hd]
    logits: torch.Tensor            # [B, L, K] fp32, the head's image-code rows at every position
    positions: torch.LongTensor     # [B, N] where the slots are
    counts: list[int] = field(default_factory=list)   # per row, how many real positions a cached step recomputes

    def rows_to_compute(self, key_mask: torch.BoolTensor | None, counts: list[int]) -> torch.LongTensor:
        """[B, C]: per row the counts[i] real positions with the lowest max logit (upstream's to_compute_mask, from
        the logits of the step before), then pad positions of that row up to C = max(counts) (pads are masked keys:
        recomputing them changes no real position)."""
        conf = self.logits.max(dim=-1).values                                        # [B, L]
        if key_mask is not None:
            conf = conf.masked_fill(~key_mask, float("inf"))                         # pads sort last
        order = conf.argsort(dim=1, stable=True)
        width = max(counts)
        b, length = conf.shape
        real = (key_mask.sum(1) if key_mask is not None else torch.full((b,), length, device=conf.device))
        j = torch.arange(width, device=conf.device)[None]
        need = torch.tensor(counts, device=conf.device)[:, None]
        pick = torch.where(j < need, j, real[:, None] + (j - need))                  # the row's pads after its reals
        return order.gather(1, pick).sort(dim=1).values


LAYOUT = "config.json (LLaDA keys: d_model, n_layers, n_heads, mlp_hidden_size, ...) and *.safetensors " \
         "(or model.safetensors.index.json + shards) with keys model.transformer.*"


def load_llada(directory: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
               model_id: str = "LLaDA", layout: str = LAYOUT) -> LLaDA:
    """Build on the meta device, then assign the checkpoint's tensors (no fp32 copy of 8B weights)."""
    hub.require_files(directory, ["config.json"], model_id=model_id, layout=layout)
    config = config_from_json(hub.read_json(directory / "config.json"), str(directory / "config.json"))
    files = hub.safetensors_files(directory, model_id=model_id, layout=layout)
    shapes = hub.tensor_shapes(files)
    # tolerate a checkpoint saved from the inner model (keys transformer.* without the model. prefix)
    bare = not any(k.startswith("model.") for k in shapes) and any(k.startswith("transformer.") for k in shapes)
    prefix = "model." if bare else ""
    wte = shapes.get(("transformer" if bare else "model.transformer") + ".wte.weight")
    if wte is not None:
        config.embedding_size = wte[0]   # the checkpoint decides the vocabulary rows
    with torch.device("meta"):
        model = LLaDA(config)
    state = {prefix + k: v for k, v in hub.read_tensors(files, device, dtype).items()}
    hub.check_state_keys(set(model.state_dict()), set(state), source=directory, hint="model.transformer.wte / "
                         "blocks.{i}.{attn_norm,q_proj,k_proj,v_proj,attn_out,ff_norm,ff_proj,up_proj,ff_out} / ln_f / ff_out")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device)


def write_llada_checkpoint(model: LLaDA, directory: str | Path, extra_config: dict | None = None) -> Path:
    """config.json + model.safetensors in the official format (used to build tiny replicas)."""
    from harness.checkpoint import save_weights
    from harness.io import atomic_write_json
    directory = Path(directory)
    atomic_write_json(directory / "config.json", {**model.config.to_json(), **(extra_config or {})})
    save_weights(directory / "model.safetensors", model.state_dict(), {"format": "pt"})
    return directory


class LLaDAImageBackbone:
    """What MMaDA and Lumina-DiMOO share on top of the LLaDA transformer: the device, the image forward (the
    subclass's build_inputs gives the sequence; logits at the slots over the code rows of the head), prompt
    batches and the adapter's save. Each subclass sets name, CODE_OFFSET, CODEBOOK_SIZE and _batch."""
    lora_targets = BLOCK_LINEARS
    CODE_OFFSET: int
    CODEBOOK_SIZE: int

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def llada(self) -> LLaDA:
        from harness.backbones.lora import base_module
        return base_module(self.module)

    def tokenize(self, prompts: list[str]):
        return self._batch(list(prompts), uncond=False)

    def uncond(self, n: int):
        return self._batch([""] * n, uncond=True)

    def image_logits(self, prompts, codes: torch.LongTensor) -> torch.Tensor:
        ids, key_mask, positions = self.build_inputs(prompts.to(self.device), codes)
        return self.module(ids, key_mask, positions, (self.CODE_OFFSET, self.CODEBOOK_SIZE))

    @torch.no_grad()
    def image_logits_ml_cache(self, prompts, codes: torch.LongTensor, state: MLCacheState | None, *,
                              compute_ratio: float) -> tuple[torch.Tensor, MLCacheState]:
        """image_logits under Lumina-DiMOO's ML-Cache: state None = a refresh (a full forward, equal to
        image_logits, that fills the cache); else a cached forward of the rows the cache picks (per row the
        ml_cache_count(real length, compute_ratio) positions of lowest max logit at the step before)."""
        ids, key_mask, positions = self.build_inputs(prompts.to(self.device), codes)
        vocab = (self.CODE_OFFSET, self.CODEBOOK_SIZE)
        llada = self.llada
        if state is None:
            logits, state = llada.ml_cache_refresh(ids, key_mask, positions, vocab)
            lengths = [ids.shape[1]] * ids.shape[0] if key_mask is None else key_mask.sum(1).tolist()
            state.counts = [ml_cache_count(int(n), compute_ratio) for n in lengths]
            return logits, state
        index = state.rows_to_compute(key_mask, state.counts)
        return llada.ml_cache_step(ids, key_mask, state, index, vocab), state

    def save(self, path, metadata: dict | None = None) -> None:
        from harness.backbones.lora import save_trainable
        save_trainable(self, path, {**self.save_metadata(), **(metadata or {})})

    def save_metadata(self) -> dict:
        return {}


def load_llada_backbone(directory: Path, make, *, device, dtype, model_id: str, layout: str, lora,
                        gradient_checkpointing: bool):
    """The loading both share: the transformer from `directory` (load_llada), then make(module) builds the
    backbone around it, then the adapter: None; a dict {r, alpha, dropout, targets} for a fresh one; or a file
    written by `save` (adapter weights + settings)."""
    from harness.backbones.lora import apply_lora, load_trainable
    module = load_llada(directory, device=device, dtype=hub.parse_dtype(dtype), model_id=model_id, layout=layout)
    module.gradient_checkpointing = gradient_checkpointing
    backbone = make(module)
    if isinstance(lora, dict):
        apply_lora(backbone, **lora)
    elif lora is not None:
        load_trainable(backbone, lora)
    return backbone

