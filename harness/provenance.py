"""Provenance: what produced a result, so any number in the store can be traced and re-run.

collect() returns one JSON-able dict: UTC time, host, platform, library versions, the git
commit of the harness (with a "-dirty" suffix when tracked files have uncommitted changes),
plus whatever the caller adds (suite version, sampler settings, seeds, checkpoint and
weight hashes). Versions come from importlib.metadata so nothing heavy (torch,
transformers) is imported just to record them.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from harness.io import sha256_file

# Libraries whose version can change a result. Missing ones are simply left out.
TRACKED_LIBRARIES = (
    "harness", "torch", "numpy", "transformers", "peft", "diffusers", "accelerate",
    "safetensors", "pillow", "scipy", "pandas",
)
HARNESS_ROOT = Path(__file__).resolve().parent.parent


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _git(repo_dir: Path, *args: str) -> str | None:
    # --no-optional-locks: `git status` must not take index.lock and race a commit in progress.
    try:
        result = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(repo_dir), *args],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_commit(repo_dir: str | os.PathLike | None = None) -> str | None:
    """HEAD's commit hash of repo_dir (default: the harness checkout), "<hash>-dirty" when tracked
    files differ from HEAD, None when git is missing, it is not a repo, or it has no commits."""
    repo_dir = Path(repo_dir) if repo_dir is not None else HARNESS_ROOT
    commit = _git(repo_dir, "rev-parse", "--verify", "--quiet", "HEAD")
    if not commit:
        return None
    changes = _git(repo_dir, "status", "--porcelain", "--untracked-files=no")
    return f"{commit}-dirty" if changes else commit


def file_hash(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot hash {path}: no such file")
    return sha256_file(path)


def checkpoint_hash(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint file, or for a directory a sha256 over (relative path, file sha256)
    of every file under it, sorted by path so the result does not depend on listing order."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"cannot hash checkpoint {path}: no such file or directory")
    files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise ValueError(f"cannot hash checkpoint {path}: the directory holds no files")
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode("utf-8") + b"\0")
        h.update(sha256_file(f).encode("ascii") + b"\n")
    return h.hexdigest()


def weight_hashes(paths: dict[str, str | os.PathLike]) -> dict[str, str]:
    """{name: path} of every weight file or directory a result depends on -> {name: hash}."""
    return {name: checkpoint_hash(p) for name, p in paths.items()}


def collect(**extra) -> dict:
    """Full provenance dict; keyword arguments (suite_version, protocol, seeds, checkpoint_hash,
    weight_hashes, ...) are added as-is and win over the automatic fields."""
    info = {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python_executable": sys.executable,
        "argv": list(sys.argv),
        "versions": library_versions(),
        "git_commit": git_commit(),
    }
    info.update(extra)
    return info
