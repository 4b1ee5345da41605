"""Seamless stitching of overlapping tile logits, one strip of tile rows at a time.

Tiles overlap by ``overlap`` px. Each tile's logits are weighted by a separable raised-cosine window
that falls towards the tile's edges, where a convolutional backbone sees padding instead of tissue, and
the weighted sum is divided by the summed weights. In the interior the windows of neighbouring tiles
add up to exactly 1 (sin² + cos²), so there are no seams and the result hardly depends on where the tile
grid starts.

Memory is bounded by one row of tiles: the accumulator holds ``n_classes × tile × width`` floats.
When the next tile row starts, the rows above it can receive no more tiles; they are normalised, turned
into labels and probabilities, and handed out as a :class:`Strip`. No whole-slide float array exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pdseg_qupath.core.annotations import IGNORE


def blend_weights_1d(tile: int, overlap: int) -> np.ndarray:
    """Raised-cosine ramps of ``overlap`` px at both ends, 1 in between; always > 0."""
    w = np.ones(tile, dtype=np.float64)
    if overlap > 0:
        i = np.arange(min(overlap, tile))
        ramp = np.sin(0.5 * math.pi * (i + 0.5) / overlap) ** 2
        w[: len(ramp)] *= ramp
        w[tile - len(ramp):] *= ramp[::-1]
    return w.astype(np.float32)


def blend_weights(tile: int, overlap: int) -> np.ndarray:
    """The (tile, tile) blending window: outer product of :func:`blend_weights_1d`."""
    w = blend_weights_1d(tile, overlap)
    return np.outer(w, w)


def tile_starts(length: int, tile: int, step: int, offset: int = 0) -> list[int]:
    """Tile origins along one axis: from ``-offset`` in steps of ``step`` until ``length`` is covered."""
    starts = [-(offset % step)]
    while starts[-1] + tile < length:
        starts.append(starts[-1] + step)
    return starts


@dataclass
class Strip:
    """Final rows ``[y, y + labels.shape[0])`` of the region: labels (uint8, 255 = no prediction), the
    softmax probability of each pixel's label (float32, 0 where there is none) and the margin between
    the two most probable classes (float32, 1 = certain, 0 = a tie; 1 where there is no prediction)."""

    y: int
    labels: np.ndarray
    prob: np.ndarray
    margin: np.ndarray | None = None

    @property
    def height(self) -> int:
        return int(self.labels.shape[0])


class StripStitcher:
    """Blend tiles row by row over a ``width`` × ``height`` region (coordinates relative to it).

    Call :meth:`add` for the tiles of :attr:`row_ys` ``[j]`` (any subset; missing tiles leave no
    prediction), then :meth:`finish_row`, which returns the rows that are now final.
    """

    def __init__(
        self,
        width: int,
        height: int,
        n_classes: int,
        tile: int,
        overlap: int,
        offset: tuple[int, int] = (0, 0),
    ) -> None:
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap {overlap} must be in [0, tile size {tile})")
        self.width, self.height, self.n_classes = width, height, n_classes
        self.tile, self.overlap, self.step = tile, overlap, tile - overlap
        self.col_xs = tile_starts(width, tile, self.step, offset[0])
        self.row_ys = tile_starts(height, tile, self.step, offset[1])
        self.window = blend_weights(tile, overlap)
        self._acc = np.zeros((n_classes, tile, width), dtype=np.float32)
        self._wsum = np.zeros((tile, width), dtype=np.float32)
        self._row = 0
        self._done = max(0, self.row_ys[0])  # rows of the region already handed out

    @property
    def n_tiles(self) -> int:
        return len(self.col_xs) * len(self.row_ys)

    @property
    def buffer_bytes(self) -> int:
        return self._acc.nbytes + self._wsum.nbytes

    def add(self, x: int, y: int, logits: np.ndarray) -> None:
        """Accumulate one tile's logits (n_classes, tile, tile) with its top-left at region (x, y)."""
        if y != self.row_ys[self._row]:
            raise ValueError(f"tile at y={y} does not belong to the current tile row y={self.row_ys[self._row]}")
        if logits.shape != (self.n_classes, self.tile, self.tile):
            raise ValueError(f"logits shape {logits.shape} != {(self.n_classes, self.tile, self.tile)}")
        x0, x1 = max(0, x), min(self.width, x + self.tile)
        if x1 <= x0:
            return
        cols = slice(x0 - x, x1 - x)
        w = self.window[:, cols]
        self._acc[:, :, x0:x1] += logits[:, :, cols] * w
        self._wsum[:, x0:x1] += w

    def finish_row(self) -> Strip | None:
        """Close the current tile row; return the region rows no later tile can touch (or None)."""
        y = self.row_ys[self._row]
        last = self._row == len(self.row_ys) - 1
        end = self.height if last else min(self.height, self.row_ys[self._row + 1])
        start = self._done
        strip = None
        if end > start:
            a, b = start - y, end - y
            strip = _finalize(self._acc[:, a:b], self._wsum[a:b], start)
            self._done = end
        if not last:
            shift = self.step
            self._acc[:, :-shift] = self._acc[:, shift:]
            self._acc[:, -shift:] = 0
            self._wsum[:-shift] = self._wsum[shift:]
            self._wsum[-shift:] = 0
            self._row += 1
        return strip


def _finalize(acc: np.ndarray, wsum: np.ndarray, y: int) -> Strip:
    covered = wsum > 0
    logits = acc / np.where(covered, wsum, 1.0)
    m = logits.max(axis=0)
    e = np.exp(logits - m)
    total = e.sum(axis=0)
    prob = 1.0 / total  # softmax probability of the arg-max class
    second = np.partition(e, -2, axis=0)[-2] if e.shape[0] > 1 else np.zeros_like(total)
    margin = np.where(covered, prob - second / total, 1.0).astype(np.float32)
    labels = logits.argmax(axis=0).astype(np.uint8)
    labels[~covered] = IGNORE
    prob = np.where(covered, prob, 0.0).astype(np.float32)
    return Strip(y, labels, prob, margin)
