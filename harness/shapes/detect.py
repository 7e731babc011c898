"""Exact object detector for the shapes world: connected blobs of one colour, scored by stencil fit.

Rules (the detector is the ground truth for every shapes evaluator, so they are spelled out):

- An object is a connected component of cells with the same palette index (background 0 is never
  an object). Different colours are always different objects, even when they touch.
- Connectivity is 8 (diagonals connect). The world keeps objects apart by at least one empty cell
  *including diagonals*, so 8-connectivity is exactly the world's own notion of "separate"; with
  4-connectivity two same-coloured shapes touching only at a corner would be read as two perfect
  objects although the image breaks the world's rule. Under 8-connectivity they merge into one blob
  whose fit is poor.
- score = best IoU (in cells) between the blob and a shape stencil of any kind in SHAPES, any size
  MIN_SIZE..MAX_SIZE, at any offset (the stencil may hang over the grid edge; its hidden cells
  still count in the union, so a shape cut by the border scores below 1). "class" is the shape of
  that best stencil (ties go to the earlier size, then the earlier entry of SHAPES).
  A rendered object matches its own stencil exactly, so it scores 1.0.
- Fragments: a blob with fewer than MIN_OBJECT_CELLS cells (less than half of the smallest stencil,
  the size-5 cross with 9 cells) cannot be any shape; it is still reported (so stray-cell statistics
  see it) but with score 0.0. A blob of 5 to 8 cells scores at most n / 9 < 0.9 by construction.
- bbox is the blob's bounding box in pixels of the decoded image: [x1, y1, x2, y2] = cells * CELL_PX,
  x2/y2 exclusive (so for a rendered object it is exactly Obj.box * CELL_PX).

Detections are returned sorted by score, highest first (GenEval expects its per-class lists in
confidence order); ties keep raster order of the blob's first cell.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from harness.shapes.world import CELL_PX, COLORS, GRID, MAX_SIZE, MIN_SIZE, SHAPES, rgb_to_cells, shape_mask

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
SMALLEST_STENCIL_CELLS = min(int(shape_mask(s, z).sum()) for s in SHAPES for z in range(MIN_SIZE, MAX_SIZE + 1))
MIN_OBJECT_CELLS = SMALLEST_STENCIL_CELLS // 2 + 1          # 9 // 2 + 1 = 5


@lru_cache(maxsize=None)
def _exact_table() -> dict[tuple[int, int, bytes], str]:
    """(height, width, mask bytes) of every stencil -> shape name: the fast path for perfect blobs."""
    table = {}
    for size in range(MIN_SIZE, MAX_SIZE + 1):
        for shape in SHAPES:
            m = np.ascontiguousarray(shape_mask(shape, size))
            table.setdefault((size, size, m.tobytes()), shape)   # every stencil touches all four sides
    return table


@lru_cache(maxsize=None)
def _stencil_stacks() -> tuple[tuple[int, np.ndarray, np.ndarray], ...]:
    """Per size: (size, [size*size, n_shapes] float stencils, [n_shapes] cell counts)."""
    out = []
    for size in range(MIN_SIZE, MAX_SIZE + 1):
        stack = np.stack([shape_mask(s, size).reshape(-1) for s in SHAPES], axis=1).astype(np.float64)
        out.append((size, stack, stack.sum(0)))
    return tuple(out)


def best_fit(blob: np.ndarray) -> tuple[str, float]:
    """Shape name and IoU of the stencil (any shape, size, offset) that best fits a bool blob crop."""
    blob = np.ascontiguousarray(blob, dtype=bool)
    key = (blob.shape[0], blob.shape[1], blob.tobytes())
    shape_name = _exact_table().get(key)
    if shape_name is not None:
        return shape_name, 1.0
    return _search(key)


@lru_cache(maxsize=1 << 16)
def _search(key: tuple[int, int, bytes]) -> tuple[str, float]:
    """Exhaustive stencil search, cached by blob pattern (generated images repeat their fragments)."""
    h, w, data = key
    blob = np.frombuffer(data, dtype=bool).reshape(h, w)
    n = float(blob.sum())
    best_shape, best_iou = SHAPES[0], -1.0
    for size, stack, counts in _stencil_stacks():
        padded = np.pad(blob, size - 1).astype(np.float64)
        windows = sliding_window_view(padded, (size, size)).reshape(-1, size * size)
        inter = windows @ stack                                   # [offsets, shapes]
        iou = (inter / (n + counts - inter)).max(0)               # best offset per shape
        k = int(iou.argmax())
        if iou[k] > best_iou + 1e-9:
            best_shape, best_iou = SHAPES[k], float(iou[k])
    return best_shape, best_iou


def detect(cells: np.ndarray) -> list[dict]:
    """[GRID, GRID] palette-index grid -> detections (see the module docstring for the rules)."""
    cells = np.asarray(cells)
    if cells.shape != (GRID, GRID):
        raise ValueError(f"detect expects a [{GRID}, {GRID}] palette-index grid, got shape {cells.shape}")
    if cells.size and (cells.min() < 0 or cells.max() > len(COLORS)):
        raise ValueError(f"palette indices must lie in [0, {len(COLORS)}]; got [{cells.min()}, {cells.max()}]")
    found = []
    for colour_index in np.unique(cells):
        if colour_index == 0:
            continue
        labels, n = ndimage.label(cells == colour_index, structure=EIGHT_CONNECTED)
        for k, sl in enumerate(ndimage.find_objects(labels), start=1):
            blob = labels[sl] == k
            n_cells = int(blob.sum())
            if n_cells < MIN_OBJECT_CELLS:
                shape_name, score = best_fit(blob)[0], 0.0
            else:
                shape_name, score = best_fit(blob)
            mask = np.zeros((GRID, GRID), dtype=bool)
            mask[sl] = blob
            y1, x1, y2, x2 = sl[0].start, sl[1].start, sl[0].stop, sl[1].stop
            first = int(np.flatnonzero(mask)[0])
            found.append((-score, first, {
                "class": shape_name,
                "color": COLORS[int(colour_index) - 1],
                "bbox": [x1 * CELL_PX, y1 * CELL_PX, x2 * CELL_PX, y2 * CELL_PX],
                "score": score,
                "mask": mask,
                "cells": n_cells,
            }))
    found.sort(key=lambda t: (t[0], t[1]))
    return [d for _, _, d in found]


def detect_image(rgb: np.ndarray) -> list[dict]:
    """[H, W, 3] RGB image -> detections, reading each cell's colour at its centre (world.rgb_to_cells)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"detect_image expects an [H, W, 3] RGB image, got shape {rgb.shape}")
    return detect(rgb_to_cells(rgb))


def size_in_cells(detection: dict) -> int:
    """Side of a detection's bounding box in cells (the larger side): 5 = small, 7 = big in prompts."""
    x1, y1, x2, y2 = detection["bbox"]
    return int(round(max(x2 - x1, y2 - y1) / CELL_PX))


def centre_in_cells(detection: dict) -> tuple[float, float]:
    """(x, y) centre of a detection's bounding box in cell units."""
    x1, y1, x2, y2 = detection["bbox"]
    return ((x1 + x2) / 2 / CELL_PX, (y1 + y2) / 2 / CELL_PX)
