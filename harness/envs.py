"""Pinned virtual environments for official stacks that cannot live in the main one (`harness env ...`).

An official implementation that needs other versions than ours (modelscope's mPLUG on transformers 4.57.6,
PyPI `image-reward` on timm 0.6.13, `hpsv2`'s vendored open_clip) runs in its own venv, as a worker process
(harness/worker.py). The recipes are data: pinned requirement lists installed by pip in steps, files to delete
afterwards, modules that must import at the end. A built env records its recipe's hash in .harness-recipe.json;
`build` reuses an env whose hash matches and rebuilds one whose recipe changed. A build goes into a temporary
folder beside the target and is renamed into place only when every step and the import probe passed, so a
killed or failed build never leaves a half-built env where a worker would look for one.

Root: $HARNESS_ENVS, default ~/.cache/harness/envs; the env NAME is ROOT/NAME. Run its python as
ROOT/NAME/bin/python (the console scripts' shebangs are rewritten to the final path too).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT_ENV = "HARNESS_ENVS"
RECIPE_FILE = ".harness-recipe.json"
FREEZE_FILE = ".harness-freeze.txt"
FORMAT = 1                 # bump when the build procedure itself changes what an env holds

# Everything runs on the CPU torch wheel; without the torchvision pin pip takes a newer one that drags in a CUDA torch.
BASE_CONSTRAINTS = ("torch==2.13.0", "torchvision==0.28.0")
# PyPI torchvision 0.28.0 beside torch+cpu needs the tv_compat shim (harness/workers/wire.py applies it first).
SHIM = "torchvision"


class EnvError(OSError):
    """A user-fixable environment problem (not built, stale, pip failed): one line, exit 1."""


@dataclass(frozen=True)
class Step:
    requirements: tuple[str, ...]
    options: tuple[str, ...] = ()         # extra pip flags, e.g. ("--no-build-isolation",)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    steps: tuple[Step, ...]
    constraints: tuple[str, ...] = BASE_CONSTRAINTS
    remove: tuple[str, ...] = ()          # globs under site-packages deleted after the install (CUDA-only .so files)
    probe: str = ""                       # worker script (harness/workers/) whose imports must pass: `SCRIPT --probe`
    size: str = ""                        # what a build costs, for `harness env ls` and the not-built error

    def spec(self) -> dict:
        """What the env is made of (the hash covers exactly this; `description` and `size` are prose)."""
        d = asdict(self)
        for prose in ("description", "size"):
            d.pop(prose)
        d["format"] = FORMAT
        d["python"] = f"{sys.version_info.major}.{sys.version_info.minor}"
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()


# --- the recipes ------------------------------------------------------------------------------------------------
# Sources: ../shared/docs/dpg_vqa.md section 6 (recipe B: modelscope's MPlug model class without the pipeline, so
# no fairseq) and ../shared/docs/dependencies.md ("ImageReward on transformers 4.57.6 + timm 0.6.13", hpsv2 1.2.0).
# The two ImageReward patches of dependencies.md (transformers helpers back into modeling_utils; a local vocab.txt
# for init_tokenizer) are applied at run time by harness/workers/imagereward_worker.py, not written into the env.

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        name="dpg-official",
        description="modelscope 1.40.2 MPlug (DPG-Bench's mPLUG-large VQA judge) on transformers 4.57.6",
        steps=(Step(("torch==2.13.0",)),
               Step(("torchvision==0.28.0", "timm==1.0.31", "modelscope==1.40.2", "transformers==4.57.6",
                     "huggingface_hub==0.36.2", "tokenizers==0.22.2", "addict==2.4.0", "numpy==2.4.6",
                     "pillow==13.0.0", "pyyaml==6.0.4", "simplejson==3.20.2"))),
        probe="dpg_worker.py",
        size="~1 min with a warm pip cache, 1.3 GB"),
    Recipe(
        name="imagereward-official",
        description="PyPI image-reward 1.5 (ImageReward.load + score) on transformers 4.57.6 + timm 0.6.13",
        steps=(Step(("torch==2.13.0", "setuptools==80.9.0")),
               Step(("torchvision==0.28.0", "image-reward==1.5", "timm==0.6.13", "transformers==4.57.6",
                     "huggingface_hub==0.36.2", "tokenizers==0.22.2", "fairscale==0.4.13", "clip-anytorch==2.6.0",
                     "diffusers==0.35.2", "accelerate==1.10.1", "datasets==4.8.4", "numpy==2.4.6",
                     "pillow==13.0.0"))),
        probe="imagereward_worker.py",
        size="~1-2 min with a warm pip cache, 1.5 GB"),
    Recipe(
        name="hpsv2-official",
        description="hpsv2 1.2.0 as PyPI hpsv2x 1.2.0 ships it (the hpsv2 wheel lacks open_clip's BPE file): its "
                    "vendored open_clip ViT-H-14 and img_score's scoring path",
        steps=(Step(("torch==2.13.0", "setuptools==80.9.0")),
               Step(("torchvision==0.28.0", "hpsv2x==1.2.0", "timm==1.0.31", "transformers==4.57.6",
                     "huggingface_hub==0.36.2", "protobuf==3.20.3", "numpy==2.4.6", "pillow==13.0.0",
                     "ftfy==6.3.1", "regex==2025.9.18", "sentencepiece==0.2.1"))),
        probe="hpsv2_worker.py",
        size="~2 min with a warm pip cache, 1.5 GB"),
)}


# --- where envs live, and whether one is built ----------------------------------------------------------------

def root() -> Path:
    raw = os.environ.get(ROOT_ENV)
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "harness" / "envs"


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        import difflib
        close = difflib.get_close_matches(name, RECIPES, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown environment {name!r}.{hint} Known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def env_dir(name: str) -> Path:
    recipe(name)
    return root() / name


def python_of(folder: Path) -> Path:
    return folder / "bin" / "python"


def built_digest(folder: Path) -> str | None:
    """The recipe hash a complete env at `folder` was built from, None when there is none."""
    try:
        data = json.loads((folder / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data.get("digest") if isinstance(data, dict) and python_of(folder).exists() else None


def state(name: str) -> str:
    """'built', 'stale' (built from another recipe: rebuild) or 'not built'."""
    have = built_digest(env_dir(name))
    if have is None:
        return "not built"
    return "built" if have == recipe(name).digest() else "stale"


def require(name: str) -> Path:
    """The python of a built, current env; a one-line EnvError saying how to build it otherwise."""
    s = state(name)
    if s != "built":
        why = "is not built" if s == "not built" else "was built from an older recipe"
        size = f" ({recipe(name).size})" if recipe(name).size else ""
        raise EnvError(f"environment {name!r} {why}: run `harness env build {name}`{size}")
    return python_of(env_dir(name))


# --- building -------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


PIP_FAILURES = [   # (pattern on pip's output, what it means); the first group names the package
    (r"No matching distribution found for (\S+)", "no matching distribution"),
    (r"Could not find a version that satisfies the requirement (\S+)", "no version satisfies it"),
    (r"Failed (?:to build|building wheel for) ([^\s,]+)", "its build failed"),
    (r"Building wheel for (\S+) \(.*\) \.\.\. error", "its build failed"),
    (r"Cannot install ([^\n]+?) because these package versions have conflicting dependencies", "conflicting pins"),
    (r"(?:installing|preparing metadata for|Getting requirements to build wheel for) (\S+)[^\n]*\n[^\n]*error",
     "its build failed"),
    (r"ERROR: Invalid requirement: '?([^'\n]+)'?", "invalid requirement"),
]


def pip_failure(output: str) -> tuple[str, str]:
    """(package, reason) from pip's output; ('?', its last ERROR line) when no known pattern matches."""
    for pattern, reason in PIP_FAILURES:
        m = re.search(pattern, output)
        if m:
            return m.group(1).strip("'\""), reason
    errors = [line.strip() for line in output.splitlines() if line.strip().startswith("ERROR:")]
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return "?", (errors[-1] if errors else lines[-1] if lines else "no output")[:200]


def _run(argv: list[str], log: Path, what: str, env_name: str, timeout: float | None = None) -> None:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        start = len(log.read_text(errors="replace"))
        try:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=timeout, env={**os.environ, "PIP_NO_INPUT": "1"})
        except subprocess.TimeoutExpired:
            raise EnvError(f"environment {env_name!r}: {what} ran past {timeout:.0f} s; log: {log}") from None
    if proc.returncode != 0:
        output = log.read_text(errors="replace")[start:]
        if what.startswith("pip"):
            package, reason = pip_failure(output)
            raise EnvError(f"environment {env_name!r}: pip could not install {package} ({reason}); "
                           f"full log: {log}")
        tail = [line for line in output.splitlines() if line.strip()][-1:] or ["no output"]
        raise EnvError(f"environment {env_name!r}: {what} failed ({tail[0].strip()[:200]}); full log: {log}")


def _rewrite_shebangs(folder: Path, old: Path, new: Path) -> None:
    """Console scripts name the interpreter by absolute path: point them at the final folder."""
    before, after = f"#!{old}/".encode(), f"#!{new}/".encode()
    for script in (folder / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            data = script.read_bytes()
            if data.startswith(before):
                script.write_bytes(after + data[len(before):])


def _site_packages(folder: Path) -> Path:
    return folder / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def build(name: str, *, force: bool = False, say: Callable[[str], None] = print,
          step_timeout: float | None = 3600) -> Path:
    """Build (or reuse) the env `name`; returns its folder. Atomic: a temp folder renamed into place at the end."""
    r = recipe(name)
    base = root()
    final = base / name
    base.mkdir(parents=True, exist_ok=True)
    with _locked(base / f".{name}.lock"):
        if not force and built_digest(final) == r.digest():
            say(f"{name}: up to date at {final}")
            return final
        log = base / f"{name}.build.log"
        log.write_text(f"harness env build {name}  recipe {r.digest()}\n")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=base))
        started = time.monotonic()
        try:
            say(f"{name}: creating the venv (log: {log})")
            _run([sys.executable, "-m", "venv", str(tmp)], log, "python -m venv", name, step_timeout)
            constraints = tmp / ".harness-constraints.txt"
            constraints.write_text("".join(c + "\n" for c in r.constraints))
            py = str(python_of(tmp))
            for i, step in enumerate(r.steps, 1):
                say(f"{name}: pip step {i}/{len(r.steps)}: {' '.join(step.requirements)}")
                _run([py, "-m", "pip", "install", "--no-input", "--disable-pip-version-check", "-c", str(constraints),
                      *step.options, *step.requirements], log, f"pip step {i}", name, step_timeout)
            site = _site_packages(tmp)
            for pattern in r.remove:
                for path in site.glob(pattern):
                    say(f"{name}: removing {path.relative_to(site)}")
                    path.unlink()
            if r.probe:
                say(f"{name}: checking that its worker's imports pass ({r.probe} --probe)")
                script = Path(__file__).resolve().parent / "workers" / r.probe
                _run([py, str(script), "--probe"], log, "the import probe", name, step_timeout)
            freeze = subprocess.run([py, "-m", "pip", "freeze", "--all"], capture_output=True, text=True)
            (tmp / FREEZE_FILE).write_text(freeze.stdout)
            _rewrite_shebangs(tmp, tmp, final)
            (tmp / RECIPE_FILE).write_text(json.dumps({"name": name, "digest": r.digest(), "recipe": r.spec(),
                                                       "built": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
            old = None
            if final.exists() or final.is_symlink():
                old = base / f".{name}.old-{os.getpid()}"
                final.rename(old)
            tmp.rename(final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    say(f"{name}: built in {time.monotonic() - started:.0f} s at {final}")
    return final


def listing() -> list[dict]:
    """One row per recipe: name, state, path, description, size."""
    return [{"name": n, "state": state(n), "path": str(env_dir(n)), "description": RECIPES[n].description,
             "size": RECIPES[n].size} for n in sorted(RECIPES)]
