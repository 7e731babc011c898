"""Shared plumbing of the 8B adapters: finding model directories, reading safetensors and
tokenizers, and checking code tensors.

Weights are never downloaded here: a path is either a local directory or a Hugging Face repo id
already in the local HF cache (looked up with local_files_only, so HF_HUB_OFFLINE=1 is fine).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.backbones.base import MASKED

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_model_dir(path: str | Path, *, model_id: str, layout: str) -> Path:
    """A local directory, or the HF-cache snapshot of a repo id. Missing: FileNotFoundError naming the model."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    tried = [f"directory {p}"]
    text = str(path)
    if text.count("/") == 1 and not p.exists() and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(text, local_files_only=True))
        except Exception as e:  # not in the cache (or hub not installed): fall through to the clear error
            tried.append(f"HF cache entry {text} ({type(e).__name__})")
    raise FileNotFoundError(
        f"cannot find weights for {model_id}: tried {' and '.join(tried)}. "
        f"Download {model_id} (e.g. `huggingface-cli download {model_id} --local-dir DIR`) and pass DIR. "
        f"Expected layout: {layout}")


def require_files(directory: Path, names: list[str], *, model_id: str, layout: str) -> None:
    missing = [n for n in names if not (directory / n).exists()]
    if missing:
        raise FileNotFoundError(f"{directory} lacks {', '.join(missing)}; it does not look like {model_id}. "
                                f"Expected layout: {layout}")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e


def safetensors_files(directory: Path, *, model_id: str, layout: str) -> list[Path]:
    """The shards named by model.safetensors.index.json, else every *.safetensors in the directory."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = [directory / n for n in names]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {', '.join(missing[:5])}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory} for {model_id}. Expected layout: {layout}")
    return files


def tensor_shapes(files: list[Path]) -> dict[str, list[int]]:
    """Names and shapes from the safetensors headers, without reading the tensors."""
    from safetensors import safe_open
    shapes = {}
    for f in files:
        with safe_open(str(f), framework="pt") as g:
            for k in g.keys():
                shapes[k] = list(g.get_slice(k).get_shape())
    return shapes


def read_tensors(files: list[Path], device: str | torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    state = {}
    for f in files:
        with safe_open(str(f), framework="pt", device=str(device)) as g:
            for k in g.keys():
                t = g.get_tensor(k)
                state[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return state


def check_state_keys(expected: set[str], found: set[str], *, source: Path, hint: str,
                     optional: set[str] = frozenset()) -> None:
    missing = sorted(expected - found - optional)
    unexpected = sorted(found - expected)
    if missing or unexpected:
        raise ValueError(f"weights in {source} do not match the expected key names ({hint}): "
                         f"{len(missing)} missing, e.g. {missing[:4]}; {len(unexpected)} unexpected, e.g. {unexpected[:4]}")


def check_codes(codes: torch.Tensor, n: int, k: int, batch: int | None = None, allow_masked: bool = True) -> None:
    if codes.dim() != 2 or codes.shape[1] != n or (batch is not None and codes.shape[0] != batch):
        raise ValueError(f"codes must be [{batch if batch is not None else 'B'}, {n}], got {tuple(codes.shape)}")
    low = MASKED if allow_masked else 0
    if codes.numel() and (int(codes.min()) < low or int(codes.max()) >= k):
        raise ValueError(f"codes must lie in {low}..{k - 1} ({MASKED} = masked)")


def load_tokenizer(directory: Path, *, model_id: str, layout: str, **kwargs):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot load the tokenizer of {model_id} from {directory} ({e}). "
                                f"Expected layout: {layout}") from e
