"""GenEval engine: every branch of the official rules on hand-built detections."""
from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

from evaluators.coco_prompts import COCO_CLASSES
from evaluators.geneval import (aggregate, box_iou, colors_needed, kept_details, load_metadata, relative_position,
                                results_record, score_detections, write_results_jsonl)

SHARED_GENEVAL = Path(__file__).resolve().parents[2] / "shared" / "reference" / "geneval"


def det(cls, box, score, color=None):
    return {"class": cls, "bbox": list(box), "score": score, "color": color}


def single(cls):
    return {"tag": "single_object", "include": [{"class": cls, "count": 1}], "prompt": f"a photo of a {cls}"}


def counting(cls, n):
    return {"tag": "counting", "include": [{"class": cls, "count": n}], "exclude": [{"class": cls, "count": n + 1}],
            "prompt": f"a photo of {n} {cls}s"}


def position(a, relation, b):
    return {"tag": "position", "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
            "prompt": f"a photo of a {a} {relation} a {b}"}


BOX = [10, 10, 50, 50]
CENTRE_B = [40, 40, 60, 60]  # centre (50, 50), 20 x 20


# --- thresholds, truncation, NMS ---------------------------------------------------------------------------------

def test_threshold_is_strict():
    assert score_detections(single("bench"), [det("bench", BOX, 0.3)]) == (False, "expected bench>=1, found 0")
    assert score_detections(single("bench"), [det("bench", BOX, 0.3001)]) == (True, "")
    # float32 detector scores: float32(0.3) is 0.30000001 in float64 but equals the threshold in float32
    assert score_detections(single("bench"), [det("bench", BOX, float(np.float32(0.3)))])[0] is False
    assert score_detections(single("bench"), [det("bench", BOX, 0.5)], threshold=0.5)[0] is False


def test_other_classes_do_not_count():
    assert score_detections(single("bench"), [det("cat", BOX, 0.99)]) == (False, "expected bench>=1, found 0")


def test_counting_threshold_applies_to_include():
    meta = counting("clock", 2)
    dets = [det("clock", BOX, 0.95), det("clock", BOX, 0.85)]
    assert score_detections(meta, dets) == (False, "expected clock>=2, found 1")
    assert score_detections(meta, dets, counting_threshold=0.8) == (True, "")
    # the same detections under a non-counting tag use 0.3
    two = {"tag": "two_object", "include": [{"class": "clock", "count": 2}], "prompt": "p"}
    assert score_detections(two, dets) == (True, "")


def test_counting_threshold_applies_to_exclude_too():
    meta = counting("clock", 2)
    low_third = [det("clock", BOX, 0.95), det("clock", BOX, 0.95), det("clock", BOX, 0.5)]
    assert score_detections(meta, low_third) == (True, "")  # 0.5 < 0.9, so it is not a third clock
    three = [det("clock", BOX, 0.95), det("clock", BOX, 0.95), det("clock", BOX, 0.91)]
    assert score_detections(meta, three) == (False, "expected clock<3, found 3")


def test_wrong_count():
    assert score_detections(counting("cup", 3), [det("cup", BOX, 0.99)] * 2) == (False, "expected cup>=3, found 2")
    assert score_detections(counting("cup", 3), [det("cup", BOX, 0.99)] * 4) == (False, "expected cup<4, found 4")
    assert score_detections(counting("cup", 3), [det("cup", BOX, 0.99)] * 3) == (True, "")


def test_max_objects_per_class():
    dets = [det("kite", BOX, 0.40 + 0.01 * i) for i in range(20)]
    details = kept_details(single("kite"), dets)
    assert len(details["kite"]) == 16
    assert [row[4] for row in details["kite"]] == sorted((d["score"] for d in dets), reverse=True)[:16]
    meta = {"tag": "two_object", "include": [], "exclude": [{"class": "kite", "count": 17}], "prompt": "p"}
    assert score_detections(meta, dets)[0] is True  # 20 detected, only 16 kept
    assert score_detections(meta, dets, max_objects=17) == (False, "expected kite<17, found 17")


def test_box_iou_uses_plus_one_pixels():
    assert box_iou([0, 0, 9, 9], [0, 0, 9, 9]) == 1.0
    assert box_iou([0, 0, 9, 9], [5, 0, 14, 9]) == pytest.approx(50 / 150)  # 36/126 without the +1
    assert box_iou([0, 0, 9, 9], [20, 20, 29, 29]) == 0.0


def test_nms_off_by_default_and_on_below_one():
    meta = counting("dog", 2)
    dets = [det("dog", [0, 0, 9, 9], 0.99), det("dog", [1, 0, 10, 9], 0.98)]  # IoU 90/110
    assert score_detections(meta, dets) == (True, "")
    assert score_detections(meta, dets, nms_threshold=0.5) == (False, "expected dog>=2, found 1")
    assert score_detections(meta, dets, nms_threshold=0.9) == (True, "")  # 0.818 < 0.9 survives


def test_kept_sorted_by_score_and_ties_prefer_later_detection():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}
    assert score_detections(meta, [det("car", BOX, 0.5, "blue"), det("car", BOX, 0.9, "red")]) == (True, "")
    assert score_detections(meta, [det("car", BOX, 0.7, "red"), det("car", BOX, 0.7, "blue")])[0] is False
    assert colors_needed(meta, [det("car", BOX, 0.7), det("car", BOX, 0.7)]) == [1]


# --- colour ------------------------------------------------------------------------------------------------------

def test_colour_only_top_count_objects_are_checked():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "p"}
    dets = [det("car", BOX, 0.9, "blue"), det("car", BOX, 0.8, "red")]
    assert score_detections(meta, dets) == (False, "expected red car>=1, found 0 red; and 1 blue")
    assert colors_needed(meta, [det("car", BOX, 0.9), det("car", BOX, 0.8)]) == [0]


def test_colour_counts_and_reason_order():
    meta = {"tag": "counting", "include": [{"class": "vase", "count": 3, "color": "white"}], "prompt": "p"}
    dets = [det("vase", BOX, 0.99, "white"), det("vase", BOX, 0.98, "red"), det("vase", BOX, 0.97, "white")]
    assert score_detections(meta, dets) == (False, "expected white vase>=3, found 2 white; and 1 red, 2 white")
    dets[1]["color"] = "white"
    assert score_detections(meta, dets) == (True, "")


def test_colour_clause_needs_classified_objects():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "p"}
    with pytest.raises(ValueError, match="colors_needed"):
        score_detections(meta, [det("car", BOX, 0.9)])
    # not enough objects: the colour is never looked at, as in the official code
    assert colors_needed(meta, [det("car", BOX, 0.1)]) == []
    assert score_detections(meta, [det("car", BOX, 0.1)]) == (False, "expected car>=1, found 0")


def test_color_attr_both_clauses_anded():
    meta = {"tag": "color_attr", "include": [{"class": "apple", "count": 1, "color": "black"},
                                             {"class": "cup", "count": 1, "color": "pink"}], "prompt": "p"}
    good = [det("apple", BOX, 0.9, "black"), det("cup", BOX, 0.9, "pink")]
    assert score_detections(meta, good) == (True, "")
    swapped = [det("apple", BOX, 0.9, "pink"), det("cup", BOX, 0.9, "black")]
    ok, reason = score_detections(meta, swapped)
    assert not ok and reason.split("\n") == ["expected black apple>=1, found 0 black; and 1 pink",
                                             "expected pink cup>=1, found 0 pink; and 1 black"]


# --- position ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("relation, box_a", [
    ("left of", [0, 40, 20, 60]), ("right of", [80, 40, 100, 60]),
    ("above", [40, 0, 60, 20]), ("below", [40, 80, 60, 100]),
])
def test_each_direction(relation, box_a):
    assert relative_position(box_a, CENTRE_B) == {relation}
    dets = [det("teddy bear", CENTRE_B, 0.9), det("dog", box_a, 0.9)]
    assert score_detections(position("dog", relation, "teddy bear"), dets) == (True, "")
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]
    ok, reason = score_detections(position("dog", opposite, "teddy bear"), dets)
    assert not ok and reason == f"expected dog {opposite} target, found {relation} target"


def test_margin_and_unshrunk_norm():
    # offset -3 is inside the margin 0.1 * (20 + 20) = 4 -> no relation at all
    assert relative_position([37, 40, 57, 60], CENTRE_B) == set()
    ok, reason = score_detections(position("dog", "left of", "teddy bear"),
                                  [det("teddy bear", CENTRE_B, 0.9), det("dog", [37, 40, 57, 60], 0.9)])
    assert not ok and reason == "expected dog left of target, found  target"
    # offset -10 with 40-wide boxes: shrunk to -2, divided by the UNshrunk 10 -> -0.2, not "left of"
    assert relative_position([20, 0, 60, 40], [30, 0, 70, 40]) == set()
    assert relative_position([20, 0, 60, 40], [30, 0, 70, 40], position_threshold=0.0) == {"left of"}


def test_diagonal_gives_several_relations_and_the_half_cut():
    assert relative_position([10, 10, 30, 30], CENTRE_B) == {"left of", "above"}  # offset (-30, -30)
    assert relative_position([10, 30, 30, 50], CENTRE_B) == {"left of"}  # offset (-30, -10): dy = -6/31.6
    dets = [det("teddy bear", CENTRE_B, 0.9), det("dog", [10, 10, 30, 30], 0.9)]
    assert score_detections(position("dog", "above", "teddy bear"), dets) == (True, "")
    ok, reason = score_detections(position("dog", "above", "teddy bear"),
                                  [det("teddy bear", CENTRE_B, 0.9), det("dog", [10, 30, 30, 50], 0.9)])
    assert reason == "expected dog above target, found left of target"


def test_position_checks_every_found_object_against_every_target():
    meta = {"tag": "position", "include": [{"class": "bench", "count": 1},
                                           {"class": "bird", "count": 2, "position": ["left of", 0]}], "prompt": "p"}
    both_left = [det("bench", CENTRE_B, 0.9), det("bird", [0, 40, 20, 60], 0.9), det("bird", [0, 0, 20, 20], 0.8)]
    assert score_detections(meta, both_left) == (True, "")
    one_right = both_left[:2] + [det("bird", [80, 40, 100, 60], 0.8)]
    assert score_detections(meta, one_right) == (False, "expected bird left of target, found right of target")


def test_missing_target_fails_position():
    ok, reason = score_detections(position("dog", "left of", "teddy bear"), [det("dog", [0, 40, 20, 60], 0.9)])
    assert not ok and reason.split("\n") == ["expected teddy bear>=1, found 0", "no target for dog to be left of"]


def test_position_skipped_when_colour_already_failed():
    meta = {"tag": "position", "include": [{"class": "bench", "count": 1},
                                           {"class": "bird", "count": 1, "color": "red", "position": ["left of", 0]}],
            "prompt": "p"}
    dets = [det("bench", CENTRE_B, 0.9), det("bird", [80, 40, 100, 60], 0.9, "blue")]
    assert score_detections(meta, dets) == (False, "expected red bird>=1, found 0 red; and 1 blue")


# --- include / exclude combination -------------------------------------------------------------------------------

def test_missing_object_in_two_object():
    meta = {"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "sports ball", "count": 1}],
            "prompt": "a photo of a bench and a sports ball"}
    assert score_detections(meta, [det("bench", BOX, 0.9)]) == (False, "expected sports ball>=1, found 0")
    assert score_detections(meta, [det("bench", BOX, 0.9), det("sports ball", BOX, 0.4)]) == (True, "")


def test_exclude_clauses_are_ored():
    meta = {"tag": "counting", "include": [],
            "exclude": [{"class": "cat", "count": 1}, {"class": "dog", "count": 2}], "prompt": "p"}
    assert score_detections(meta, []) == (True, "")
    assert score_detections(meta, [det("cat", BOX, 0.95)]) == (False, "expected cat<1, found 1")
    assert score_detections(meta, [det("dog", BOX, 0.95)] * 2) == (False, "expected dog<2, found 2")
    ok, reason = score_detections(meta, [det("cat", BOX, 0.95)] + [det("dog", BOX, 0.95)] * 3)
    assert not ok and reason == "expected cat<1, found 1\nexpected dog<2, found 3"


def test_bad_detection_is_a_clear_error():
    with pytest.raises(ValueError, match="detection 0"):
        score_detections(single("cat"), [{"class": "cat", "bbox": [1, 2, 3], "score": 0.9}])
    with pytest.raises(ValueError, match="color"):
        score_detections(single("cat"), [det("cat", BOX, 0.9, "teal")])


# --- metadata ----------------------------------------------------------------------------------------------------

def test_official_metadata_parses():
    path = SHARED_GENEVAL / "evaluation_metadata.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} absent (../shared not checked out)")
    metadata = load_metadata(path)
    assert len(metadata) == 553
    assert collections.Counter(m["tag"] for m in metadata) == {
        "single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}
    assert [m["tag"] for m in metadata[:1]] == ["single_object"] and metadata[-1]["tag"] == "color_attr"
    names = (SHARED_GENEVAL / "object_names.txt").read_text().splitlines()
    assert tuple(names) == COCO_CLASSES
    assert {c["class"] for m in metadata for c in m["include"]} <= set(COCO_CLASSES)


def test_load_metadata_errors_name_file_and_line(tmp_path):
    good = json.dumps(single("cat"))
    path = tmp_path / "meta.jsonl"
    path.write_text(good + "\n{not json\n")
    with pytest.raises(ValueError, match=r"meta\.jsonl: line 2 is not valid JSON"):
        load_metadata(path)
    path.write_text(good + "\n" + json.dumps({"tag": "x", "prompt": "p", "include": [{"class": "cat", "count": 0}]}))
    with pytest.raises(ValueError, match=r"line 2: include\[0\]: 'count'"):
        load_metadata(path)
    path.write_text(good + "\n\n" + good + "\n")
    with pytest.raises(ValueError, match="line 2 is blank"):
        load_metadata(path)
    path.write_text(good + "\n\n")
    assert load_metadata(path) == [single("cat")]
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_metadata(tmp_path / "nope.jsonl")


# --- results and aggregation -------------------------------------------------------------------------------------

def _record(tag, prompt, correct):
    meta = {"tag": tag, "include": [], "prompt": prompt}
    return results_record(f"{prompt}.png", meta, correct, "", {})


def test_aggregate_unweighted_over_tags_and_prompt_any():
    results = ([_record("single_object", "a", True)] * 4
               + [_record("counting", "b", True), _record("counting", "b", False)]
               + [_record("counting", "c", False), _record("counting", "c", False)])
    summary = aggregate(results)
    assert summary["tags"]["single_object"] == {"accuracy": 1.0, "correct": 4, "total": 4}
    assert summary["tags"]["counting"]["accuracy"] == 0.25
    assert summary["overall"] == pytest.approx((1.0 + 0.25) / 2)  # not the image mean 5/8
    assert summary["frac_correct_images"] == pytest.approx(5 / 8)
    assert summary["n_prompts"] == 3
    assert summary["frac_correct_prompts"] == pytest.approx(2 / 3)  # official: any image correct
    assert summary["frac_prompts_all_correct"] == pytest.approx(1 / 3)
    assert "position" in summary["missing_tags"] and "counting" not in summary["missing_tags"]
    with pytest.raises(ValueError):
        aggregate([])


def test_results_record_round_trip(tmp_path):
    meta = single("cat")
    dets = [det("cat", [1, 2, 3, 4], 0.9), det("cat", [0, 0, 9, 9], 0.2)]
    correct, reason = score_detections(meta, dets)
    record = results_record("00000/samples/0000.png", meta, correct, reason, kept_details(meta, dets))
    assert set(record) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert json.loads(record["details"]) == {"cat": [[1.0, 2.0, 3.0, 4.0, 0.9]]}
    assert json.loads(record["metadata"]) == meta
    path = write_results_jsonl(tmp_path / "out" / "results.jsonl", [record, record])
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [record, record]
    assert aggregate([json.loads(line) for line in lines])["overall"] == 1.0


def test_geneval_overall_carries_its_standard_error():
    """Tag a: 3 of 4 correct (s.e. = sample std / sqrt(4)); tag b: 1 of 2. overall = (0.75 + 0.5) / 2 and its
    s.e. = sqrt(se_a^2 + se_b^2) / 2; the value itself stays the official one."""
    import numpy as np
    from evaluators.geneval import summary_metrics
    outcomes = {"single_object": [True, False, True, True], "colors": [True, False]}
    records = [{"tag": tag, "correct": c, "metadata": json.dumps({"tag": tag, "i": i})}
               for tag, cs in outcomes.items() for i, c in enumerate(cs)]
    metrics = {m.name: m for m in summary_metrics(records)}
    se = {t: np.std(np.array(cs, float), ddof=1) / np.sqrt(len(cs)) for t, cs in outcomes.items()}
    se["a"], se["b"] = se["single_object"], se["colors"]
    assert metrics["geneval_overall"].value == (0.75 + 0.5) / 2
    assert metrics["geneval_overall"].stderr == pytest.approx(np.sqrt(se["a"] ** 2 + se["b"] ** 2) / 2)
    assert metrics["geneval_overall"].n == 6
    assert metrics["geneval_single_object"].stderr == pytest.approx(se["a"]) and metrics["geneval_single_object"].n == 4
