"""Review regions: where the model is least sure, so the pathologist corrects there first (active learning).

Uncertainty is ``1 - margin``: one minus the gap between the two most probable classes of the blended
probabilities (0 = certain, 1 = a tie). It is averaged over the predicted (tissue) pixels of square cells:
small cells make the uncertainty map (QuPath detections with a ``pdseg: uncertainty`` measurement, for
*Measure › Show measurement maps*; at most :data:`MAX_MAP_CELLS` of them, coarser on a whole slide),
blocks of 4 × 4 of them the review regions (``Review*`` annotations,
ranked, with their score). A region needs predicted pixels on at least a quarter of its area.
"""

from __future__ import annotations

import math

import numpy as np
import shapely

from pdseg_qupath.core.annotations import IGNORE, PDSEG_MARKER, Annotation
from pdseg_qupath.core.grid import Window
from pdseg_qupath.learn.stitch import Strip

REVIEW_CLASS = "Review*"
"""QuPath ignores classes ending in ``*``; so does pdseg (label 255): a review region is never a label."""
REVIEW_COLOR = (255, 140, 0)
UNCERTAINTY = "pdseg: uncertainty"
RANK = "pdseg: review rank"
MAP_BLOCK = 4
"""A review region is MAP_BLOCK × MAP_BLOCK cells of the uncertainty map."""
MIN_SHARE = 0.25
MAX_MAP_CELLS = 20_000
"""At most this many map detections per image: on a whole slide the map cells grow (whole blocks of cells)."""


class ReviewGrid:
    """Sums of uncertainty and counts of predicted pixels per map cell of a region of the work grid."""

    def __init__(self, region: Window, region_px: int, class_weights: np.ndarray | None = None) -> None:
        """``class_weights`` (one per class, optional) scales each pixel's uncertainty by its predicted class."""
        self.region = region
        self.class_weights = None if class_weights is None else np.append(np.asarray(class_weights, np.float64), 0.0)
        self.cell = max(1, region_px // MAP_BLOCK)
        self.nx = max(1, math.ceil(region.width / self.cell))
        self.ny = max(1, math.ceil(region.height / self.cell))
        self.sum = np.zeros((self.ny, self.nx), dtype=np.float64)
        self.count = np.zeros((self.ny, self.nx), dtype=np.float64)
        self._cols = np.arange(region.width) // self.cell

    def add(self, strip: Strip) -> None:
        """Take a strip (rows relative to the region); pixels without a prediction do not count."""
        valid = strip.labels != IGNORE
        margin = strip.margin if strip.margin is not None else np.ones(strip.labels.shape, np.float32)
        weight = (1.0 - margin) * valid
        if self.class_weights is not None:
            weight = weight * self.class_weights[np.minimum(strip.labels, len(self.class_weights) - 1)]
        rows = (strip.y + np.arange(strip.height)) // self.cell
        idx = (rows[:, None] * self.nx + self._cols[None, :]).ravel()
        n = self.nx * self.ny
        self.sum += np.bincount(idx, weights=weight.ravel(), minlength=n).reshape(self.ny, self.nx)
        self.count += np.bincount(idx, weights=valid.ravel().astype(np.float64), minlength=n).reshape(self.ny, self.nx)

    def _box(self, cx: int, cy: int, cells: int, bounds: tuple[int, int]) -> shapely.Polygon:
        d, c = self.region.downsample, self.cell
        x0, y0 = (self.region.x + cx * c) * d, (self.region.y + cy * c) * d
        x1 = min((self.region.x + min((cx + cells) * c, self.region.width)) * d, bounds[0])
        y1 = min((self.region.y + min((cy + cells) * c, self.region.height)) * d, bounds[1])
        return shapely.box(x0, y0, x1, y1)

    def _blocks(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Sums and counts over blocks of b × b cells."""
        ny, nx = math.ceil(self.ny / b), math.ceil(self.nx / b)
        s = np.zeros((ny * b, nx * b))
        c = np.zeros((ny * b, nx * b))
        s[: self.ny, : self.nx], c[: self.ny, : self.nx] = self.sum, self.count
        return s.reshape(ny, b, nx, b).sum(axis=(1, 3)), c.reshape(ny, b, nx, b).sum(axis=(1, 3))

    def regions(self) -> list[tuple[float, int, int]]:
        """(mean uncertainty, block x, block y) of every review region with enough predicted pixels, worst first."""
        b = MAP_BLOCK
        s, c = self._blocks(b)
        ny, nx = s.shape
        full = float((self.cell * b) ** 2)
        out = [(float(s[j, i] / c[j, i]), i, j) for j in range(ny) for i in range(nx)
               if c[j, i] >= MIN_SHARE * full]
        out.sort(key=lambda t: (-t[0], t[2], t[1]))
        return out

    def objects(self, n: int, model_id: str, bounds: tuple[int, int]) -> list[Annotation]:
        """The ``n`` least certain regions as ranked ``Review*`` annotations, then the uncertainty map as
        detections (one per map cell with predicted pixels), all in level-0 coordinates within ``bounds``."""
        tag = f"[{model_id[:8]}]"
        out = []
        for rank, (score, i, j) in enumerate(self.regions()[:n], start=1):
            out.append(Annotation(
                geometry=self._box(i * MAP_BLOCK, j * MAP_BLOCK, MAP_BLOCK, bounds), classification=REVIEW_CLASS,
                color=REVIEW_COLOR, name=f"{PDSEG_MARKER} review {rank:03d} {tag}",
                measurements={UNCERTAINTY: round(score, 4), RANK: float(rank)},
                metadata={"pdseg_model": model_id}))
        f = max(1, math.ceil(math.sqrt(np.count_nonzero(self.count) / MAX_MAP_CELLS)))
        s, c = self._blocks(f)
        ys, xs = np.nonzero(c > 0)
        for j, i in zip(ys.tolist(), xs.tolist()):
            out.append(Annotation(
                geometry=self._box(i * f, j * f, f, bounds), name=f"{PDSEG_MARKER} uncertainty {tag}",
                object_type="detection", measurements={UNCERTAINTY: round(float(s[j, i] / c[j, i]), 4)},
                metadata={"pdseg_model": model_id}))
        return out
