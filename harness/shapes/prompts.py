"""Prompts of the shapes world: GenEval's six tags (with GenEval-format metadata), dense
DPG-style descriptions, scenes that satisfy them, and the fixed train / eval split.

A prompt is described by its metadata dict, exactly as a line of GenEval's
evaluation_metadata.jsonl: {"tag", "include": [{"class", "count", "color"?, "position"?}],
"exclude"?, "prompt"}. Dense prompts use tag "dense" and add "objects" and "relations".
"""
from __future__ import annotations

import hashlib
import itertools
import math
from functools import lru_cache

import numpy as np

from harness.geometry import relative_position  # noqa: F401  (re-exported for callers)
from harness.shapes.world import COLORS, GRID, MAX_SIZE, MIN_SIZE, SHAPES, Obj, shape_mask

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
TAGS = GENEVAL_TAGS + ("dense",)
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
SIZE_WORDS = {MIN_SIZE: "small", MAX_SIZE: "big"}
EVAL_FRACTION = 0.25
SPLIT_SALT = "shapes-split-v1"


def plural(name: str) -> str:
    return name + ("es" if name.endswith(("s", "x", "sh", "ch")) else "s")


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# --- the six GenEval tags ------------------------------------------------------------------

def geneval_metadata(tag: str, **f) -> dict:
    """Build one GenEval-format metadata dict with its prompt text."""
    if tag == "single_object":
        include = [{"class": f["a"], "count": 1}]
        text = f"a photo of {with_article(f['a'])}"
    elif tag == "two_object":
        include = [{"class": f["a"], "count": 1}, {"class": f["b"], "count": 1}]
        text = f"a photo of {with_article(f['a'])} and {with_article(f['b'])}"
    elif tag == "counting":
        n = f["count"]
        meta = {"tag": tag, "include": [{"class": f["a"], "count": n}], "exclude": [{"class": f["a"], "count": n + 1}],
                "prompt": f"a photo of {COUNT_WORDS[n]} {plural(f['a'])}"}
        return meta
    elif tag == "colors":
        include = [{"class": f["a"], "count": 1, "color": f["color_a"]}]
        text = f"a photo of {with_article(f['color_a'] + ' ' + f['a'])}"
    elif tag == "position":
        # GenEval's order: the target (B) comes first in include, A refers to it by index 0
        include = [{"class": f["b"], "count": 1}, {"class": f["a"], "count": 1, "position": [f["relation"], 0]}]
        text = f"a photo of {with_article(f['a'])} {f['relation']} {with_article(f['b'])}"
    elif tag == "color_attr":
        include = [{"class": f["a"], "count": 1, "color": f["color_a"]}, {"class": f["b"], "count": 1, "color": f["color_b"]}]
        text = f"a photo of {with_article(f['color_a'] + ' ' + f['a'])} and {with_article(f['color_b'] + ' ' + f['b'])}"
    else:
        raise ValueError(f"unknown GenEval tag {tag!r}; known: {', '.join(GENEVAL_TAGS)}")
    return {"tag": tag, "include": include, "prompt": text}


@lru_cache(maxsize=None)
def universe(tag: str) -> tuple[dict, ...]:
    """Every prompt of a GenEval tag in the shapes world, in a fixed order."""
    pairs = [(a, b) for a, b in itertools.permutations(SHAPES, 2)]
    if tag == "single_object":
        out = [geneval_metadata(tag, a=a) for a in SHAPES]
    elif tag == "two_object":
        out = [geneval_metadata(tag, a=a, b=b) for a, b in pairs]
    elif tag == "counting":
        out = [geneval_metadata(tag, a=a, count=n) for a in SHAPES for n in COUNT_WORDS]
    elif tag == "colors":
        out = [geneval_metadata(tag, a=a, color_a=c) for a in SHAPES for c in COLORS]
    elif tag == "position":
        out = [geneval_metadata(tag, a=a, b=b, relation=r) for a, b in pairs for r in RELATIONS]
    elif tag == "color_attr":
        out = [geneval_metadata(tag, a=a, b=b, color_a=ca, color_b=cb)
               for a, b in pairs for ca, cb in itertools.permutations(COLORS, 2)]
    else:
        raise ValueError(f"tag {tag!r} has no finite universe; known: {', '.join(GENEVAL_TAGS)}")
    return tuple(out)


def _split_key(prompt: str) -> float:
    h = hashlib.sha256(f"{SPLIT_SALT}:{prompt}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64


@lru_cache(maxsize=None)
def eval_prompts(tag: str) -> tuple[dict, ...]:
    """The eval split of a tag: the EVAL_FRACTION of its universe with the lowest split key (at least one)."""
    items = sorted(universe(tag), key=lambda m: _split_key(m["prompt"]))
    n = max(1, math.ceil(EVAL_FRACTION * len(items)))
    return tuple(items[:n])


@lru_cache(maxsize=None)
def train_prompts(tag: str) -> tuple[dict, ...]:
    held_out = {m["prompt"] for m in eval_prompts(tag)}
    return tuple(m for m in universe(tag) if m["prompt"] not in held_out)


def split_of(metadata: dict) -> str:
    """'train' or 'eval'. Dense prompts are split by hash, the six tags by rank in their universe."""
    if metadata["tag"] == "dense":
        return "eval" if _split_key(metadata["prompt"]) < EVAL_FRACTION else "train"
    held_out = {m["prompt"] for m in eval_prompts(metadata["tag"])}
    return "eval" if metadata["prompt"] in held_out else "train"


# --- scenes --------------------------------------------------------------------------------

def _dilated(o: Obj) -> np.ndarray:
    """Occupancy of an object grown by one cell in all 8 directions, on the full grid."""
    occ = np.zeros((GRID + 2, GRID + 2), dtype=bool)
    m = shape_mask(o.shape, o.size)
    for dr in (0, 1, 2):
        for dc in (0, 1, 2):
            occ[o.row + dr:o.row + dr + o.size, o.col + dc:o.col + dc + o.size] |= m
    return occ[1:-1, 1:-1]


def place_objects(specs: list[tuple[str, str, int | None]], rng: np.random.Generator,
                  relations: list | tuple = (), tries: int = 200) -> list[Obj]:
    """Place objects (shape, colour, size or None for random) so that none touch and every
    relation (i, rel, j) with j < i holds: object i lies `rel` object j under GenEval's rule.

    Each object goes to a uniformly random position among those still free (and satisfying its
    relations to the objects already placed); a draw that leaves no room is redrawn.
    """
    for _ in range(tries):
        objs: list[Obj] = []
        taken = np.zeros((GRID, GRID), dtype=bool)
        for i, (shape, color, size) in enumerate(specs):
            size = size or int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
            stencil = shape_mask(shape, size)
            mine = [(rel, j) for (k, rel, j) in relations if k == i]
            windows = np.lib.stride_tricks.sliding_window_view(taken, (size, size))     # [R, C, size, size]
            rows, cols = np.nonzero(~(windows & stencil).any(axis=(2, 3)))
            free = [Obj(shape, color, int(r), int(c), size) for r, c in zip(rows, cols)]
            free = [o for o in free if all(rel in relative_position(o.box, objs[j].box) for rel, j in mine)]
            if not free:
                break
            o = free[int(rng.integers(len(free)))]
            objs.append(o)
            taken |= _dilated(o)
        if len(objs) == len(specs):
            return objs
    raise RuntimeError(f"could not place {specs} with relations {list(relations)} on a {GRID}x{GRID} grid")


def scene_for(metadata: dict, rng: np.random.Generator) -> list[Obj]:
    """A random scene that satisfies a prompt's metadata exactly (and holds nothing else)."""
    if metadata["tag"] == "dense":
        specs = [(o["class"], o["color"], o.get("size")) for o in metadata["objects"]]
        return place_objects(specs, rng, [tuple(r) for r in metadata["relations"]])
    specs, relations = [], []
    for k, clause in enumerate(metadata["include"]):
        for _ in range(clause["count"]):
            specs.append((clause["class"], clause.get("color") or COLORS[int(rng.integers(len(COLORS)))], None))
        if "position" in clause:   # with count 1 per clause (GenEval's position tag), clause k is object k
            relations.append((k, clause["position"][0], clause["position"][1]))
    return place_objects(specs, rng, relations)


# --- dense (DPG-style) prompts ------------------------------------------------------------

def _describe(o: dict) -> str:
    words = [SIZE_WORDS[o["size"]]] if o.get("size") in SIZE_WORDS else []
    return " ".join(words + [o["color"], o["class"]])


def dense_metadata(rng: np.random.Generator) -> dict:
    """A dense prompt: 2 to 4 distinct (colour, shape) objects, some sizes, relations read off a real scene."""
    n = int(rng.integers(2, 5))
    kinds = [(s, c) for s in SHAPES for c in COLORS]
    picks = rng.choice(len(kinds), size=n, replace=False)
    objects = []
    for p in picks:
        shape, color = kinds[int(p)]
        size = int(rng.choice([MIN_SIZE, MAX_SIZE])) if rng.random() < 0.4 else None
        objects.append({"class": shape, "color": color, **({"size": size} if size else {})})
    scene = place_objects([(o["class"], o["color"], o.get("size")) for o in objects], rng)
    relations = []
    for k in range(1, n):
        if rng.random() < 0.7:
            j = int(rng.integers(0, k))
            holding = sorted(relative_position(scene[k].box, scene[j].box))
            if holding:
                relations.append([k, holding[int(rng.integers(len(holding)))], j])
    # keep only relations that a fresh random placement can meet (a 3-object vertical chain may not fit)
    specs = [(o["class"], o["color"], o.get("size")) for o in objects]
    while relations:
        try:
            place_objects(specs, rng, [tuple(r) for r in relations], tries=20)
            break
        except RuntimeError:
            relations.pop()
    parts = []
    for k, o in enumerate(objects):
        text = with_article(_describe(o))
        for i, rel, j in relations:
            if i == k:
                text += f" {rel} the {objects[j]['color']} {objects[j]['class']}"
        parts.append(text)
    text = "a photo of " + (parts[0] if n == 1 else " , ".join(parts[:-1]) + " and " + parts[-1])
    return {"tag": "dense", "objects": objects, "relations": relations, "prompt": text}


# --- sampling prompts -------------------------------------------------------------------------

DEFAULT_TAG_WEIGHTS = {"single_object": 1.0, "two_object": 1.0, "counting": 1.0, "colors": 1.0,
                       "position": 1.0, "color_attr": 1.0, "dense": 1.0}


def sample_metadata(rng: np.random.Generator, split: str = "train", tag_weights: dict | None = None) -> dict:
    """Draw one prompt of the given split, tag chosen by weight, uniform within the tag."""
    if split not in ("train", "eval"):   # any other value would loop forever on the dense tag
        raise ValueError(f"unknown split {split!r}; known: 'train', 'eval'")
    weights = tag_weights or DEFAULT_TAG_WEIGHTS
    unknown = set(weights) - set(TAGS)
    if unknown:
        raise ValueError(f"unknown tags {sorted(unknown)}; known: {', '.join(TAGS)}")
    tags = [t for t in TAGS if weights.get(t, 0) > 0]
    p = np.array([weights[t] for t in tags], dtype=float)
    tag = tags[int(rng.choice(len(tags), p=p / p.sum()))]
    if tag == "dense":
        while True:
            meta = dense_metadata(rng)
            if split_of(meta) == split:
                return meta
    pool = train_prompts(tag) if split == "train" else eval_prompts(tag)
    return dict(pool[int(rng.integers(len(pool)))])
