"""How a digit is stored, shared by the real digits and the generated ones.

scikit-learn's digits (the UCI Optical Recognition of Handwritten Digits data) are 8×8
grids of 0..16: each cell counts the on-pixels of one 4×4 block of a 32×32 bitmap. The
`sklearn-digits` source and the `digits` generator both store a grid as the same
32×32 greyscale PNG, so a classifier trained on one reads the other unchanged ("train on
synthetic, test on real") and the grid comes back from the PNG without loss.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

#: cells per side of a digit's grid
GRID = 8
#: the most on-pixels a cell can count (one 4×4 block)
LEVELS = 16
#: pixels per side of the bitmap the grid summarises, and of the stored image
IMAGE_SIZE = 32
BLOCK = IMAGE_SIZE // GRID
#: grey value of each cell count: counts spread evenly over 0..255
GREY = np.array([round(count * 255 / LEVELS) for count in range(LEVELS + 1)], dtype=np.uint8)


def digit_image(grid: np.ndarray) -> bytes:
    """An 8×8 grid of 0..16 as a 32×32 8-bit greyscale PNG, each cell a 4×4 block of
    grey round(v·255/16); fixed encoder options, so the same grid gives the same bytes."""
    grid = np.asarray(grid)
    if grid.shape != (GRID, GRID):
        raise ValueError(f"grid: shape {grid.shape}, expected ({GRID}, {GRID})")
    counts = grid.astype(np.int64)
    if not np.array_equal(counts, grid) or counts.min() < 0 or counts.max() > LEVELS:
        bad = grid[(counts != grid) | (counts < 0) | (counts > LEVELS)].flat[0]
        raise ValueError(f"grid: value {bad} is not a whole count in 0..{LEVELS}")
    pixels = np.kron(GREY[counts], np.ones((BLOCK, BLOCK), dtype=np.uint8))
    encoded = io.BytesIO()
    Image.fromarray(pixels, "L").save(encoded, "PNG", compress_level=9)
    return encoded.getvalue()


def grid_from_png(data: bytes) -> np.ndarray:
    """The 8×8 grid a `digit_image` PNG stores (the features a classifier reads); an image
    not in that convention is an error, so a foreign image never becomes silent noise."""
    image = Image.open(io.BytesIO(data))
    if image.mode != "L" or image.size != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"png: {image.mode} {image.size[0]}×{image.size[1]}, expected L {IMAGE_SIZE}×{IMAGE_SIZE}")
    pixels = np.asarray(image)
    grid = np.rint(pixels[::BLOCK, ::BLOCK].astype(np.float64) * LEVELS / 255).astype(np.int64)
    if not np.array_equal(np.kron(GREY[grid], np.ones((BLOCK, BLOCK), dtype=np.uint8)), pixels):
        raise ValueError(f"png: not {BLOCK}×{BLOCK} blocks of the {LEVELS + 1} grid levels")
    return grid


def grid_from_bitmap(bitmap: np.ndarray) -> np.ndarray:
    """The UCI preprocessing: on-pixels per non-overlapping 4×4 block of a 32×32 bitmap
    (0..16), so generated digits are reduced exactly as the real ones were."""
    bitmap = np.asarray(bitmap)
    if bitmap.shape != (IMAGE_SIZE, IMAGE_SIZE) or bitmap.dtype != np.bool_:
        raise ValueError(f"bitmap: {bitmap.dtype} {bitmap.shape}, expected bool ({IMAGE_SIZE}, {IMAGE_SIZE})")
    return bitmap.reshape(GRID, BLOCK, GRID, BLOCK).sum(axis=(1, 3), dtype=np.int64)
