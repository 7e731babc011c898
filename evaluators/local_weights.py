"""Model files named by environment variables: found (never downloaded), or a FileNotFoundError that says
what is missing and how to get it. Checked before any image is drawn (Evaluator.check_ready)."""
from __future__ import annotations

import os
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
