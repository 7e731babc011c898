"""Atomic file writes and small file helpers.

Every file the harness writes goes through here: write to a temp file in the same
directory, fsync, then os.replace. A run killed mid-write leaves either the old file
or the new one, never a torn one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def safe_name(name: str, what: str) -> str:
    """A name read from a file or a prompt that becomes one path component: letters, digits, '_', '-', '.', not
    starting with '.' (so no '..', no hidden file), no separator, not absolute. Else a ValueError naming `what`."""
    text = str(name)
    if not _SAFE_NAME.match(text) or len(text) > 200:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise ValueError(f"{what} {shown!r} cannot be a file name (use letters, digits, '_', '-', '.', at most 200, "
                         f"not starting with '.'; no '/', '\\' or '..')")
    return text


def confined(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """`path`, checked to lie under `root` once both are resolved (symlinks and '..' included)."""
    root_r, path_r = Path(root).resolve(), Path(path).resolve()
    if path_r != root_r and root_r not in path_r.parents:
        raise ValueError(f"refusing to write {path}: it lies outside {root}")
    return Path(path)


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and fsync. A crash can at worst leave a partial last line, which read_jsonl skips."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike, *, tolerate_partial_last_line: bool = True) -> list[dict]:
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if tolerate_partial_last_line and i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e})") from e
    return out


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
