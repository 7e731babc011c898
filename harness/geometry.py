"""Box geometry shared by the shapes world (to place objects) and the GenEval judge (to score them)."""
from __future__ import annotations

import numpy as np


def relative_position(box_a, box_b, position_threshold: float = 0.1) -> set[str]:
    """Relations of box A relative to box B ("left of", "right of", "above", "below"); image y points down.

    The centre offset is shrunk per axis by position_threshold * (size_a + size_b), then divided by the length of
    the unshrunk offset; a component beyond +-0.5 gives the relation. Both shrunk components < 1e-3 -> no relation.
    """
    a = np.asarray(box_a[:4], dtype=np.float32)
    b = np.asarray(box_b[:4], dtype=np.float32)
    offset = (a[:2] + a[2:]) / np.float32(2) - (b[:2] + b[2:]) / np.float32(2)
    size_sum = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    shrunk = np.maximum(np.abs(offset) - np.float32(position_threshold) * size_sum, np.float32(0)) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations
