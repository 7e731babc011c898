"""Seeded GenEval-style training prompts over the 80 COCO classes.

The prompts follow the official GenEval templates and wording rules (docs: evaluators.md 1.2), including its
literal oddities ("a photo of a scissors", "four skises"), so a model trained on them sees the evaluation
phrasing. Each prompt comes with metadata in the official evaluation_metadata.jsonl format, which the GenEval
engine (evaluators/geneval.py) scores directly, so the same rules can serve as a reward.

Leakage guard: `generate_prompts` requires the evaluation metadata as an exclusion set and never returns one of
those prompts. The official file lives at ../shared/reference/geneval/evaluation_metadata.jsonl
(`default_eval_metadata_path()`); where ../shared is absent the caller must load and pass the 553 prompts itself.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable

# GenEval's object_names.txt: the 80 COCO classes in COCO order, with GenEval's spellings
# ("computer mouse", "tv remote", ...), which differ from some raw COCO names.
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}

# Colour prompts never use "person" (official generator rule), so "a photo of a red person" cannot occur.
_COLORABLE = tuple(name for name in COCO_CLASSES if name != "person")


def with_article(word: str) -> str:
    """'a'/'an' by the official first-letter vowel rule (so 'an orange', but also 'a skis')."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def make_plural(name: str) -> str:
    """Official plural rule: names ending in 's' get 'es', others 's' ('buses', 'skises')."""
    return f"{name}es" if name.endswith("s") else f"{name}s"


def render_prompt(metadata: dict) -> str:
    """The official prompt text for a metadata object (templates of GenEval's create_prompts)."""
    tag, include = metadata["tag"], metadata["include"]
    if tag == "single_object":
        return f"a photo of {with_article(include[0]['class'])}"
    if tag == "two_object":
        return f"a photo of {with_article(include[0]['class'])} and {with_article(include[1]['class'])}"
    if tag == "counting":
        return f"a photo of {COUNT_WORDS[include[0]['count']]} {make_plural(include[0]['class'])}"
    if tag == "colors":
        return f"a photo of {with_article(include[0]['color'])} {include[0]['class']}"
    if tag == "position":
        # include[0] is the reference B; include[1] is A with position [relation, 0]: "A <relation> B"
        a, relation, b = include[1]["class"], include[1]["position"][0], include[0]["class"]
        return f"a photo of {with_article(a)} {relation} {with_article(b)}"
    if tag == "color_attr":
        a, b = include
        return f"a photo of {with_article(a['color'])} {a['class']} and {with_article(b['color'])} {b['class']}"
    raise ValueError(f"unknown GenEval tag {tag!r}; known: {', '.join(TAGS)}")


def _with_prompt(tag: str, include: list[dict], exclude: list[dict] | None = None) -> dict:
    """Metadata in the official key order: tag, include, [exclude], prompt."""
    metadata = {"tag": tag, "include": include}
    if exclude is not None:
        metadata["exclude"] = exclude
    metadata["prompt"] = render_prompt(metadata)
    return metadata


def _single_object(rng: random.Random) -> dict:
    """One random class."""
    return _with_prompt("single_object", [{"class": rng.choice(COCO_CLASSES), "count": 1}])


def _two_object(rng: random.Random) -> dict:
    """Two distinct classes."""
    a, b = rng.sample(COCO_CLASSES, 2)
    return _with_prompt("two_object", [{"class": a, "count": 1}, {"class": b, "count": 1}])


def _counting(rng: random.Random) -> dict:
    """One class, count 2-4."""
    name = rng.choice(COCO_CLASSES)
    count = rng.choice(sorted(COUNT_WORDS))
    # The exclude clause with count+1 makes the rule "exactly `count`" (see geneval.score_detections).
    return _with_prompt("counting", [{"class": name, "count": count}], [{"class": name, "count": count + 1}])


def _colors(rng: random.Random) -> dict:
    """One non-person class with a colour."""
    return _with_prompt("colors", [{"class": rng.choice(_COLORABLE), "count": 1, "color": rng.choice(COLORS)}])


def _position(rng: random.Random) -> dict:
    """Two distinct classes and a relation."""
    a, b = rng.sample(COCO_CLASSES, 2)
    # Official layout: the reference object B is clause 0; A carries [relation, 0] ("A is <relation> B").
    return _with_prompt("position", [{"class": b, "count": 1},
                                     {"class": a, "count": 1, "position": [rng.choice(RELATIONS), 0]}])


def _color_attr(rng: random.Random) -> dict:
    """Two distinct non-person classes with two distinct colours."""
    a, b = rng.sample(_COLORABLE, 2)
    color_a, color_b = rng.sample(COLORS, 2)
    return _with_prompt("color_attr", [{"class": a, "count": 1, "color": color_a},
                                       {"class": b, "count": 1, "color": color_b}])


_MAKERS = {"single_object": _single_object, "two_object": _two_object, "counting": _counting,
           "colors": _colors, "position": _position, "color_attr": _color_attr}

# Number of distinct prompts each tag can produce, used to fail fast instead of looping forever.
_TAG_CAPACITY = {
    "single_object": len(COCO_CLASSES),
    "two_object": len(COCO_CLASSES) * (len(COCO_CLASSES) - 1),
    "counting": len(COCO_CLASSES) * len(COUNT_WORDS),
    "colors": len(_COLORABLE) * len(COLORS),
    "position": len(COCO_CLASSES) * (len(COCO_CLASSES) - 1) * len(RELATIONS),
    "color_attr": len(_COLORABLE) * (len(_COLORABLE) - 1) * len(COLORS) * (len(COLORS) - 1),
}


def _normalise_prompt(prompt: str) -> str:
    """Key used to compare prompts: lower case, single spaces."""
    return " ".join(prompt.lower().split())


def default_eval_metadata_path() -> Path | None:
    """Path of the official evaluation_metadata.jsonl under ../shared, or None when ../shared is absent."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "geneval" / "evaluation_metadata.jsonl"
    return path if path.is_file() else None


def generate_prompts(
    n: int,
    *,
    seed: int,
    exclude: Iterable[dict | str],
    tags: Iterable[str] = TAGS,
    unique: bool = True,
) -> list[tuple[str, dict]]:
    """n (prompt, metadata) pairs, tags drawn uniformly by a seeded RNG, never a prompt in `exclude`.

    `exclude` holds evaluation metadata dicts (e.g. geneval.load_metadata(path)) or bare prompt strings; it is
    required so that leaving out the evaluation set is a visible decision (pass [] deliberately to disable).
    Matching is on the prompt text, case- and whitespace-insensitive.
    """
    tags = list(tags)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not tags:
        raise ValueError("tags is empty; pass at least one of " + ", ".join(TAGS))
    unknown = [t for t in tags if t not in _MAKERS]
    if unknown:
        raise ValueError(f"unknown GenEval tag(s) {unknown}; known: {', '.join(TAGS)}")
    banned = set()
    for entry in exclude:
        if isinstance(entry, str):
            banned.add(_normalise_prompt(entry))
        elif isinstance(entry, dict) and isinstance(entry.get("prompt"), str):
            banned.add(_normalise_prompt(entry["prompt"]))
        else:
            raise ValueError(f"exclude entries must be prompt strings or metadata dicts with a 'prompt'; got {entry!r}")
    if unique:
        capacity = sum(_TAG_CAPACITY[t] for t in set(tags))  # upper bound; banned prompts reduce it further
        if n > capacity:
            raise ValueError(f"asked for {n} unique prompts but tags {sorted(set(tags))} allow at most {capacity}")

    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[tuple[str, dict]] = []
    attempts = 0
    max_attempts = 1000 + 200 * n  # generous: rejection only bites near a tag's capacity
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"could only draw {len(out)} of {n} prompts after {max_attempts} tries; "
                             f"too few distinct prompts left for tags {sorted(set(tags))} after exclusions")
        metadata = _MAKERS[rng.choice(tags)](rng)
        key = _normalise_prompt(metadata["prompt"])
        if key in banned or (unique and key in seen):
            continue
        seen.add(key)
        out.append((metadata["prompt"], metadata))
    return out


def to_jsonl(pairs: Iterable[tuple[str, dict]]) -> str:
    """The metadata as evaluation_metadata.jsonl text (one JSON object per line, official key order)."""
    return "".join(json.dumps(metadata) + "\n" for _, metadata in pairs)
