"""Tissue detection: where on a slide there is tissue rather than glass, and queries of that mask.

H&E tissue is coloured while glass is white or grey, so a threshold on the HSV saturation of a
thumbnail separates them: Otsu's, kept inside a narrow range so that pale tissue (loose collagen,
necrosis, thinly stained sections) stays tissue. :class:`TissueMap` holds the mask with a summed-area
table, so that "is there tissue in this tile" and "how much" cost four look-ups whatever the tile size.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

TISSUE_SATURATION_RANGE = (12, 20)
"""Otsu's threshold is clamped to this saturation range (0-255). White-balanced glass sits below ~10 after
smoothing; pale tissue starts around 15-30 (pale dermal collagen on CMU-1; pale necrosis and perinecrotic
tissue on low-magnification glioblastoma sections, a tenth of whose necrosis lies below 17). Without the clamp, a
thumbnail with no glass (a cropped region, a tissue-filled field) would be split into dense versus pale
tissue, and one with no tissue into noise versus noise. (Until the eighth session of 2026-12-07 the range
was (20, 60), which left out a third of the annotated tissue of the IvyGAP sections and much of CMU-1's
dermis: docs/LOOP.md, "Tissue first".)"""

SATURATION_SMOOTHING = 1.0
"""Gaussian σ, in mask pixels, applied to the saturation before the threshold: a pale tissue's pixels
scatter around the threshold, and the opening would otherwise turn it into lace."""


def _otsu(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the cut maximising the between-class variance."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 / total - m0) ** 2 / (w0 * w1 / total)
    between = np.nan_to_num(between, nan=0.0, posinf=0.0)
    return int(np.argmax(between))


def tissue_mask(slide: Any, mpp: float = 8.0) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of a slide on a coarse grid (``mpp`` µm/px), and its downsample from level 0.

    HSV saturation smoothed by :data:`SATURATION_SMOOTHING`, then Otsu's threshold clamped to
    :data:`TISSUE_SATURATION_RANGE`; a 3×3 opening then closing removes specks and closes small gaps.
    """
    d = mpp / slide.mpp
    rgb = slide.thumbnail(mpp)
    sat = np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1].astype(np.float32)
    sat = np.rint(ndimage.gaussian_filter(sat, SATURATION_SMOOTHING)).astype(np.uint8)
    lo, hi = TISSUE_SATURATION_RANGE
    thr = min(max(_otsu(sat), lo), hi)
    mask = Image.fromarray(((sat > thr) * 255).astype(np.uint8))
    mask = mask.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(3))  # opening
    mask = mask.filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.MinFilter(3))  # closing
    return np.asarray(mask) > 127, d


def default_mask_mpp(slide: Any) -> float:
    """A tissue-mask resolution with ~2048 px on the slide's long side, and at least 2 µm/px (small
    images get a detailed outline, whole slides a cheap thumbnail)."""
    return max(2.0, max(slide.width, slide.height) * slide.mpp / 2048)


class TissueMap:
    """A slide's tissue mask, queried in the pixels of a work grid ``downsample`` level-0 px per pixel.

    ``mask`` is on a grid of ``mask_downsample`` level-0 px per pixel. ``dilate`` grows it by that many
    mask pixels, so that tissue at the very edge of the mask is not cut off.
    """

    def __init__(self, mask: np.ndarray, mask_downsample: float, downsample: float, dilate: int = 0) -> None:
        if dilate:
            mask = ndimage.binary_dilation(mask, iterations=dilate)
        self.mask = np.asarray(mask, dtype=bool)
        self.downsample, self.mask_downsample = downsample, mask_downsample
        self.scale = mask_downsample / downsample  # work-grid px per mask px
        self._integral = np.pad(self.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        self._soft = self.mask.astype(np.float32)

    @classmethod
    def detect(cls, slide: Any, downsample: float, mask_mpp: float | None = None, dilate: int = 0) -> "TissueMap":
        """Detect tissue on a thumbnail of ``slide`` at ``mask_mpp`` (default :func:`default_mask_mpp`)."""
        mask, md = tissue_mask(slide, mask_mpp or default_mask_mpp(slide))
        return cls(mask, md, downsample, dilate)

    @property
    def fraction(self) -> float:
        """Share of the mask that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def area_px(self) -> float:
        """Tissue area in work-grid pixels."""
        return float(self.mask.sum()) * self.scale**2

    def _cells(self, x: int, y: int, size: int) -> tuple[int, int, int, int]:
        mh, mw = self.mask.shape
        d, md = self.downsample, self.mask_downsample
        x0 = min(mw, max(0, int(math.floor(x * d / md))))
        y0 = min(mh, max(0, int(math.floor(y * d / md))))
        x1 = min(mw, max(0, int(math.ceil((x + size) * d / md))))
        y1 = min(mh, max(0, int(math.ceil((y + size) * d / md))))
        return x0, y0, x1, y1

    def _count(self, x0: int, y0: int, x1: int, y1: int) -> int:
        ii = self._integral
        return int(ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0])

    def any_in(self, x: int, y: int, size: int) -> bool:
        """Whether the ``size``-px square at work-grid ``(x, y)`` meets any tissue."""
        x0, y0, x1, y1 = self._cells(x, y, size)
        return x1 > x0 and y1 > y0 and self._count(x0, y0, x1, y1) > 0

    def fraction_in(self, x: int, y: int, size: int) -> float:
        """Share of the mask pixels under the ``size``-px square at work-grid ``(x, y)`` that are tissue."""
        x0, y0, x1, y1 = self._cells(x, y, size)
        x1, y1 = max(x1, min(self.mask.shape[1], x0 + 1)), max(y1, min(self.mask.shape[0], y0 + 1))
        if x1 <= x0 or y1 <= y0:
            return 0.0
        return self._count(x0, y0, x1, y1) / ((x1 - x0) * (y1 - y0))

    def pixels(self, y: int, height: int, x: int, width: int) -> np.ndarray:
        """Boolean tissue mask of work-grid rows ``[y, y+height)`` and columns ``[x, x+width)``.

        The mask is interpolated bilinearly (threshold 0.5), so the outline is smooth at the work
        resolution instead of blocky at the mask's.
        """
        d, md = self.downsample, self.mask_downsample
        rows = (np.arange(y, y + height) + 0.5) * d / md - 0.5
        cols = (np.arange(x, x + width) + 0.5) * d / md - 0.5
        rr, cc = np.meshgrid(rows.astype(np.float32), cols.astype(np.float32), indexing="ij")
        return ndimage.map_coordinates(self._soft, [rr, cc], order=1, mode="nearest") >= 0.5
