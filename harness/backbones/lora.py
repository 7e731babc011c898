"""LoRA on a backbone's transformer blocks, with peft.

`apply_lora` replaces `backbone.module` by a peft `PeftModel` whose LoRA layers sit on the named
Linear modules *inside the transformer blocks only*. LLaDA calls both the per-block MLP output and
the model's output head "ff_out"; the head is excluded on purpose: the adapters read a row slice
of its weight directly (codebook logits only), which a LoRA on the head would silently bypass.

Reference policy for the KL term: the same module with the adapter switched off,

    with backbone.module.disable_adapter():
        ref_logp = token_logprobs(backbone, prompts, codes, visible).logp

so no second 8B copy is kept in memory. Only the LoRA matrices are trainable; `save_trainable`
writes just them (plus the LoRA settings) and `load_trainable` puts them back.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch


def block_target_pattern(targets: list[str] | tuple[str, ...]) -> str:
    """Regex (peft full-matches module names) for `targets` inside `...blocks.{i}.`, never the top-level head."""
    names = "|".join(re.escape(t) for t in targets)
    return rf"(?:.*\.)?blocks\.\d+\.(?:{names})"


def base_module(module: torch.nn.Module) -> torch.nn.Module:
    """The plain model under a PeftModel (or the module itself)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def has_lora(module: torch.nn.Module) -> bool:
    return hasattr(module, "peft_config")


def apply_lora(backbone, r: int = 16, alpha: int = 32, dropout: float = 0.0,
               targets: list[str] | tuple[str, ...] | None = None):
    """Wrap backbone.module with LoRA adapters on `targets` (default: backbone.lora_targets). Returns the backbone."""
    from peft import LoraConfig, get_peft_model
    if has_lora(backbone.module):
        raise ValueError("this backbone already has a LoRA adapter")
    targets = list(targets or backbone.lora_targets)
    unknown = sorted(set(targets) - set(backbone.lora_targets))
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not Linear modules of {backbone.name}; "
                         f"choose from {list(backbone.lora_targets)}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=block_target_pattern(targets))
    backbone.module = get_peft_model(backbone.module, config)
    backbone.lora = {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets}
    return backbone


def save_trainable(backbone, path: str | Path, metadata: dict | None = None) -> Path:
    """LoRA weights (if adapted) or every trainable parameter, as safetensors with the settings in metadata."""
    from harness.checkpoint import save_weights
    meta = {"backbone": backbone.name, **{k: str(v) for k, v in (metadata or {}).items()}}
    if has_lora(backbone.module):
        from peft import get_peft_model_state_dict
        state = get_peft_model_state_dict(backbone.module)
        meta["lora"] = json.dumps(backbone.lora)
    else:
        state = {k: p for k, p in backbone.module.named_parameters() if p.requires_grad}
    return save_weights(path, state, meta)


def load_trainable(backbone, path: str | Path):
    """Inverse of save_trainable: applies LoRA with the saved settings if needed, then loads the weights."""
    from harness.checkpoint import load_weights
    state, meta = load_weights(path)
    if meta.get("backbone") not in (None, backbone.name):
        raise ValueError(f"{path} holds weights of backbone {meta.get('backbone')!r}, not {backbone.name!r}")
    if "lora" in meta:
        from peft import set_peft_model_state_dict
        if not has_lora(backbone.module):
            apply_lora(backbone, **json.loads(meta["lora"]))
        result = set_peft_model_state_dict(backbone.module, state)
        if result.unexpected_keys:
            raise ValueError(f"{path}: LoRA keys not in the model, e.g. {list(result.unexpected_keys)[:4]}")
    else:
        missing = set(state) - set(backbone.module.state_dict())
        if missing:
            raise ValueError(f"{path}: keys not in the model, e.g. {sorted(missing)[:4]}")
        backbone.module.load_state_dict(state, strict=False)
    return backbone
