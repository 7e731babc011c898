"""The "shapes" world: scenes of 1 to 4 flat shapes on a white canvas, with exact ground truth.

A scene lives on a GRID x GRID grid of cells; each cell holds one palette index (0 = background).
Objects never touch (at least one empty cell between any two, diagonals included), which is
what makes the 2x2 patch tokenizer below exact: a patch can then hold at most two colours.

Everything here is numpy only, so the world can be used without torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

GRID = 16               # cells per side
PATCH = 2               # cells per token side
TOKENS_SIDE = GRID // PATCH
NUM_TOKENS = TOKENS_SIDE * TOKENS_SIDE
CELL_PX = 16            # pixels per cell in decoded images (256 x 256)
MIN_SIZE, MAX_SIZE = 5, 7

SHAPES = ("square", "circle", "triangle", "cross", "diamond")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")
BACKGROUND_RGB = (255, 255, 255)
COLOR_RGB = {
    "red": (220, 38, 38),
    "orange": (245, 140, 20),
    "yellow": (235, 205, 25),
    "green": (40, 165, 60),
    "blue": (40, 90, 220),
    "purple": (135, 60, 190),
    "pink": (245, 130, 195),
    "brown": (125, 78, 38),
}
# palette index 0 is the background, 1.. are COLORS in order
PALETTE = np.array([BACKGROUND_RGB] + [COLOR_RGB[c] for c in COLORS], dtype=np.uint8)


def color_index(color: str) -> int:
    return COLORS.index(color) + 1


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    row: int      # top cell of the bounding square
    col: int      # left cell
    size: int     # side of the bounding square, in cells

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Bounding box of the drawn cells in cell units, (x1, y1, x2, y2) with x2/y2 exclusive."""
        x1, y1, x2, y2 = _stencil_box(self.shape, self.size)
        return (self.col + x1, self.row + y1, self.col + x2, self.row + y2)


@lru_cache(maxsize=None)
def _stencil_box(shape: str, size: int) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(shape_mask(shape, size))
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean [size, size] stencil of a shape (read-only, cached). Every shape touches all four sides."""
    return _shape_mask(shape, size)


@lru_cache(maxsize=None)
def _shape_mask(shape: str, size: int) -> np.ndarray:
    m = _draw_stencil(shape, size)
    m.setflags(write=False)
    return m


def _draw_stencil(shape: str, size: int) -> np.ndarray:
    c = (size - 1) / 2.0
    i, j = np.mgrid[0:size, 0:size]
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        r = size / 2.0
        return (i - c) ** 2 + (j - c) ** 2 <= (r - 0.5) ** 2 + 0.75 * r
    if shape == "diamond":
        return np.abs(i - c) + np.abs(j - c) <= c + (0.5 if size % 2 == 0 else 0.01)
    if shape == "triangle":  # apex up, base along the bottom row
        half_width = (i + 1) / size * (size / 2.0)
        return np.abs(j + 0.5 - size / 2.0) <= half_width + 1e-9
    if shape == "cross":
        t = 1 if size < 6 else (2 if size == 6 else 3)   # arm thickness keeps the cross symmetric
        lo = (size - t) // 2
        band = (np.arange(size) >= lo) & (np.arange(size) < lo + t)
        return band[:, None] | band[None, :]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render_cells(objects: list[Obj]) -> np.ndarray:
    """Scene -> uint8 [GRID, GRID] palette indices."""
    cells = np.zeros((GRID, GRID), dtype=np.uint8)
    for o in objects:
        m = shape_mask(o.shape, o.size)
        if o.row < 0 or o.col < 0 or o.row + o.size > GRID or o.col + o.size > GRID:
            raise ValueError(f"object {o} does not fit on the {GRID}x{GRID} grid")
        region = cells[o.row:o.row + o.size, o.col:o.col + o.size]
        region[m] = color_index(o.color)
    return cells


def cells_to_rgb(cells: np.ndarray, cell_px: int = CELL_PX) -> np.ndarray:
    """[..., GRID, GRID] palette indices -> [..., H, W, 3] uint8, each cell a cell_px square."""
    rgb = PALETTE[cells]
    return rgb.repeat(cell_px, axis=-3).repeat(cell_px, axis=-2)


def rgb_to_cells(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] image -> nearest palette index per cell, read at each cell's centre pixel(s)."""
    h, w = rgb.shape[:2]
    ph, pw = h / GRID, w / GRID
    ys = ((np.arange(GRID) + 0.5) * ph).astype(int)
    xs = ((np.arange(GRID) + 0.5) * pw).astype(int)
    centres = rgb[ys][:, xs].astype(np.int32)                            # [GRID, GRID, 3]
    d = ((centres[:, :, None, :] - PALETTE[None, None].astype(np.int32)) ** 2).sum(-1)
    return d.argmin(-1).astype(np.uint8)


# --- exact 2x2 patch codebook --------------------------------------------------------------
# code 0..P-1: a uniform patch of palette index p; then, for each unordered colour pair (a < b),
# 14 codes for the patterns (4 bits, cell order TL TR BL BR, bit set = colour b) holding both.
NUM_PALETTE = len(PALETTE)
_PAIRS = [(a, b) for a in range(NUM_PALETTE) for b in range(a + 1, NUM_PALETTE)]
CODEBOOK_SIZE = NUM_PALETTE + 14 * len(_PAIRS)          # 9 + 36 * 14 = 513


def _build_tables() -> tuple[np.ndarray, np.ndarray]:
    code_to_patch = np.zeros((CODEBOOK_SIZE, 4), dtype=np.uint8)
    for p in range(NUM_PALETTE):
        code_to_patch[p] = p
    for k, (a, b) in enumerate(_PAIRS):
        for pattern in range(1, 15):
            bits = [(pattern >> (3 - q)) & 1 for q in range(4)]
            code_to_patch[NUM_PALETTE + 14 * k + pattern - 1] = [b if bit else a for bit in bits]
    # patch (4 palette indices, base NUM_PALETTE) -> code; -1 where the patch has 3+ colours
    patch_to_code = np.full(NUM_PALETTE ** 4, -1, dtype=np.int32)
    keys = (code_to_patch.astype(np.int64) * NUM_PALETTE ** np.arange(3, -1, -1)).sum(-1)
    patch_to_code[keys] = np.arange(CODEBOOK_SIZE)
    return code_to_patch, patch_to_code


CODE_TO_PATCH, PATCH_TO_CODE = _build_tables()


def cells_to_patches(cells: np.ndarray) -> np.ndarray:
    """[..., GRID, GRID] -> [..., NUM_TOKENS, 4] cell values of each 2x2 patch (row-major patches)."""
    lead = cells.shape[:-2]
    x = cells.reshape(*lead, TOKENS_SIDE, PATCH, TOKENS_SIDE, PATCH)
    x = np.moveaxis(x, -3, -2)                                          # [..., T, T, P, P]
    return x.reshape(*lead, NUM_TOKENS, PATCH * PATCH)


def encode_cells(cells: np.ndarray) -> np.ndarray:
    """[..., GRID, GRID] palette indices -> [..., NUM_TOKENS] codes. Exact for touching-free scenes.

    A patch with three or more colours has no code; it is mapped to the code of its two most
    common colours (lossy, and only possible for images not made by render_cells).
    """
    patches = cells_to_patches(cells).astype(np.int64)
    keys = (patches * NUM_PALETTE ** np.arange(3, -1, -1)).sum(-1)
    codes = PATCH_TO_CODE[keys]
    bad = np.argwhere(codes < 0)
    for idx in bad:
        patch = patches[tuple(idx)]
        values, counts = np.unique(patch, return_counts=True)
        keep = values[np.argsort(-counts, kind="stable")[:2]]
        fixed = np.where(np.isin(patch, keep), patch, keep[0])
        codes[tuple(idx)] = PATCH_TO_CODE[(fixed * NUM_PALETTE ** np.arange(3, -1, -1)).sum()]
    return codes.astype(np.int64)


def decode_codes(codes: np.ndarray) -> np.ndarray:
    """[..., NUM_TOKENS] codes -> [..., GRID, GRID] palette indices."""
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= CODEBOOK_SIZE):
        raise ValueError(f"codes must lie in [0, {CODEBOOK_SIZE}); got [{codes.min()}, {codes.max()}]")
    patches = CODE_TO_PATCH[codes]                                       # [..., N, 4]
    lead = patches.shape[:-2]
    x = patches.reshape(*lead, TOKENS_SIDE, TOKENS_SIDE, PATCH, PATCH)
    x = np.moveaxis(x, -2, -3)                                          # [..., T, P, T, P]
    return x.reshape(*lead, GRID, GRID)
