"""Model files named by environment variables: found (never downloaded), or a FileNotFoundError that says
what is missing and how to get it (checked before any image is drawn: Evaluator.check_ready); the texts a
scorer fetched with `harness data fetch`; and renaming official checkpoint keys onto transformers' names."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path


def weights_file(env: str, what: str, how: str) -> Path:
    """The file named by $env."""
    raw = os.environ.get(env)
    if not raw:
        raise FileNotFoundError(f"no {what} given: {how}")
    path = Path(raw).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}; {how}")
    return path


def weights_folder(env: str, what: str, how: str, required: tuple[str, ...], path: str | os.PathLike | None = None) -> Path:
    """`path`, else the folder named by $env, holding every file in `required`."""
    raw = path if path is not None else os.environ.get(env)
    if not raw:
        raise FileNotFoundError(f"no folder given for {what}: {how}")
    folder = Path(raw).expanduser()
    missing = [n for n in required if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)} (expected {what}): {how}")
    return folder


def fetched_json(relative: str, dataset: str) -> dict:
    """<data>/<relative>, written by `harness data fetch <dataset>`."""
    from evaluators.suites import resolve_data_path
    path = resolve_data_path(relative)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `harness data fetch {dataset}` (it reads the text from the "
                                f"scorer's official wheel, sha256-pinned)")
    return json.loads(path.read_text())


def renamed(name: str, table: list[tuple[str, str]]) -> str | None:
    """`name` through the first (regex, replacement) of `table` that matches it; None when none does."""
    for pattern, replacement in table:
        if re.search(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


def build_in(model_class, config, device: str, dtype):
    """model_class(config) created directly on `device` in `dtype` (no float32 copy of a 7B model first)."""
    import torch
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_class(config)
    finally:
        torch.set_default_dtype(default)


def loaded_once(cache: dict, key: str, load, half_precision: str = "bfloat16"):
    """cache[key], else load(device, dtype) stored there: CUDA in half precision when there is a GPU (as the
    scorers' references run), else the CPU in float32."""
    if key not in cache:
        import torch
        cuda = torch.cuda.is_available()
        cache[key] = load("cuda" if cuda else "cpu", getattr(torch, half_precision) if cuda else torch.float32)
    return cache[key]
