"""The shapes world and its prompts: tokenizer and RGB round trips, non-touching scenes, scenes that satisfy
their own metadata (by construction and as judged by GenEval and the DPG questions), and the prompt splits."""
from functools import lru_cache

import numpy as np
import pytest
from scipy import ndimage

from evaluators.geneval import score_detections
from harness.shapes.detect import detect
from harness.shapes.prompts import (GENEVAL_TAGS, TAGS, eval_prompts, relative_position, sample_metadata,
                                    scene_for, split_of, train_prompts, universe)
from harness.shapes.questions import answer, questions
from harness.shapes.world import (CODEBOOK_SIZE, GRID, NUM_TOKENS, Obj, cells_to_rgb, decode_codes, encode_cells,
                                  render_cells, rgb_to_cells, shape_mask)

# dense prompts cost ~10x more to sample; they get their own, smaller pool
CHEAP_WEIGHTS = {t: 1.0 for t in GENEVAL_TAGS}


@lru_cache(maxsize=None)
def pool(n: int, seed: int, dense: bool) -> tuple:
    """n (metadata, objects, cells) triples from random prompts of both splits."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        meta = sample_metadata(rng, "train" if i % 4 else "eval", {"dense": 1.0} if dense else CHEAP_WEIGHTS)
        objs = scene_for(meta, rng)
        out.append((meta, objs, render_cells(objs)))
    return tuple(out)


def all_scenes() -> tuple:
    return pool(2000, 0, False) + pool(120, 1, True)


def test_tokenizer_round_trip_on_random_scenes():
    cells = np.stack([c for _, _, c in all_scenes()])
    codes = encode_cells(cells)
    assert codes.shape == (len(cells), NUM_TOKENS)
    assert codes.min() >= 0 and codes.max() < CODEBOOK_SIZE
    assert np.array_equal(decode_codes(codes), cells)
    # per-grid encoding agrees with batched encoding
    assert np.array_equal(encode_cells(cells[0]), codes[0])


def test_rgb_round_trip_on_random_scenes():
    for _, _, cells in all_scenes()[::7]:
        rgb = cells_to_rgb(cells)
        assert rgb.shape == (256, 256, 3) and rgb.dtype == np.uint8
        assert np.array_equal(rgb_to_cells(rgb), cells)


def test_tokenizer_is_lossless_for_any_two_colour_patch_and_rejects_bad_codes():
    rng = np.random.default_rng(3)
    for _ in range(200):
        a, b = rng.choice(9, size=2, replace=False)
        cells = np.where(rng.random((GRID, GRID)) < 0.5, a, b).astype(np.uint8)
        assert np.array_equal(decode_codes(encode_cells(cells)), cells)
    with pytest.raises(ValueError):
        decode_codes(np.full(NUM_TOKENS, CODEBOOK_SIZE))


def _object_mask(o: Obj) -> np.ndarray:
    m = np.zeros((GRID, GRID), dtype=bool)
    m[o.row:o.row + o.size, o.col:o.col + o.size] = shape_mask(o.shape, o.size)
    return m


def test_objects_never_touch_even_diagonally():
    for _, objs, cells in all_scenes():
        masks = [_object_mask(o) for o in objs]
        assert int(sum(m.sum() for m in masks)) == int((cells > 0).sum())   # nothing overlaps or goes missing
        for a, b in zip(*np.triu_indices(len(masks), 1)):
            grown = ndimage.binary_dilation(masks[a], structure=np.ones((3, 3), dtype=bool))
            assert not (grown & masks[b]).any()


def test_every_scene_satisfies_its_own_metadata():
    for meta, objs, _ in all_scenes():
        if meta["tag"] == "dense":
            assert [(o.shape, o.color) for o in objs] == [(o["class"], o["color"]) for o in meta["objects"]]
            for o, spec in zip(objs, meta["objects"]):
                if "size" in spec:
                    assert o.size == spec["size"]
            for i, rel, j in meta["relations"]:
                assert rel in relative_position(objs[i].box, objs[j].box)
            continue
        assert len(objs) == sum(c["count"] for c in meta["include"])       # nothing else in the scene
        k = 0
        for clause in meta["include"]:
            mine = objs[k:k + clause["count"]]
            k += clause["count"]
            assert all(o.shape == clause["class"] for o in mine)
            if "color" in clause:
                assert all(o.color == clause["color"] for o in mine)
            if "position" in clause:
                rel, target = clause["position"]
                assert rel in relative_position(mine[0].box, objs[target].box)


def test_geneval_and_dpg_judge_every_scene_correct_on_its_exact_detections():
    for meta, _, cells in all_scenes():
        dets = detect(cells)
        if meta["tag"] != "dense":
            correct, reason = score_detections(meta, dets)
            assert correct, (meta["prompt"], reason)
        graph = questions(meta)
        assert graph and all(answer(q, dets) for q in graph), meta["prompt"]


def test_relative_position_hand_cases():
    left, right = (0, 0, 5, 5), (8, 0, 13, 5)
    assert relative_position(left, right) == {"left of"}
    assert relative_position(right, left) == {"right of"}
    assert relative_position((0, 0, 5, 5), (0, 8, 5, 13)) == {"above"}
    assert relative_position((0, 0, 5, 5), (7, 7, 12, 12)) == {"left of", "above"}   # diagonal: both
    assert relative_position((0, 0, 5, 5), (1, 1, 6, 6)) == set()                      # shift within the margin


def test_splits_are_disjoint_and_every_tag_has_eval_prompts():
    for tag in GENEVAL_TAGS:
        train = {m["prompt"] for m in train_prompts(tag)}
        held = {m["prompt"] for m in eval_prompts(tag)}
        assert held and train and not train & held
        assert train | held == {m["prompt"] for m in universe(tag)}
        assert all(split_of(m) == "eval" for m in eval_prompts(tag))
    rng = np.random.default_rng(5)
    for split in ("train", "eval"):
        for tag in TAGS:
            assert split_of(sample_metadata(rng, split, {tag: 1.0})) == split
    with pytest.raises(ValueError, match="split"):
        sample_metadata(rng, "test", {"dense": 1.0})        # used to loop forever
