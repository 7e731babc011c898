"""The shapes evaluators on hand-made images: right images score 1, wrong ones 0, and the quality statistics
move the right way under stray cells and collapsed diversity."""
import json

import numpy as np
import pytest

from evaluators.base import Evaluator, Sample
from evaluators.shapes_suites import (SHAPES_DPG, SHAPES_FIDELITY, SHAPES_GENEVAL, SHAPES_GENEVAL_PARTIAL,
                                      SHAPES_QUALITY, fidelity_credit, object_roles, partial_credit)
from harness import registry
from harness.shapes.detect import detect
from harness.shapes.prompts import geneval_metadata
from harness.shapes.questions import answer, questions
from harness.shapes.world import GRID, Obj, cells_to_rgb, color_index, render_cells

RED_SQUARE = geneval_metadata("colors", a="square", color_a="red")
TWO_CIRCLES = {"tag": "counting", "include": [{"class": "circle", "count": 2}],
               "exclude": [{"class": "circle", "count": 3}], "prompt": "a photo of two circles"}
CROSS_LEFT_OF_DIAMOND = geneval_metadata("position", a="cross", b="diamond", relation="left of")
DENSE = {"tag": "dense", "prompt": "a photo of a big red square left of the blue circle and a blue circle",
         "objects": [{"class": "square", "color": "red", "size": 7}, {"class": "circle", "color": "blue"}],
         "relations": [[0, "left of", 1]]}


def image(*objs: Obj) -> np.ndarray:
    return cells_to_rgb(render_cells(list(objs)))


def samples(metadata: dict, *images: np.ndarray) -> list[Sample]:
    return [Sample(key=f"{metadata['prompt']}/{i}", metadata=metadata, image=im) for i, im in enumerate(images)]


def metric(result, name: str) -> float:
    (m,) = [m for m in result.metrics if m.name == name]
    return m.value


def test_registry_resolves_the_four_evaluators():
    for name, ev in [("shapes-geneval", SHAPES_GENEVAL), ("shapes-geneval-partial", SHAPES_GENEVAL_PARTIAL),
                     ("shapes-dpg", SHAPES_DPG), ("shapes-quality", SHAPES_QUALITY), ("shapes-fidelity", SHAPES_FIDELITY)]:
        assert registry.get("evaluators", name) is ev
        assert isinstance(ev, Evaluator) and ev.name == name


def test_geneval_right_image_is_correct_wrong_image_is_not():
    right, wrong = image(Obj("square", "red", 2, 2, 6)), image(Obj("square", "blue", 2, 2, 6))
    result = SHAPES_GENEVAL.evaluate(samples(RED_SQUARE, right, wrong))
    r0, r1 = result.records.values()
    assert set(r0) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert (r0["correct"], r1["correct"]) == (True, False)
    assert json.loads(r0["metadata"]) == RED_SQUARE and json.loads(r0["details"])["square"][0][:4] == [32, 32, 128, 128]
    assert metric(result, "geneval_colors") == 0.5 and metric(result, "geneval_overall") == 0.5
    assert metric(SHAPES_GENEVAL.evaluate(samples(RED_SQUARE, right)), "geneval_overall") == 1.0
    # counting needs score > 0.9: two clean circles pass, a third one fails, a broken second one fails
    two = image(Obj("circle", "red", 0, 0, 5), Obj("circle", "blue", 8, 8, 5))
    three = image(Obj("circle", "red", 0, 0, 5), Obj("circle", "blue", 8, 8, 5), Obj("circle", "pink", 0, 9, 5))
    broken = render_cells([Obj("circle", "red", 0, 0, 5), Obj("circle", "blue", 8, 8, 5)])
    broken[10, 8:13] = 0
    got = SHAPES_GENEVAL.score(samples(TWO_CIRCLES, two, three, cells_to_rgb(broken)))
    assert [r["correct"] for r in got.values()] == [True, False, False]
    # position: A left of B right, mirrored wrong
    left = image(Obj("cross", "red", 5, 0, 5), Obj("diamond", "red", 5, 9, 5))
    mirrored = image(Obj("cross", "red", 5, 9, 5), Obj("diamond", "red", 5, 0, 5))
    got = SHAPES_GENEVAL.score(samples(CROSS_LEFT_OF_DIAMOND, left, mirrored))
    assert [r["correct"] for r in got.values()] == [True, False]


def test_geneval_suites_reject_dense_prompts():
    with pytest.raises(ValueError, match="shapes-dpg"):
        SHAPES_GENEVAL.score(samples(DENSE, image()))
    with pytest.raises(ValueError, match="shapes-dpg"):
        SHAPES_GENEVAL_PARTIAL.score(samples(DENSE, image()))


def test_partial_reward_gives_full_partial_and_zero_credit():
    right = image(Obj("square", "red", 2, 2, 6))
    wrong_colour = image(Obj("square", "blue", 2, 2, 6))
    result = SHAPES_GENEVAL_PARTIAL.evaluate(samples(RED_SQUARE, right, wrong_colour, image()))
    scores = [r["score"] for r in result.records.values()]
    assert scores == [1.0, 0.5, 0.0]                       # count + colour credits averaged; empty image 0
    assert [r["strict_correct"] for r in result.records.values()] == [True, False, False]
    assert SHAPES_GENEVAL_PARTIAL.reward_field == "score"
    assert metric(result, "geneval_partial_overall") == pytest.approx(0.5)
    # counting: one of two circles -> 0.5; four of two -> 1 - 2/2 = 0 (flow_grpo's unclamped formula)
    one = detect(render_cells([Obj("circle", "red", 0, 0, 5)]))
    assert partial_credit(TWO_CIRCLES, one)[:2] == (False, 0.5)
    # position with the relation wrong: counts 1 + 1, position 0
    mirrored = detect(render_cells([Obj("cross", "red", 5, 9, 5), Obj("diamond", "red", 5, 0, 5)]))
    assert partial_credit(CROSS_LEFT_OF_DIAMOND, mirrored)[:2] == (False, pytest.approx(2 / 3))


def test_fidelity_reward_reads_the_best_fits_of_the_requested_objects():
    clean = [Obj("circle", "red", 0, 0, 5), Obj("circle", "blue", 8, 8, 5)]
    assert fidelity_credit(TWO_CIRCLES, detect(render_cells(clean))) == 1.0
    # a damaged second circle: credit = mean(1, its fit), strictly between the clean and the missing case
    broken = render_cells(clean)
    broken[8, 10] = 0                         # one cell off the blue circle's rim
    dets = detect(broken)
    fit = max(d["score"] for d in dets if d["class"] == "circle" and d["color"] == "blue")
    assert 0 < fit < 1 and fidelity_credit(TWO_CIRCLES, dets) == pytest.approx((1 + fit) / 2)
    assert fidelity_credit(TWO_CIRCLES, detect(render_cells(clean[:1]))) == 0.5       # one of two missing
    # extra objects cannot raise it: only the best `count` fits are read
    three = clean + [Obj("circle", "pink", 0, 9, 5)]
    assert fidelity_credit(TWO_CIRCLES, detect(render_cells(three))) == 1.0
    # a clause with a colour counts only objects of that colour
    result = SHAPES_FIDELITY.evaluate(samples(RED_SQUARE, image(Obj("square", "red", 2, 2, 6)),
                                              image(Obj("square", "blue", 2, 2, 6)), image()))
    assert [r["score"] for r in result.records.values()] == [1.0, 0.0, 0.0]
    assert metric(result, "fidelity_overall") == pytest.approx(1 / 3) and SHAPES_FIDELITY.reward_field == "score"
    with pytest.raises(ValueError, match="shapes-dpg"):
        SHAPES_FIDELITY.score(samples(DENSE, image()))


def test_object_roles_mark_what_the_judge_can_count():
    cells = render_cells([Obj("square", "red", 0, 0, 6), Obj("square", "blue", 8, 8, 6), Obj("circle", "red", 0, 9, 5)])
    cells[15, 0] = color_index("red")                         # a one-cell red fragment
    dets = detect(cells)
    roles = {(d["color"], d["cells"]): r for d, r in zip(dets, object_roles(RED_SQUARE, dets))}
    # only the red square counts: wrong colour, unrequested class and the fragment do not
    assert roles == {("red", 36): True, ("blue", 36): False, ("red", 21): False, ("red", 1): False}


def test_dpg_questions_answers_and_dependency_zeroing():
    right = image(Obj("square", "red", 4, 0, 7), Obj("circle", "blue", 4, 10, 5))
    small_square = image(Obj("square", "red", 4, 0, 5), Obj("circle", "blue", 4, 10, 5))
    wrong_colour = image(Obj("square", "green", 4, 0, 7), Obj("circle", "blue", 4, 10, 5))
    result = SHAPES_DPG.evaluate(samples(DENSE, right, small_square, wrong_colour, image()))
    records = list(result.records.values())
    graph = questions(DENSE)
    assert [q["category_detailed"] for q in graph] == ["entity - whole", "attribute - color", "attribute - size",
                                                       "entity - whole", "attribute - color", "relation - spatial"]
    assert graph[2]["dependency"] == [2] and graph[5]["dependency"] == [2, 5] and graph[0]["dependency"] == [0]
    assert records[0]["score"] == 1.0 and records[3]["score"] == 0.0
    assert records[1]["score"] == pytest.approx(5 / 6)     # only the size question fails
    # green square: colour fails, so size and relation are zeroed although their raw answers differ
    assert records[2]["answers"] == [True, False, False, True, True, False]
    assert records[2]["adjusted"] == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert metric(result, "dpg_overall") == pytest.approx(100 * (1 + 5 / 6 + 3 / 6 + 0) / 4)
    assert metric(SHAPES_DPG.evaluate(samples(DENSE, right)), "dpg_overall") == 100.0
    assert metric(result, "dpg_attribute_size") == pytest.approx(100 * 1 / 4)
    # GenEval tags get graphs too: counting asks for an exact number
    two = detect(render_cells([Obj("circle", "red", 0, 0, 5), Obj("circle", "blue", 8, 8, 5)]))
    count_q = questions(TWO_CIRCLES)[1]
    assert count_q["tuple"] == "other - count (circle, ==2)" and answer(count_q, two)
    assert not answer(count_q, two[:1])


def test_quality_moves_with_strays_and_collapsed_diversity():
    meta = geneval_metadata("single_object", a="square")
    clean = [image(Obj("square", c, r, c2, s)) for c, r, c2, s in
             [("red", 0, 0, 5), ("blue", 8, 3, 7), ("green", 2, 9, 6), ("pink", 10, 10, 5)]]
    base = SHAPES_QUALITY.evaluate(samples(meta, *clean))
    assert metric(base, "stray_cell_fraction") == 0.0 and metric(base, "background_cleanliness") == 1.0
    assert metric(base, "shape_fidelity") == 1.0
    assert metric(base, "position_spread") > 0.2 and metric(base, "size_spread") > 0.5
    assert metric(base, "free_color_entropy") == pytest.approx(np.log(4) / np.log(8))

    noisy_cells = [render_cells([Obj("square", "red", 0, 0, 5)]) for _ in range(4)]
    for k, cells in enumerate(noisy_cells):
        cells[GRID - 1, :2 * k + 1] = color_index("brown")          # more strays in later images
    noisy = SHAPES_QUALITY.evaluate(samples(meta, *[cells_to_rgb(c) for c in noisy_cells]))
    assert metric(noisy, "stray_cell_fraction") > 0 and metric(noisy, "background_cleanliness") < 1
    assert metric(noisy, "shape_fidelity") < 1
    strays = [r["stray_cells"] for r in noisy.records.values()]
    assert strays == sorted(strays) and strays[0] < strays[-1]

    same = SHAPES_QUALITY.evaluate(samples(meta, *[clean[1]] * 4))
    assert metric(same, "position_spread") == 0.0 and metric(same, "size_spread") == 0.0
    assert metric(same, "free_color_entropy") == 0.0
    assert metric(same, "diversity_prompts") == 1.0
    # a prompt that fixes its colour has no free colours to measure
    fixed = SHAPES_QUALITY.evaluate(samples(RED_SQUARE, *[image(Obj("square", "red", 0, 0, 5))] * 2))
    assert not [m for m in fixed.metrics if m.name == "free_color_entropy"]


def test_every_metric_is_described_and_records_are_json():
    right = image(Obj("square", "red", 2, 2, 6))
    for ev in (SHAPES_GENEVAL, SHAPES_GENEVAL_PARTIAL, SHAPES_DPG, SHAPES_QUALITY):
        result = ev.evaluate(samples(RED_SQUARE, right, right))
        json.dumps(result.records)                             # records are JSON-able as they are
        for m in result.metrics:
            d = m.as_dict()
            assert d["name"] and d["scale"] and d["version"] and isinstance(d["higher_is_better"], bool)
            assert np.isfinite(d["value"])
