"""Evaluation suites: versioned YAML files in evaluators/suites/, validated by the `Suite` model.

A suite fixes everything that makes two numbers comparable: the prompts, how many images per prompt,
the seed, the sampler settings, the resolution, the evaluators and the folder layout. Its `version`
is part of the image cache key, so bump it whenever any of these change.

Prompt sets (`prompts.kind`):
- shapes             the shapes world's GenEval tags, from the fixed train / eval split; at most
                     `max_prompts_per_tag` per tag, taken in a fixed hash order (a stable random subset).
- shapes-dense       `count` dense (DPG-style) shapes prompts of one split, drawn with `seed`.
- geneval-metadata   an evaluation_metadata.jsonl (the official GenEval file, or any file in its format).
- dpg-prompts        a folder of DPG-Bench prompt files `<prompt_id>.txt` (the official dpg_bench/prompts).
Relative paths resolve against $HARNESS_DATA (default ./data), where `harness data fetch` puts them.

Images per prompt, with the small-tag rule: a tag with n prompts gets
    max(images_per_prompt, ceil(min_images_per_tag / n))
images per prompt, so every tag has at least `min_images_per_tag` images. The shapes world has few
prompts in some tags (single_object has 2 in its eval split), and a tag accuracy from 8 images would
be mostly noise. Without `min_images_per_tag` every prompt gets `images_per_prompt` images.

Global sample index of image j of prompt i: i * stride + j, with stride = the largest images-per-prompt
of the suite (= images_per_prompt when no tag is raised), so an image never depends on batching.

Suites name their evaluators and backbones; an evaluator whose backend is not written yet lists fine
and fails with a clear error when the suite runs.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BeforeValidator, Field, field_validator, model_validator

from harness import registry
from harness.config import ConfigError, Strict, read_yaml, validate
from harness.io import safe_name
from harness.sampling import SamplerSettings

SUITE_DIR = Path(__file__).resolve().parent / "suites"
LAYOUTS = ("geneval", "dpg")


def _as_text(value):
    # YAML reads `version: 1` as an int; a version is a label, so keep it as text
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class ShapesPrompts(Strict):
    kind: Literal["shapes"]
    tags: list[str] = Field(default_factory=lambda: ["single_object", "two_object", "counting",
                                                     "colors", "position", "color_attr"], min_length=1)
    split: Literal["train", "eval"] = "eval"
    max_prompts_per_tag: int | None = Field(default=None, ge=1)

    @field_validator("tags")
    @classmethod
    def _known_tags(cls, tags: list[str]) -> list[str]:
        from harness.shapes.prompts import GENEVAL_TAGS
        unknown = [t for t in tags if t not in GENEVAL_TAGS]
        if unknown:
            raise ValueError(f"unknown tags {unknown}; known: {', '.join(GENEVAL_TAGS)} "
                             f"(dense prompts are kind: shapes-dense)")
        if len(set(tags)) != len(tags):
            raise ValueError(f"tags repeat: {tags}")
        return tags


class ShapesDensePrompts(Strict):
    kind: Literal["shapes-dense"]
    split: Literal["train", "eval"] = "eval"
    count: int = Field(default=48, ge=1)
    seed: int = 0


class MetadataFilePrompts(Strict):
    kind: Literal["geneval-metadata"]
    path: str
    max_prompts: int | None = Field(default=None, ge=1)


class DpgPromptsDir(Strict):
    kind: Literal["dpg-prompts"]
    dir: str
    max_prompts: int | None = Field(default=None, ge=1)


PromptSet = Annotated[Union[ShapesPrompts, ShapesDensePrompts, MetadataFilePrompts, DpgPromptsDir],
                      Field(discriminator="kind")]


class Suite(Strict):
    name: str = Field(min_length=1)     # a folder name of the image cache: checked by _name_is_a_file_name
    version: Annotated[str, BeforeValidator(_as_text)] = Field(min_length=1)
    description: str = ""
    backbones: list[str] = Field(min_length=1)
    prompts: PromptSet
    images_per_prompt: int = Field(ge=1)
    min_images_per_tag: int | None = Field(default=None, ge=1)
    seed: int = 0
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)
    resolution: int | None = Field(default=None, ge=1)    # side of saved images; None = the backbone's own
    evaluators: list[str] = Field(min_length=1)
    layout: Literal["geneval", "dpg"]
    # another suite (name or path) whose images this one scores instead of drawing its own; prompts, seed,
    # sampler, resolution and layout must then be the same (checked when the suite runs)
    images_from: str | None = None
    # the leaderboard table its metrics feed (a key of leaderboards/leaderboard.py TABLES, e.g. geneval, dpg,
    # quality); None: a table of its own, titled by the suite's name
    leaderboard: str | None = None

    @field_validator("name")
    @classmethod
    def _name_is_a_file_name(cls, name: str) -> str:
        return safe_name(name, "suite name")

    @field_validator("backbones")
    @classmethod
    def _known_backbones(cls, names: list[str]) -> list[str]:
        for name in names:
            try:
                registry.target("backbones", name)
            except KeyError as e:                 # pydantic reports ValueErrors under the key path
                raise ValueError(e.args[0]) from None
        return names

    @field_validator("evaluators")
    @classmethod
    def _distinct(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError(f"evaluators repeat: {names}")
        return names

    @model_validator(mode="after")
    def _layout_rules(self) -> "Suite":
        if self.layout == "dpg":
            if self.images_per_prompt != 4:
                raise ValueError(f"images_per_prompt: layout 'dpg' draws a 2x2 grid per prompt, so it needs "
                                 f"images_per_prompt: 4, not {self.images_per_prompt}")
            if self.min_images_per_tag is not None:
                raise ValueError("min_images_per_tag: layout 'dpg' has exactly 4 images per prompt; remove the key")
        return self


@dataclass(frozen=True)
class SuitePrompt:
    index: int          # position in the suite's prompt list (GenEval folder number)
    prompt_id: str      # GenEval folder name "00012", or the DPG grid file stem
    metadata: dict      # GenEval-format metadata (or dense / DPG metadata with at least tag and prompt)
    n_images: int


# --- loading -------------------------------------------------------------------------------------------------

def data_root() -> Path:
    return Path(os.environ.get("HARNESS_DATA") or "data")


def resolve_data_path(path: str) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else data_root() / p


def suite_path(name_or_path: str | os.PathLike) -> Path:
    """A registered suite name -> its YAML file; an existing file path is returned as is."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise FileNotFoundError(f"suite file {p} does not exist")
        return p
    return Path(registry.get("suites", str(name_or_path)))


def load_suite(name_or_path: str | os.PathLike, overrides: list[str] | None = None) -> Suite:
    """Load and validate a suite by registered name or YAML path. Errors name the file and key."""
    path = suite_path(name_or_path).resolve()
    # a copy: the cached model must not change when a caller assigns to a field
    return _load_suite_file(str(path), path.stat().st_mtime_ns, tuple(overrides or ())).model_copy(deep=True)


@lru_cache(maxsize=64)
def _load_suite_file(path: str, mtime_ns: int, overrides: tuple[str, ...]) -> Suite:
    from harness.config import apply_overrides
    data = apply_overrides(read_yaml(path), list(overrides))
    suite = validate(Suite, data, path)
    if Path(path).parent == SUITE_DIR and suite.name != Path(path).stem:
        raise ConfigError(f"{path} is invalid:\n  name: {suite.name!r} must equal the file name "
                          f"{Path(path).stem!r} (suites are registered by file name)")
    return suite


def suites_for_backbone(name: str) -> list[str]:
    """Registered suites that apply to a backbone (what `--suite all` runs)."""
    registry.target("backbones", name)
    return [s for s in registry.names("suites") if name in load_suite(s).backbones]


# --- prompts ---------------------------------------------------------------------------------------------------

def _order_key(prompt: str) -> str:
    return hashlib.sha256(f"suite-order:{prompt}".encode()).hexdigest()


@lru_cache(maxsize=16)
def _dense_prompts(split: str, count: int, seed: int) -> tuple[dict, ...]:
    import numpy as np
    from harness.shapes.prompts import dense_metadata, split_of
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    for _ in range(count * 100):
        meta = dense_metadata(rng)
        if split_of(meta) == split and meta["prompt"] not in seen:
            seen.add(meta["prompt"])
            out.append(meta)
            if len(out) == count:
                return tuple(out)
    raise ValueError(f"prompts: could not draw {count} distinct dense {split} prompts with seed {seed}")


def prompt_metadata(suite: Suite) -> list[dict]:
    """The suite's prompts as metadata dicts, in their fixed order."""
    p = suite.prompts
    if isinstance(p, ShapesPrompts):
        from harness.shapes.prompts import eval_prompts, train_prompts
        out = []
        for tag in p.tags:
            pool = sorted(eval_prompts(tag) if p.split == "eval" else train_prompts(tag),
                          key=lambda m: _order_key(m["prompt"]))
            out += [dict(m) for m in pool[:p.max_prompts_per_tag]]
        return out
    if isinstance(p, ShapesDensePrompts):
        return [dict(m) for m in _dense_prompts(p.split, p.count, p.seed)]
    if isinstance(p, MetadataFilePrompts):
        from evaluators.geneval import load_metadata
        path = resolve_data_path(p.path)
        if not path.is_file():
            raise FileNotFoundError(f"suite {suite.name!r}: prompts.path {path} does not exist; "
                                    f"fetch it with `harness data fetch geneval` (or set HARNESS_DATA)")
        return load_metadata(path)[:p.max_prompts]
    folder = resolve_data_path(p.dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"suite {suite.name!r}: prompts.dir {folder} does not exist; "
                                f"fetch it with `harness data fetch dpg` (or set HARNESS_DATA)")
    files = sorted(folder.glob("*.txt"), key=lambda f: f.stem)
    if not files:
        raise ValueError(f"suite {suite.name!r}: prompts.dir {folder} holds no <prompt_id>.txt files")
    return [{"tag": "dpg", "item_id": f.stem, "prompt": f.read_text(encoding="utf-8").strip()}
            for f in files[:p.max_prompts]]


def images_per_tag_rule(suite: Suite, metadata: list[dict]) -> dict[str, int]:
    """Images per prompt of every tag under the small-tag rule (see the module docstring)."""
    counts: dict[str, int] = {}
    for m in metadata:
        counts[m["tag"]] = counts.get(m["tag"], 0) + 1
    need = suite.min_images_per_tag or 0
    return {tag: max(suite.images_per_prompt, math.ceil(need / n)) for tag, n in counts.items()}


def suite_prompts(suite: Suite) -> list[SuitePrompt]:
    """Every prompt of the suite with its id and image count."""
    metadata = prompt_metadata(suite)
    per_tag = images_per_tag_rule(suite, metadata)
    out = []
    for i, m in enumerate(metadata):
        if suite.layout == "geneval":
            pid = f"{i:05d}"
        elif "item_id" in m:
            pid = m["item_id"]
        else:
            from evaluators.shapes_suites import item_id
            pid = item_id(m)
        out.append(SuitePrompt(index=i, prompt_id=safe_name(pid, f"suite {suite.name!r}: prompt {i} has item_id"),
                               metadata=m, n_images=per_tag[m["tag"]]))
    ids = [p.prompt_id for p in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"suite {suite.name!r}: prompt ids repeat (two prompts have the same text?)")
    return out


def index_stride(prompts: list[SuitePrompt]) -> int:
    return max(p.n_images for p in prompts)


def prompts_digest(prompts: list[SuitePrompt]) -> str:
    """sha256 of the prompt list (ids, metadata, image counts): part of the evaluation protocol."""
    text = json.dumps([[p.prompt_id, p.metadata, p.n_images] for p in prompts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def sampler_for(suite: Suite, backbone_name: str):
    """The SamplerConfig a suite asks for when run on a backbone."""
    try:
        return suite.sampler.resolve(backbone_name)
    except ValueError as e:
        raise ValueError(f"suite {suite.name!r}: {e}") from None