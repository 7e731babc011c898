"""DPG-style question graphs for shapes prompts, and an exact answerer that reads detector output.

A question record mirrors one row of DPG-Bench's dpg_bench.csv (evaluators.md 2.2):
  proposition_id     1-based within the prompt
  dependency         parent proposition ids; [0] = no parent
  category_broad     "entity" / "attribute" / "relation" / "other"   (DPG's L1, the part before " - ")
  category_detailed  "entity - whole" / "attribute - color" / "attribute - size" / "relation - spatial" /
                     "other - count"                                 (DPG's L2, what its category scores use)
  tuple              DSG tuple, e.g. "attribute - color (square, red)"; tuple.split('(')[0].strip() is the L2 name
  question           yes/no question in natural language
plus "target", the machine-readable content the answerer needs ({"kind", "subject", "object"?, "relation"?,
"count"?}; subject/object are {"class", "color"?, "size"?} descriptions).

Graph (DSG style: an attribute or relation is only asked about things that exist):
  entity  "Is there a square?"                               no parent
  color   "Is the square red?"                               parent: its entity
  size    "Is the red square big?"                           parent: its colour question (else its entity)
  count   "Are there three squares?"                         parent: its entity
  relation "Is the red square left of the blue circle?"      parents: the colour (else entity) questions of both
Counts use DPG's own L2 name "other - count" (the L1 category is therefore "other").

Exact answers (answer()): an object matches a description when the detection's class is the described shape,
its colour (if described) is equal, its size (if described) equals the bbox side in cells (small = 5, big = 7),
and its score is > OBJECT_THRESHOLD (GenEval's 0.3). Count questions count matching detections with score
> COUNT_THRESHOLD (GenEval's counting 0.9) and need exactly that many. A relation holds when some matching subject
and some other matching object stand in the relation under GenEval's rule (prompts.relative_position).
"""
from __future__ import annotations

from harness.shapes.detect import size_in_cells
from harness.shapes.prompts import COUNT_WORDS, GENEVAL_TAGS, SIZE_WORDS, plural, relative_position

OBJECT_THRESHOLD = 0.3
COUNT_THRESHOLD = 0.9
KINDS = ("entity", "color", "size", "count", "relation")
_CATEGORY = {"entity": "entity - whole", "color": "attribute - color", "size": "attribute - size",
             "count": "other - count", "relation": "relation - spatial"}


def _phrase(desc: dict) -> str:
    """'red square', 'big red square' or 'square'."""
    words = [SIZE_WORDS[desc["size"]]] if desc.get("size") is not None else []
    return " ".join(words + ([desc["color"]] if desc.get("color") else []) + [desc["class"]])


def _record(kind: str, tuple_args: str, question: str, dependency: list[int], target: dict) -> dict:
    category = _CATEGORY[kind]
    return {"proposition_id": 0, "dependency": dependency or [0],
            "category_broad": category.split(" - ")[0], "category_detailed": category,
            "tuple": f"{category} ({tuple_args})", "question": question, "target": target}


def _objects_and_relations(metadata: dict) -> tuple[list[dict], list[tuple[int, str, int]]]:
    """The prompt as objects {"class", "color"?, "size"?, "count"} and relations (subject, relation, object)."""
    tag = metadata.get("tag")
    if tag == "dense":
        objects = [{"class": o["class"], "color": o["color"], "size": o.get("size"), "count": 1}
                   for o in metadata["objects"]]
        return objects, [(int(i), rel, int(j)) for i, rel, j in metadata["relations"]]
    if tag in GENEVAL_TAGS:
        objects, relations = [], []
        for k, clause in enumerate(metadata["include"]):
            objects.append({"class": clause["class"], "color": clause.get("color"), "size": None,
                            "count": int(clause["count"])})
            if "position" in clause:
                relations.append((k, clause["position"][0], int(clause["position"][1])))
        return objects, relations
    raise ValueError(f"questions: unknown tag {tag!r} in metadata {metadata.get('prompt')!r}; "
                     f"known: {', '.join(GENEVAL_TAGS + ('dense',))}")


def questions(metadata: dict) -> list[dict]:
    """The question graph of one prompt (dense or any of GenEval's six tags), in proposition order."""
    objects, relations = _objects_and_relations(metadata)
    out: list[dict] = []

    def add(record: dict) -> int:
        record["proposition_id"] = len(out) + 1
        out.append(record)
        return record["proposition_id"]

    anchor = []   # per object: the proposition that says "this described object exists" (colour, else entity)
    for o in objects:
        cls = o["class"]
        entity = add(_record("entity", cls, f"Is there {'an' if cls[0] in 'aeiou' else 'a'} {cls}?", [],
                             {"kind": "entity", "subject": {"class": cls}}))
        anchor_id = entity
        if o["count"] > 1:
            add(_record("count", f"{cls}, =={o['count']}", f"Are there {COUNT_WORDS[o['count']]} {plural(cls)}?",
                        [entity], {"kind": "count", "subject": {"class": cls, **({"color": o["color"]} if o["color"] else {})},
                                   "count": o["count"]}))
        if o["color"]:
            anchor_id = add(_record("color", f"{cls}, {o['color']}", f"Is the {cls} {o['color']}?", [entity],
                                    {"kind": "color", "subject": {"class": cls, "color": o["color"]}}))
        if o["size"] is not None:
            desc = {"class": cls, **({"color": o["color"]} if o["color"] else {})}
            word = SIZE_WORDS[o["size"]]
            add(_record("size", f"{cls}, {word}", f"Is the {_phrase(desc)} {word}?", [anchor_id],
                        {"kind": "size", "subject": {**desc, "size": o["size"]}}))
        anchor.append(anchor_id)
    for i, rel, j in relations:
        subject = {"class": objects[i]["class"], **({"color": objects[i]["color"]} if objects[i]["color"] else {})}
        obj = {"class": objects[j]["class"], **({"color": objects[j]["color"]} if objects[j]["color"] else {})}
        add(_record("relation", f"{subject['class']}, {obj['class']}, {rel}",
                    f"Is the {_phrase(subject)} {rel} the {_phrase(obj)}?", sorted({anchor[i], anchor[j]}),
                    {"kind": "relation", "subject": subject, "object": obj, "relation": rel}))
    return out


def _matches(det: dict, desc: dict, threshold: float) -> bool:
    return (det["score"] > threshold and det["class"] == desc["class"]
            and ("color" not in desc or det["color"] == desc["color"])
            and ("size" not in desc or size_in_cells(det) == desc["size"]))


def answer(question: dict, detections: list[dict]) -> bool:
    """Exact yes/no answer to one question record from detect() output (rules in the module docstring)."""
    target = question.get("target")
    if not isinstance(target, dict) or target.get("kind") not in KINDS:
        raise ValueError(f"question {question.get('proposition_id')!r} has no valid 'target' "
                         f"(kind one of {', '.join(KINDS)}); build records with questions.questions()")
    kind, subject = target["kind"], target["subject"]
    if kind == "count":
        return sum(_matches(d, subject, COUNT_THRESHOLD) for d in detections) == target["count"]
    subjects = [d for d in detections if _matches(d, subject, OBJECT_THRESHOLD)]
    if kind != "relation":
        return bool(subjects)
    objects = [d for d in detections if _matches(d, target["object"], OBJECT_THRESHOLD)]
    return any(target["relation"] in relative_position(a["bbox"], b["bbox"])
               for a in subjects for b in objects if a is not b)
