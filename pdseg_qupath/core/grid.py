"""Windows on a pixel grid at a chosen resolution, and their mapping to level-0 coordinates.

A :class:`Window` is an integer rectangle on the grid whose pixels are ``downsample`` level-0 pixels
wide (``downsample = mpp / slide_mpp``). Rasterizing, reading and stitching all work in these windows,
so their pixels line up exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from affine import Affine


@dataclass(frozen=True)
class Window:
    x: int
    y: int
    width: int
    height: int
    downsample: float = 1.0

    @property
    def transform(self) -> Affine:
        """Affine from window pixel (col, row) to level-0 (x, y), as rasterio expects."""
        d = self.downsample
        return Affine(d, 0.0, self.x * d, 0.0, d, self.y * d)

    @property
    def level0_bounds(self) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) in level-0 pixels."""
        d = self.downsample
        return (self.x * d, self.y * d, (self.x + self.width) * d, (self.y + self.height) * d)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)


def grid_size(width0: int, height0: int, downsample: float) -> tuple[int, int]:
    """Size (width, height) of a level-0 image on a grid of the given downsample (partial pixels kept)."""
    return max(1, math.ceil(width0 / downsample - 1e-9)), max(1, math.ceil(height0 / downsample - 1e-9))


def iter_windows(
    width: int, height: int, tile: int, overlap: int = 0, downsample: float = 1.0
) -> Iterator[Window]:
    """Tiles of at most ``tile`` px covering a ``width`` × ``height`` grid, with ``overlap`` px shared."""
    if tile <= overlap:
        raise ValueError(f"tile size {tile} must exceed the overlap {overlap}")
    step = tile - overlap
    for y in range(0, max(1, height - overlap), step):
        for x in range(0, max(1, width - overlap), step):
            yield Window(x, y, min(tile, width - x), min(tile, height - y), downsample)
