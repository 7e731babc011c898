"""DPG-Bench engine: dependency cascade, score math, both parity modes, CSV parsing, grid helpers."""
from __future__ import annotations

import csv

import pytest
from PIL import Image

from evaluators.dpg import (CSV_COLUMNS, answer_grid, answer_is_yes, category_of, image_key, l1_of, load_dpg_csv,
                            make_grid, parse_dpg_rows, score_dpg, score_image, score_tile, split_grid)


def row(item_id, qid, dependency, tuple_text, question):
    return {"item_id": item_id, "text": f"prompt {item_id}", "keywords": "k", "proposition_id": str(qid),
            "dependency": dependency, "category_broad": "b", "category_detailed": "d", "tuple": tuple_text,
            "question_natural_language": question}


# Item "a" comes first, so in parity mode its question 1 (the first data row) is dropped.
ROWS = [
    row("a", 1, "0", "entity - whole (cat)", "Is there a cat?"),
    row("a", 2, "1", "attribute - color (cat, black)", "Is the cat black?"),
    row("a", 3, "0", "entity - whole (sofa)", "Is there a sofa?"),
    row("b", 1, "0", "entity - whole (dog)", "Is there a dog?"),
    row("b", 2, "1", "attribute - color (dog, brown)", "Is the dog brown?"),
    row("b", 3, "2", "attribute - texture (dog, fluffy)", "Is the brown dog fluffy?"),
    row("b", 4, "1,3", "relation - spatial (dog, sofa, on)", "Is the dog on the sofa?"),
]


def write_csv(path, rows, columns=CSV_COLUMNS):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def yes(*qids, of=(1, 2, 3, 4)):
    return {q: q in qids for q in of}


# --- helpers -----------------------------------------------------------------------------------------------------

def test_category_rules():
    assert category_of("entity - whole (parent)") == "entity - whole"
    assert l1_of("relation - non-spatial") == "relation"
    assert image_key("/x/partiprompts12.v2.png") == "partiprompts12"
    assert answer_is_yes("yes") and not answer_is_yes("Yes") and not answer_is_yes("yes ")


# --- dependency cascade and score math ---------------------------------------------------------------------------

def test_dependency_cascade():
    item = parse_dpg_rows(ROWS, parity=False)["b"]
    score, raw, adjusted = score_tile(item, yes(2, 3, 4))  # the dog itself is missing
    assert raw == {1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert adjusted == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0}  # 3 via 2, 4 via 1
    assert score == 0.0
    score, _, adjusted = score_tile(item, yes(1, 3, 4))  # not brown -> not "brown and fluffy"; 4 needs 1 and 3
    assert adjusted == {1: 1.0, 2: 0.0, 3: 0.0, 4: 0.0} and score == 0.25
    assert score_tile(item, yes(1, 2, 3, 4))[0] == 1.0


def test_cascade_is_one_pass_in_csv_order():
    rows = [row("c", 1, "2", "entity - whole (x)", "q1"), row("c", 2, "3", "entity - whole (y)", "q2"),
            row("c", 3, "0", "entity - whole (z)", "q3")]
    item = parse_dpg_rows(rows, parity=False)["c"]
    # q1 is checked before q2 is zeroed, so it keeps its yes (official behaviour)
    score, _, adjusted = score_tile(item, {1: True, 2: True, 3: False})
    assert adjusted == {1: 1.0, 2: 0.0, 3: 0.0} and score == pytest.approx(1 / 3)


def test_tile_image_overall_math():
    items = parse_dpg_rows(ROWS, parity=False)
    tiles_b = [yes(1, 2, 3, 4), yes(1, 2, 3), yes(1, 2), yes(2, 3, 4)]  # 1, 0.75, 0.5, 0
    tiles_a = [yes(1, 2, 3, of=(1, 2, 3))] * 3 + [yes(1, of=(1, 2, 3))]  # 1, 1, 1, 1/3
    image = score_image(items["b"], tiles_b)
    assert image.tile_scores == [1.0, 0.75, 0.5, 0.0] and image.score == pytest.approx(0.5625)
    summary = score_dpg(items, {"b.png": tiles_b, "a.jpg": tiles_a}, parity=False)
    assert summary.score == pytest.approx(100 * (0.5625 + 10 / 12) / 2)
    assert summary.failed == {}
    assert set(summary.to_dict()["images"]) == {"a.jpg", "b.png"}


def test_answers_must_cover_every_question():
    item = parse_dpg_rows(ROWS, parity=False)["b"]
    with pytest.raises(ValueError, match=r"no answer for question id\(s\) \[4\]"):
        score_tile(item, {1: True, 2: True, 3: True})
    with pytest.raises(ValueError, match="must be a bool"):
        score_tile(item, {1: "yes", 2: True, 3: True, 4: True})


# --- parity quirks -----------------------------------------------------------------------------------------------

def test_parity_skips_first_row_and_drops_its_dependants():
    parity_items = parse_dpg_rows(ROWS, parity=True)
    assert list(parity_items["a"].questions) == [2, 3]
    assert list(parse_dpg_rows(ROWS, parity=False)["a"].questions) == [1, 2, 3]
    tiles_b = [yes(1, 2, 3, 4)] * 4
    tiles_a = [{2: True, 3: True}] * 4
    summary = score_dpg(parity_items, {"a.png": tiles_a, "b.png": tiles_b, "zzz.png": tiles_b}, parity=True)
    # a's question 2 depends on the skipped question 1 (official KeyError) and zzz has no questions: both left out
    assert set(summary.failed) == {"a.png", "zzz.png"} and list(summary.images) == ["b.png"]
    assert summary.score == 100.0
    with pytest.raises(ValueError, match="zzz"):
        score_dpg(parse_dpg_rows(ROWS, parity=False), {"zzz.png": tiles_b}, parity=False)


def test_category_scores_last_tile_raw_vs_all_tiles_adjusted():
    items = parse_dpg_rows(ROWS, parity=False)
    tiles = [yes(2, 3, 4), yes(2, 3, 4), yes(2, 3, 4), yes(1, 2, 3, 4)]  # only the last tile shows the dog
    official = score_dpg(items, {"b.png": tiles}, parity=True)
    corrected = score_dpg(items, {"b.png": tiles}, parity=False)
    assert official.score == corrected.score == pytest.approx(25.0)  # headline identical: (0+0+0+1)/4
    assert official.l2 == {"attribute - color": 100.0, "attribute - texture": 100.0,
                           "entity - whole": 100.0, "relation - spatial": 100.0}
    assert corrected.l2 == {"attribute - color": 25.0, "attribute - texture": 25.0,
                            "entity - whole": 25.0, "relation - spatial": 25.0}
    # raw answers ignore dependencies even on the last tile
    raw_only = score_dpg(items, {"b.png": [yes(2, 3, 4)]}, parity=True)
    assert raw_only.l2["attribute - color"] == 100.0 and raw_only.score == 0.0


def test_l1_is_question_weighted():
    items = parse_dpg_rows(ROWS, parity=False)
    summary = score_dpg(items, {"b.png": [yes(1, 2)]}, parity=False)  # color 1, texture 0 (answered no)
    assert summary.l2["attribute - color"] == 100.0 and summary.l2["attribute - texture"] == 0.0
    assert summary.l1 == {"attribute": 50.0, "entity": 100.0, "relation": 0.0}
    items2 = parse_dpg_rows(ROWS + [row("b", 5, "1", "attribute - color (dog, collar red)", "q5")], parity=False)
    summary2 = score_dpg(items2, {"b.png": [yes(1, 2, of=(1, 2, 3, 4, 5))]}, parity=False)
    assert summary2.l1["attribute"] == pytest.approx(100 / 3)  # 1 of 3 attribute questions, not mean(50, 0)


# --- CSV ---------------------------------------------------------------------------------------------------------

def test_csv_fixture_round_trip(tmp_path):
    path = write_csv(tmp_path / "dpg_bench.csv", ROWS)
    items = load_dpg_csv(path, parity=False)
    assert list(items) == ["a", "b"]
    assert items["b"].dependencies == {1: [0], 2: [1], 3: [2], 4: [1, 3]}
    assert items["b"].questions[4] == "Is the dog on the sofa?"
    assert list(load_dpg_csv(path)["a"].questions) == [2, 3]


def test_malformed_csv_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_dpg_csv(tmp_path / "missing.csv")
    no_tuple = [c for c in CSV_COLUMNS if c != "tuple"]
    with pytest.raises(ValueError, match="'tuple'"):
        load_dpg_csv(write_csv(tmp_path / "a.csv", ROWS, no_tuple))
    bad_id = ROWS[:2] + [dict(ROWS[2], proposition_id="three")] + ROWS[3:]
    with pytest.raises(ValueError, match=r"data row 3: proposition_id"):
        load_dpg_csv(write_csv(tmp_path / "b.csv", bad_id))
    bad_dep = ROWS[:3] + [dict(ROWS[3], dependency="1;2")]
    with pytest.raises(ValueError, match=r"data row 4: each dependency id"):
        load_dpg_csv(write_csv(tmp_path / "c.csv", bad_dep))
    empty_question = ROWS[:1] + [dict(ROWS[1], question_natural_language="")]
    with pytest.raises(ValueError, match="question_natural_language"):
        load_dpg_csv(write_csv(tmp_path / "d.csv", empty_question))
    extra = tmp_path / "e.csv"
    extra.write_text(",".join(CSV_COLUMNS) + "\n" + "a,t,k,1,0,b,d,entity - whole (x),q?,EXTRA\n")
    with pytest.raises(ValueError, match="more fields"):
        load_dpg_csv(extra)


def test_corrected_mode_rejects_what_parity_tolerates():
    split = ROWS[:2] + ROWS[3:] + [ROWS[2]]  # item "a" resumes after "b"
    with pytest.raises(ValueError, match="contiguous"):
        parse_dpg_rows(split, parity=False)
    assert list(parse_dpg_rows(split, parity=True)["a"].questions) == [3]  # official: later block replaces earlier
    dangling = ROWS + [row("b", 5, "9", "entity - whole (x)", "q")]
    with pytest.raises(ValueError, match=r"question 5 depends on \[9\]"):
        parse_dpg_rows(dangling, parity=False)
    with pytest.raises(ValueError, match="repeats proposition_id 2"):
        parse_dpg_rows(ROWS + [row("b", 2, "0", "entity - whole (x)", "q")], parity=False)


# --- grid and VQA seam -------------------------------------------------------------------------------------------

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def test_grid_round_trip_order():
    tiles = [Image.new("RGB", (8, 8), c) for c in COLOURS]
    grid = make_grid(tiles)
    assert grid.size == (16, 16)
    assert grid.getpixel((12, 3)) == COLOURS[1] and grid.getpixel((3, 12)) == COLOURS[2]
    back = split_grid(grid)
    assert [t.size for t in back] == [(8, 8)] * 4
    assert [t.getpixel((4, 4)) for t in back] == COLOURS
    assert [t.getpixel((0, 0)) for t in split_grid(grid, tile_size=4)] == [COLOURS[0]] * 4
    with pytest.raises(ValueError, match="odd"):
        split_grid(Image.new("RGB", (9, 8)))
    with pytest.raises(ValueError, match="differ in size"):
        make_grid(tiles[:3] + [Image.new("RGB", (4, 4))])


def test_answer_grid_with_callable_and_end_to_end():
    items = parse_dpg_rows(ROWS, parity=False)
    grid = make_grid([Image.new("RGB", (8, 8), c) for c in COLOURS])
    calls = []

    def answer(tile, question):  # "sees" the dog only on red tiles; says yes to everything else
        calls.append(question)
        return tile.getpixel((0, 0)) == (255, 0, 0) or question != "Is there a dog?"

    tiles = answer_grid(items["b"], grid, answer)
    assert len(calls) == 16
    assert tiles[0] == yes(1, 2, 3, 4) and tiles[1] == yes(2, 3, 4)
    assert score_dpg(items, {"b.png": tiles}, parity=False).score == pytest.approx(25.0)
    assert len(answer_grid(items["b"], grid, answer, pic_num=1)) == 1
    with pytest.raises(ValueError, match="must return a bool"):
        answer_grid(items["b"], grid, lambda tile, q: "yes")
