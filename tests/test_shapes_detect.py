"""The exact shapes detector: perfect recovery of rendered scenes, low scores for strays, fragments, broken and
merged shapes, and a stencil search that agrees with brute force."""
import numpy as np
import pytest

from harness.shapes.detect import MIN_OBJECT_CELLS, _search, best_fit, detect, detect_image, size_in_cells
from harness.shapes.prompts import GENEVAL_TAGS, place_objects, sample_metadata, scene_for
from harness.shapes.world import (CELL_PX, COLORS, GRID, MAX_SIZE, MIN_SIZE, SHAPES, Obj, cells_to_rgb,
                                  color_index, render_cells, shape_mask)


def _key(d):
    return (d["class"], d["color"], tuple(d["bbox"]))


def test_exact_recovery_on_thousands_of_random_scenes():
    rng = np.random.default_rng(0)
    for i in range(3000):
        if i % 3:
            objs = scene_for(sample_metadata(rng, "train", {t: 1.0 for t in GENEVAL_TAGS}), rng)
        else:   # any mix of shapes, colours and sizes, including same-coloured ones side by side
            n = int(rng.integers(1, 5))
            specs = [(SHAPES[rng.integers(5)], COLORS[rng.integers(8)], None) for _ in range(n)]
            objs = place_objects(specs, rng)
        cells = render_cells(objs)
        dets = detect(cells)
        want = sorted((o.shape, o.color, tuple(int(v * CELL_PX) for v in o.box)) for o in objs)
        assert sorted(_key(d) for d in dets) == want
        assert all(d["score"] == 1.0 for d in dets)
        for d in dets:
            o = next(o for o in objs if (o.shape, o.color, tuple(int(v * CELL_PX) for v in o.box)) == _key(d))
            assert d["cells"] == int(shape_mask(o.shape, o.size).sum()) == int(d["mask"].sum())
            assert (cells[d["mask"]] == color_index(o.color)).all()
            assert size_in_cells(d) == o.size
        if i % 50 == 0:
            assert [_key(d) for d in detect_image(cells_to_rgb(cells))] == [_key(d) for d in dets]


def test_search_finds_every_stencil_exactly_without_the_fast_path():
    for size in range(MIN_SIZE, MAX_SIZE + 1):
        for shape in SHAPES:
            m = np.ascontiguousarray(shape_mask(shape, size))
            assert _search((size, size, m.tobytes())) == (shape, 1.0)
            assert best_fit(m) == (shape, 1.0)


def _brute_force_iou(blob: np.ndarray) -> float:
    h, w = blob.shape
    best = 0.0
    for size in range(MIN_SIZE, MAX_SIZE + 1):
        for shape in SHAPES:
            stencil = shape_mask(shape, size)
            for r in range(-size + 1, h):
                for c in range(-size + 1, w):
                    canvas = np.zeros((h + 2 * size, w + 2 * size), dtype=bool)
                    canvas[size + r:size + r + size, size + c:size + c + size] = stencil
                    inner = canvas[size:size + h, size:size + w]
                    inter = (inner & blob).sum()
                    best = max(best, inter / (blob.sum() + stencil.sum() - inter))
    return best


def test_search_agrees_with_brute_force_on_random_blobs():
    rng = np.random.default_rng(1)
    for _ in range(4):
        blob = rng.random((int(rng.integers(3, 8)), int(rng.integers(3, 8)))) < 0.6
        blob[0, 0] = True
        assert best_fit(blob)[1] == pytest.approx(_brute_force_iou(blob))


def test_stray_cell_and_tiny_fragment_are_not_objects():
    cells = render_cells([Obj("square", "red", 1, 1, 5)])
    cells[12, 12] = color_index("blue")                       # a lone stray cell
    cells[12, 2:6] = color_index("green")                     # a 4-cell fragment
    cells[6, 6] = color_index("yellow")                       # stray touching the square diagonally, other colour
    dets = detect(cells)
    by_colour = {d["color"]: d for d in dets}
    assert by_colour["red"]["score"] == 1.0 and by_colour["red"]["class"] == "square"
    for colour in ("blue", "green", "yellow"):
        assert by_colour[colour]["score"] <= 0.3
        assert by_colour[colour]["cells"] < MIN_OBJECT_CELLS
    assert dets[0]["color"] == "red"                          # sorted by score
    plus = np.zeros((3, 3), dtype=bool)
    plus[1, :] = plus[:, 1] = True                            # 5 cells: just above the fragment limit
    assert best_fit(plus) == ("cross", pytest.approx(5 / 9))


def test_broken_shapes_score_below_0_9():
    # (not "remove the bottom rows": a size-7 triangle without its last two rows IS the size-5 triangle)
    for shape in SHAPES:
        cells = render_cells([Obj(shape, "green", 3, 3, 7)])
        broken = cells.copy()
        broken[3 + 3, :] = 0                                   # a horizontal cut through the middle
        scores = [d["score"] for d in detect(broken)]
        assert len(scores) == 2 and max(scores) < 0.9
        dented = cells.copy()
        dented[:, 3:3 + 2] = 0                                 # the left two columns removed
        (d,) = detect(dented)
        assert 0.3 < d["score"] < 0.9
        cut = render_cells([Obj(shape, "green", 9, 9, 7)])[9:, 9:]   # a shape cut by the border
        edge = np.zeros((GRID, GRID), dtype=np.uint8)
        edge[:4, :4] = cut[3:, 3:]
        assert all(d["score"] < 0.9 for d in detect(edge))


def test_same_colour_shapes_that_touch_merge_different_colours_do_not():
    a, b = Obj("square", "red", 2, 2, 5), Obj("circle", "red", 2, 7, 5)        # side by side, touching
    (merged,) = detect(render_cells([a, b]))
    assert merged["cells"] == 25 + 21 and merged["score"] < 0.6
    diagonal = render_cells([Obj("square", "red", 0, 0, 5), Obj("square", "red", 5, 5, 5)])  # corner contact only
    (d,) = detect(diagonal)                                                      # 8-connectivity merges them
    assert d["cells"] == 50 and d["score"] < 0.6
    two = render_cells([a, Obj("circle", "blue", 2, 7, 5)])
    assert sorted((d["class"], d["color"], d["score"]) for d in detect(two)) == [("circle", "blue", 1.0),
                                                                                 ("square", "red", 1.0)]


def test_bad_input_is_rejected():
    with pytest.raises(ValueError):
        detect(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError):
        detect(np.full((GRID, GRID), 9, dtype=np.uint8))
    with pytest.raises(ValueError):
        detect_image(np.zeros((256, 256), dtype=np.uint8))
    assert detect(np.zeros((GRID, GRID), dtype=np.uint8)) == []
