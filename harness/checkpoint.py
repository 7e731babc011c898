"""Weights on disk: safetensors with string metadata, written atomically, with clear errors."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load, save

from harness.io import atomic_write_bytes


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    data = save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()})
    return atomic_write_bytes(path, canonical_header(data))


def canonical_header(data: bytes) -> bytes:
    """safetensors writes its metadata in hash-map order, so the same weights saved twice differ in bytes
    (and in the hash that keys the eval cache). Rewrite the JSON header with sorted keys; the tensor
    offsets are relative to the data section, so they stay valid. Padded with spaces to 8 bytes, as
    the format asks."""
    n, parsed = read_header(data)
    header = json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data[8 + n:]


def read_header(data: bytes) -> tuple[int, dict]:
    """A safetensors file's JSON header: (its length in bytes, its content)."""
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    data = path.read_bytes()
    try:
        state = load(data)
    except Exception as e:  # safetensors raises its own error types across versions
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from e
    metadata = read_header(data)[1].get("__metadata__", {}) or {}
    return state, metadata
