"""FLOP and memory model of the backbones: one forward, one sampler step, a rollout, the estimator passes and the
updates of a GRPO step; the bytes of weights, LoRA, optimizer state and activations (issue 18, item 1).

What is counted
- FLOPs are matmul FLOPs (2 per multiply-add): the seven block Linears, attention (QK^T and PV: 4 L^2 d per
  sequence and layer, padding included, because the key mask does not shorten the kernel), and the output head
  over the N image slots and the K codebook rows only (the adapters slice the head). Norms, RoPE, softmax, SiLU,
  the sampler's Gumbel noise and top-k are elementwise and left out (under 1% at 8B; a few % on the tiny model).
- Model FLOPs (what MFU divides): forward F, backward 2F for what is trained, 1F (input gradients only) for
  frozen weights that gradients pass through. Hardware FLOPs add what kernels really recompute: the score
  matrix in fused attention's backward (+0.5x attention forward, torch's FlopCounterMode convention) and, with
  gradient checkpointing, one more forward of every block.
- LoRA: adapters A [r, d_in] and B [d_out, r] on the chosen block Linears; in block 0 the input of q/k/v does
  not need a gradient (the embedding is frozen), so their input-gradient matmuls are not done.

Constants of the 8B backbones (the configs the adapters are built from)
- LLaDA-8B: d_model 4096, n_layers 32, n_heads = n_kv_heads 32, mlp_hidden_size 12288, rope_theta 500000,
  embedding_size 126464, no biases, untied head: GSAI-ML/LLaDA-8B-Instruct config.json (MMaDA's base,
  ../shared/docs/backbones.md §1.1 "Sizes come from the LLaDA-8B config").
- MMaDA-8B: the same with new_vocab_size 134656 rows (Gen-Verse/MMaDA configs/mmada_demo.yaml).
- Lumina-DiMOO: the same LLaDA-8B architecture with 126356 + 8192 = 134548 head rows (../shared/docs/backbones.md
  §0 and §2.2; harness.backbones.lumina_dimoo.LOGIT_WIDTH, checked at load).

Activations (bytes kept for backward, per token and layer; s = bytes of the weight dtype), as our modules save
them (harness.backbones.llada / tiny; checked against saved-tensor hooks in tests/test_flops.py):
- each RMSNorm: its fp32 input (4d) and 1/rms (4); with a trained norm weight also the normalised input (s d)
- the normed input of q/k/v and of ff_proj/up_proj (s d each) when those Linears are trained (full FT)
- fused attention: q, k, v, out (s (2d + 2 d_kv)) and the logsumexp (4 n_heads)
- SwiGLU: gate, silu(gate), up (3 s h) and, when ff_out is trained, its input (s h)
- LoRA (fp32 adapters, peft's default autocast_adapter_dtype): per adapted Linear the dropout mask and output
  (2 x 4 d_in; without dropout 4 d_in) and A's output (4 r)
With gradient checkpointing only each block's input stays (s d), plus one block's set during its recompute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from harness.backbones.llada import BLOCK_LINEARS, LLaDAConfig

GB = 1e9

LLADA_8B = LLaDAConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                       embedding_size=126464, rope_theta=500000.0, rms_norm_eps=1e-5, max_sequence_length=4096)
MMADA_8B = replace(LLADA_8B, embedding_size=134656)
DIMOO_8B = replace(LLADA_8B, embedding_size=134548)
CODEBOOK = 8192


@dataclass(frozen=True)
class Arch:
    """What the model needs to know of a backbone."""
    name: str
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden: int
    codebook: int                     # K: head rows computed per image slot
    embed_params: int                 # input embeddings, positional tables, final norm
    head_params: int                  # the stored output head (0 when tied)
    block_bias_params: int = 0
    fp32_norm: bool = True            # RMSNorm computes in fp32 (LLaDA) or in the weight dtype (tiny)
    trainable_head_rows: int | None = None   # rows of the head that get a gradient (None: codebook)

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * (self.d_model // self.n_heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each block Linear."""
        d, kv, h = self.d_model, self.kv_dim, self.mlp_hidden
        return {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "attn_out": (d, d),
                "ff_proj": (d, h), "up_proj": (d, h), "ff_out": (h, d)}

    @property
    def block_params(self) -> int:
        return sum(i * o for i, o in self.linear_shapes().values()) + 2 * self.d_model + self.block_bias_params

    @property
    def params(self) -> int:
        return self.embed_params + self.n_layers * self.block_params + self.head_params

    @classmethod
    def from_llada(cls, c: LLaDAConfig, name: str = "llada", codebook: int = CODEBOOK) -> "Arch":
        d, kv = c.d_model, c.n_kv_heads * (c.d_model // c.n_heads)
        bias = 0
        if c.include_bias or c.include_qkv_bias:
            bias += d + 2 * kv
        if c.include_bias:
            bias += 2 * d + 2 * c.mlp_hidden
        norm_bias = (2 if c.norm_bias else 0) * d
        head = 0 if c.weight_tying else c.embedding_size * d + (c.embedding_size if c.include_bias else 0)
        return cls(name, d, c.n_layers, c.n_heads, c.n_kv_heads, c.mlp_hidden_size, codebook,
                   embed_params=c.embedding_size * d + d + (d if c.norm_bias else 0), head_params=head,
                   block_bias_params=bias + norm_bias)

    @classmethod
    def from_tiny(cls, c) -> "Arch":
        d, n = c.d_model, c.grid * c.grid
        embed = c.text_vocab * d + c.max_text_len * d + (c.codebook_size + 1) * d + n * d + d
        return cls("tiny", d, c.n_layers, c.n_heads, c.n_heads, c.mlp_hidden, c.codebook_size,
                   embed_params=embed, head_params=c.codebook_size * d, fp32_norm=False)


def arch_of(module, name: str | None = None) -> Arch:
    """The Arch of a built module: harness LLaDA (or a PeftModel around one) or TinyDMLLM."""
    from harness.backbones.lora import base_module
    m = base_module(module)
    if hasattr(m, "model") and hasattr(m, "config") and isinstance(m.config, LLaDAConfig):
        return Arch.from_llada(m.config, name or "llada")
    return Arch.from_tiny(m.config)


MMADA = Arch.from_llada(MMADA_8B, "mmada-8b")
DIMOO = Arch.from_llada(DIMOO_8B, "lumina-dimoo-8b")


# --- sequence layouts ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    length: int                       # L, positions per sequence (pads included)
    slots: int                        # N, image slots whose logits are computed


def mmada_layout(resolution: int = 512, max_text_len: int = 512) -> Layout:
    n = (resolution // 16) ** 2
    return Layout(max_text_len + 1 + 1 + n + 1, n)        # prompt part, <|soi|>, slots, <|eoi|>


def dimoo_layout(height: int = 512, width: int = 512, prompt_len: int = 40) -> Layout:
    h, w = height // 16, width // 16
    return Layout(prompt_len + 2 + h * (w + 1) + 2, h * w)   # prompt, <answer><IMAGE>, rows + NEWLINE, closers


def tiny_layout(prompt_len: int = 10, grid: int = 8) -> Layout:
    return Layout(prompt_len + grid * grid, grid * grid)


def layout_of(backbone, prompts) -> Layout:
    """The layout the backbone really builds for this prompt batch (padding to the batch's longest included)."""
    import torch
    from harness.backbones.base import MASKED
    n = backbone.grid[0] * backbone.grid[1]
    codes = torch.full((len(prompts), n), MASKED, dtype=torch.long, device=prompts.ids.device)
    if hasattr(backbone, "build_inputs"):
        ids, _, _ = backbone.build_inputs(prompts, codes)
        return Layout(ids.shape[1], n)
    return Layout(prompts.ids.shape[1] + n, n)


# --- FLOPs --------------------------------------------------------------------------------------------------

@dataclass
class Flops:
    linear: float = 0.0
    attention: float = 0.0
    head: float = 0.0
    lora: float = 0.0
    recompute: float = 0.0            # hardware only: attention score recompute, gradient checkpointing

    @property
    def model(self) -> float:
        return self.linear + self.attention + self.head + self.lora

    @property
    def hardware(self) -> float:
        return self.model + self.recompute

    def __add__(self, o: "Flops") -> "Flops":
        return Flops(self.linear + o.linear, self.attention + o.attention, self.head + o.head, self.lora + o.lora,
                     self.recompute + o.recompute)

    def __mul__(self, k: float) -> "Flops":
        return Flops(self.linear * k, self.attention * k, self.head * k, self.lora * k, self.recompute * k)

    __rmul__ = __mul__


def _lora_targets(targets) -> tuple[str, ...]:
    return tuple(BLOCK_LINEARS if targets is None else targets)


def forward_flops(arch: Arch, batch: int, layout: Layout, *, lora_r: int = 0, lora_targets=None) -> Flops:
    """One forward of `batch` sequences (image logits at the N slots)."""
    tokens = batch * layout.length
    per_layer = 2 * tokens * sum(i * o for i, o in arch.linear_shapes().values())
    attn = 4 * batch * layout.length ** 2 * arch.d_model
    lora = 0.0
    if lora_r:
        shapes = arch.linear_shapes()
        lora = arch.n_layers * 2 * tokens * lora_r * sum(sum(shapes[t]) for t in _lora_targets(lora_targets))
    return Flops(linear=arch.n_layers * per_layer, attention=arch.n_layers * attn,
                 head=2 * batch * layout.slots * arch.d_model * arch.codebook, lora=lora)


def backward_flops(arch: Arch, batch: int, layout: Layout, *, trainable: str = "lora", lora_r: int = 0,
                   lora_targets=None, gradient_checkpointing: bool = False) -> Flops:
    """The backward of one training forward. trainable: "full" (every weight) or "lora" (adapters only)."""
    if trainable not in ("full", "lora"):
        raise ValueError(f"trainable must be 'full' or 'lora', not {trainable!r}")
    f = forward_flops(arch, batch, layout, lora_r=lora_r, lora_targets=lora_targets)
    tokens = batch * layout.length
    shapes = arch.linear_shapes()
    recompute = 0.5 * f.attention
    if gradient_checkpointing:
        # torch's non-reentrant checkpoint stops recomputing once the last saved tensor is back: the block's final
        # matmul (ff_out, or its LoRA B when ff_out is adapted) is not redone
        targets = _lora_targets(lora_targets) if (trainable == "lora" and lora_r) else ()
        i, o = shapes["ff_out"]
        last = 2 * tokens * (lora_r * o if "ff_out" in targets else i * o)
        recompute += f.linear + f.attention + f.lora - arch.n_layers * last
    if trainable == "full":
        return Flops(linear=2 * f.linear, attention=2 * f.attention, head=2 * f.head, recompute=recompute)
    # frozen weights: input gradients only, none for q/k/v of block 0 (their input needs no gradient)
    first_qkv = 2 * tokens * sum(i * o for t, (i, o) in shapes.items() if t in ("q_proj", "k_proj", "v_proj"))
    targets = _lora_targets(lora_targets)
    first_lora_in = 2 * tokens * lora_r * sum(shapes[t][0] for t in targets if t in ("q_proj", "k_proj", "v_proj"))
    return Flops(linear=f.linear - first_qkv, attention=2 * f.attention, head=f.head,
                 lora=2 * f.lora - (first_lora_in if lora_r else 0.0), recompute=recompute)


def rollout_steps_run(steps: int, n_slots: int, schedule: str = "cosine") -> int:
    """Forward passes the sampler makes (it stops once nothing is left to commit)."""
    from harness.sampling import mask_schedule
    keep = mask_schedule(steps, n_slots, schedule)
    return next((s for s in range(1, steps) if keep[s - 1] == 0), steps)


def rollout_flops(arch: Arch, images: int, layout: Layout, steps: int, *, cfg: bool = True,
                  schedule: str = "cosine", lora_r: int = 0, lora_targets=None) -> Flops:
    """A rollout of `images` images: one forward of 2B sequences per step with CFG (cond and uncond batched).
    `layout` is the CFG batch's (cond and uncond padded to one length). LoRA adapters, if any, run unmerged."""
    per = forward_flops(arch, images * (2 if cfg else 1), layout, lora_r=lora_r, lora_targets=lora_targets)
    return per * rollout_steps_run(steps, layout.slots, schedule)


def sampler_step_flops(arch: Arch, images: int, layout: Layout, *, cfg: bool = True, lora_r: int = 0) -> Flops:
    return forward_flops(arch, images * (2 if cfg else 1), layout, lora_r=lora_r)


@dataclass
class StepFlops:
    rollout: Flops
    estimator: Flops                  # no-grad passes: pi_old, pi_ref, the all-masked entropy pass
    update: Flops                     # forward + backward of the K inner iterations
    parts: dict = field(default_factory=dict)

    @property
    def total(self) -> Flops:
        return self.rollout + self.estimator + self.update


def train_step_flops(arch: Arch, *, rollouts: int, layout: Layout, rollout_layout: Layout | None = None,
                     sampler_steps: int, cfg: bool = True, schedule: str = "cosine", views: int,
                     masked_entropy: bool = False, reference: bool = True, trainable: str = "lora",
                     lora_r: int = 0, lora_targets=None, gradient_checkpointing: bool = False) -> StepFlops:
    """One GRPO step of trainers.loop.train_step: rollouts, then for every view of the K inner iterations
    (`views` = their total) one pi_old and (beta_kl > 0) one pi_ref pass, then forward + backward per view."""
    r = lora_r if trainable == "lora" else 0
    roll = rollout_flops(arch, rollouts, rollout_layout or layout, sampler_steps, cfg=cfg, schedule=schedule,
                         lora_r=r, lora_targets=lora_targets)
    fwd = forward_flops(arch, rollouts, layout, lora_r=r, lora_targets=lora_targets)
    passes = views * (2 if reference else 1) + (1 if masked_entropy else 0)
    if reference and trainable == "lora":   # pi_ref: the adapter is disabled, base weights only
        est = fwd * (views + (1 if masked_entropy else 0)) + replace(fwd, lora=0.0) * views
    else:
        est = fwd * passes
    bwd = backward_flops(arch, rollouts, layout, trainable=trainable, lora_r=r, lora_targets=lora_targets,
                         gradient_checkpointing=gradient_checkpointing)
    return StepFlops(roll, est, (fwd + bwd) * views, {"estimator_passes": passes, "views": views})


# --- memory -------------------------------------------------------------------------------------------------

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def lora_params(arch: Arch, r: int, targets=None) -> int:
    shapes = arch.linear_shapes()
    return arch.n_layers * r * sum(sum(shapes[t]) for t in _lora_targets(targets))


def block_activation_bytes(arch: Arch, *, dtype: str = "bfloat16", trainable: str = "lora", lora_r: int = 0,
                           lora_targets=None, lora_dropout: float = 0.0, first_block: bool = False) -> float:
    """Bytes per token one block keeps for its backward (no gradient checkpointing)."""
    s = DTYPE_BYTES[dtype]
    d, kv, h = arch.d_model, arch.kv_dim, arch.mlp_hidden
    full = trainable == "full"
    # fp32 input (LLaDA casts; the tiny model's fp32 input is the same size), 1/rms, normed input (trained weight)
    norm = 4 * d + 4 + (s * d if full else 0)
    total = 2 * norm
    if full:
        total += 2 * s * d                          # the normed inputs of q/k/v and ff_proj/up_proj
    total += s * (2 * d + 2 * kv) + 4 * arch.n_heads  # fused attention: q, k, v, out, logsumexp
    total += 3 * s * h + (s * h if full else 0)      # SwiGLU
    if trainable == "lora" and lora_r:
        shapes = arch.linear_shapes()
        for t in _lora_targets(lora_targets):
            d_in = shapes[t][0]
            if lora_dropout > 0:
                keep = 4 * d_in if (first_block and t in ("q_proj", "k_proj", "v_proj")) else 8 * d_in
            else:
                keep = 4 * d_in
            total += keep + 4 * lora_r
        if first_block:
            total -= 4 * d + 4                      # block 0's attn_norm input needs no gradient
    return total


def head_activation_bytes(arch: Arch, *, dtype: str = "bfloat16", trainable: str = "lora") -> float:
    """Bytes per image slot the final norm, the head and log_softmax keep for the backward."""
    s = DTYPE_BYTES[dtype]
    d, k = arch.d_model, arch.codebook
    full = trainable == "full"
    return 4 * d + 4 + (s * d if full else 0) + (4 * d if full else 0) + 4 * k


def activation_bytes(arch: Arch, batch: int, layout: Layout, *, dtype: str = "bfloat16", trainable: str = "lora",
                     lora_r: int = 0, lora_targets=None, lora_dropout: float = 0.0,
                     gradient_checkpointing: bool = False) -> dict:
    """Activation memory of one training micro-batch: what the forward keeps (`saved`) and the backward's peak
    extra (`peak` = saved + the fp32 logits gradient, and with checkpointing one block's recomputed set)."""
    s = DTYPE_BYTES[dtype]
    tokens = batch * layout.length
    kw = dict(dtype=dtype, trainable=trainable, lora_r=lora_r, lora_targets=lora_targets, lora_dropout=lora_dropout)
    per_block = block_activation_bytes(arch, **kw)
    first = block_activation_bytes(arch, first_block=True, **kw)
    head = batch * layout.slots * head_activation_bytes(arch, dtype=dtype, trainable=trainable)
    head_weight = arch.codebook * arch.d_model * 4 if s != 4 else 0   # the fp32 copy of the head slice
    # the last block's output (kept by the slot gather / slice), token ids (embedding backward), RoPE tables
    extras = tokens * s * arch.d_model + (8 * tokens if trainable == "full" else 0)
    if arch.fp32_norm:
        extras += 2 * layout.length * (arch.d_model // arch.n_heads) * 4
    else:   # tiny: the final norm's input is that same block output, already counted
        head -= batch * layout.slots * 4 * arch.d_model
    head += extras
    if gradient_checkpointing:
        saved = tokens * arch.n_layers * s * arch.d_model + head + head_weight
        peak = saved + tokens * per_block
    else:
        saved = tokens * (first + (arch.n_layers - 1) * per_block) + head + head_weight
        peak = saved
    logits_grad = 2 * batch * layout.slots * arch.codebook * 4       # dlogp and dlogits, fp32
    return {"saved": saved, "peak": peak + logits_grad, "per_token_layer": per_block}


def inference_bytes(arch: Arch, batch: int, layout: Layout, *, dtype: str = "bfloat16", cfg: bool = True) -> float:
    """Working set of one sampler step beyond the weights: the residual stream and one block's largest
    intermediates for the 2B CFG sequences, and the sampler's fp32 [B, N, K] tensors (guided logits, Gumbel
    noise, log-softmax, its exp and product: about 8 alive at once, plus the 2B raw logits)."""
    s = DTYPE_BYTES[dtype]
    seqs = batch * (2 if cfg else 1)
    tokens = seqs * layout.length
    stream = tokens * (2 * s * arch.d_model + 3 * s * arch.mlp_hidden + 4 * arch.d_model)
    sampler = (8 * batch + 2 * seqs) * layout.slots * arch.codebook * 4
    return stream + sampler


def memory_model(arch: Arch, *, dtype: str = "bfloat16", trainable: str = "lora", lora_r: int = 128,
                 lora_targets=None, lora_dropout: float = 0.05, reference: bool = True,
                 micro_batch: int = 1, layout: Layout, gradient_checkpointing: bool = True,
                 rollout_batch: int = 1) -> dict:
    """Bytes of one training process: weights, trainable state (fp32 LoRA, or the weights themselves in full FT,
    each with a gradient and AdamW's two moments in the parameter dtype), a frozen reference copy (full FT with a
    KL term; LoRA disables the adapter instead), training activations per micro-batch and the rollout working set."""
    s = DTYPE_BYTES[dtype]
    out = {"weights": arch.params * s}
    if trainable == "lora":
        n = lora_params(arch, lora_r, lora_targets)
        out.update(trainable_params=n, lora=4 * n, grads=4 * n, optimizer=8 * n, reference=0)
    else:
        n = arch.params
        out.update(trainable_params=n, lora=0, grads=s * n, optimizer=2 * s * n, reference=s * n if reference else 0)
    act = activation_bytes(arch, micro_batch, layout, dtype=dtype, trainable=trainable, lora_r=lora_r,
                           lora_targets=lora_targets, lora_dropout=lora_dropout,
                           gradient_checkpointing=gradient_checkpointing)
    out["activations"] = act["peak"]
    out["rollout"] = inference_bytes(arch, rollout_batch, layout, dtype=dtype)
    static = out["weights"] + out["lora"] + out["grads"] + out["optimizer"] + out["reference"]
    out["static"] = static
    out["train_peak"] = static + out["activations"]
    out["rollout_peak"] = static + out["rollout"]
    out["peak"] = max(out["train_peak"], out["rollout_peak"])
    return out


# --- measurement helpers (tests and benchmarks) -------------------------------------------------------------

def cpu_sdpa_mapping() -> dict:
    """FlopCounterMode formulas for CPU's fused attention ops, which torch does not register (CUDA's are)."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count
    aten = torch.ops.aten

    def fwd(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return mapping


def count_flops(fn) -> tuple[int, object]:
    """(FLOPs torch's FlopCounterMode counts while fn() runs, fn's result), CPU attention included."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa_mapping()) as fc:
        out = fn()
    return fc.get_total_flops(), out


def saved_activation_bytes(fn, module) -> tuple[int, object]:
    """(bytes of the distinct non-parameter storages autograd saves while fn() runs, fn's result)."""
    import torch
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def fmt_flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOP"


def fmt_bytes(x: float) -> str:
    return f"{x / 2 ** 30:.2f} GiB" if x >= 2 ** 30 else f"{x / 2 ** 20:.1f} MiB"


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    return flops / seconds / peak_flops if seconds > 0 and peak_flops > 0 else math.nan
