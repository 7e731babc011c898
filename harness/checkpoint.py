"""Weights on disk: safetensors with string metadata, written atomically, with clear errors."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load, save

from harness.io import atomic_write_bytes


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return atomic_write_bytes(path, save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    data = path.read_bytes()
    try:
        state = load(data)
    except Exception as e:  # safetensors raises its own error types across versions
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from e
    import json
    import struct
    n = struct.unpack("<Q", data[:8])[0]
    metadata = json.loads(data[8:8 + n]).get("__metadata__", {}) or {}
    return state, metadata
