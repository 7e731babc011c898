"""The backbone interface every model implements: tiny, MMaDA and Lumina-DiMOO.

Image codes are LongTensors [B, N] in row-major grid order with values 0..K-1, and -1 for a
masked slot. Backbones map codes to their own vocabulary (offsets, newline tokens, [MASK] id)
inside `image_logits`, so samplers, trainers and evaluators never see vocabulary ids.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol, runtime_checkable

import torch

MASKED = -1   # the value of a masked slot in a codes tensor


DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def check_device(name: str, require_available: bool = True) -> str:
    """A device name a user gave, checked and resolved ("auto": cuda where there is one, else cpu); a name torch
    does not know or (with require_available) a device this machine lacks is a one-line error before any weight
    is loaded. Without require_available only the spelling is checked (validating a config for another machine)."""
    text = str(name).strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"device {name!r} is not one of {', '.join(DEVICE_NAMES)}")
    if not require_available:
        return text
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine (torch {torch.__version__}); "
                             f"use --device cpu or auto")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r}: MPS is not available on this machine; use --device cpu or auto")
    return text


@dataclass
class PromptBatch:
    """Tokenised prompts, padded to one length. `attn` is True on real tokens.

    `maskable` marks tokens that prompt masking (d1's p_mask_prompt) may replace by `mask_id`;
    template tokens (task tokens, BOS/EOS, chat template) are never maskable.
    """
    ids: torch.LongTensor          # [B, L]
    attn: torch.BoolTensor         # [B, L]
    maskable: torch.BoolTensor     # [B, L]
    texts: list[str]
    pad_id: int
    pad_side: str = "right"        # "left" (MMaDA) or "right" (tiny, DiMOO)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def to(self, device) -> "PromptBatch":
        return replace(self, ids=self.ids.to(device), attn=self.attn.to(device), maskable=self.maskable.to(device))

    def repeat_each(self, n: int) -> "PromptBatch":
        """Each prompt n times in a row (a GRPO group)."""
        return replace(self, ids=self.ids.repeat_interleave(n, 0), attn=self.attn.repeat_interleave(n, 0),
                       maskable=self.maskable.repeat_interleave(n, 0), texts=[t for t in self.texts for _ in range(n)])

    def select(self, index: torch.Tensor | list[int]) -> "PromptBatch":
        index = torch.as_tensor(index, dtype=torch.long)
        return replace(self, ids=self.ids[index], attn=self.attn[index], maskable=self.maskable[index],
                       texts=[self.texts[i] for i in index.tolist()])


def concat_prompts(a: PromptBatch, b: PromptBatch) -> PromptBatch:
    """Stack two prompt batches (e.g. cond and uncond for one CFG forward), re-padding to one length."""
    if a.pad_side != b.pad_side or a.pad_id != b.pad_id:
        raise ValueError("cannot concatenate prompt batches with different padding")
    length = max(a.ids.shape[1], b.ids.shape[1])

    def pad(x: torch.Tensor, value) -> torch.Tensor:
        extra = length - x.shape[1]
        if extra == 0:
            return x
        filler = torch.full((x.shape[0], extra), value, dtype=x.dtype, device=x.device)
        return torch.cat([filler, x] if a.pad_side == "left" else [x, filler], dim=1)

    return PromptBatch(
        ids=torch.cat([pad(a.ids, a.pad_id), pad(b.ids, a.pad_id)]),
        attn=torch.cat([pad(a.attn, False), pad(b.attn, False)]),
        maskable=torch.cat([pad(a.maskable, False), pad(b.maskable, False)]),
        texts=a.texts + b.texts, pad_id=a.pad_id, pad_side=a.pad_side)


def mask_prompt_tokens(prompts: PromptBatch, prob: float, mask_id: int, generator: torch.Generator) -> PromptBatch:
    """d1's prompt masking: each maskable prompt token becomes `mask_id` with probability `prob`."""
    u = torch.rand(prompts.ids.shape, generator=generator, device="cpu").to(prompts.ids.device)
    hit = (u < prob) & prompts.maskable
    return replace(prompts, ids=prompts.ids.masked_fill(hit, mask_id))


@runtime_checkable
class Backbone(Protocol):
    """A masked image-token generator.

    grid          (h, w) of the image token grid; N = h * w slots
    codebook_size K, the number of image codes
    image_size    (H, W) in pixels of decoded images
    text_mask_id  the id that masks a prompt token (d1-style prompt masking)
    lora_targets  names of the Linear modules LoRA adapts (empty for fully trained models)
    module        the torch.nn.Module holding the parameters
    """
    name: str
    grid: tuple[int, int]
    codebook_size: int
    image_size: tuple[int, int]
    text_mask_id: int
    lora_targets: tuple[str, ...]
    module: torch.nn.Module

    def tokenize(self, prompts: list[str]) -> PromptBatch: ...

    def uncond(self, n: int) -> PromptBatch:
        """The backbone's unconditional prompt (CFG), n times."""

    def image_logits(self, prompts: PromptBatch, codes: torch.LongTensor) -> torch.Tensor:
        """fp32 logits [B, N, K] over the image codebook at every slot, given the visible codes
        (MASKED elsewhere). One differentiable forward pass with bidirectional attention."""

    def decode(self, codes: torch.LongTensor) -> torch.Tensor:
        """codes [B, N] -> images [B, 3, H, W] in [0, 1]."""

    def encode(self, images: torch.Tensor) -> torch.LongTensor:
        """images [B, 3, H, W] in [0, 1] -> codes [B, N]."""

    def save(self, path: str) -> None:
        """Write trainable weights (safetensors) and whatever config reloading needs."""


class TokenLogprobs(NamedTuple):
    logp: torch.Tensor              # [B, N] log p(code_i | prompt, visible codes)
    entropy: torch.Tensor | None    # [B, N] entropy of the per-slot distribution, if asked


def token_logprobs(backbone: Backbone, prompts: PromptBatch, codes: torch.LongTensor,
                   visible: torch.BoolTensor, *, with_entropy: bool = False) -> TokenLogprobs:
    """log p(code_i | prompt, codes where visible) for every slot, in one forward pass.

    Slots not visible are fed as MASKED; the log-prob of every slot (visible or not) is returned
    and callers select the ones that enter their loss.
    """
    if codes.shape != visible.shape:
        raise ValueError(f"codes {tuple(codes.shape)} and visible {tuple(visible.shape)} differ in shape")
    logits = backbone.image_logits(prompts, codes.masked_fill(~visible, MASKED)).float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, codes.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return TokenLogprobs(logp, entropy)


def guided_logits(backbone: Backbone, cond: PromptBatch, uncond: PromptBatch | None,
                  codes: torch.LongTensor, cfg: float) -> torch.Tensor:
    """Classifier-free guidance as (1 + w) * cond - w * uncond, in one batched forward."""
    if uncond is None or cfg == 0:
        return backbone.image_logits(cond, codes)
    both = backbone.image_logits(concat_prompts(cond, uncond), torch.cat([codes, codes]))
    c, u = both.chunk(2)
    return (1 + cfg) * c - cfg * u
