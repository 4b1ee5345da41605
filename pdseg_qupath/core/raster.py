"""Annotations ↔ label maps on a grid :class:`~pdseg_qupath.core.grid.Window` (rasterio/GDAL does the pixels).

Rasterizing follows the pixel-centre rule; larger annotations are painted first so that smaller ones drawn
inside them win, and holes keep whatever lay below. Vectorizing is the exact inverse when nothing is
simplified: ``rasterize(vectorize(labels)) == labels``.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np
import rasterio.features
import shapely
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry

from pdseg_qupath.core.annotations import IGNORE, Annotation, ClassMap
from pdseg_qupath.core.geometry import polygonal_part
from pdseg_qupath.core.grid import Window

UNCLASSIFIED = "(unclassified)"
"""Key under which :attr:`AnnotationIndex.skipped_unknown` counts annotations without a class."""

CLIP_MIN_VERTICES = 256
"""Geometries with more vertices than this are clipped to the window before rasterizing: GDAL's fill
visits every edge on every row, so a huge tissue outline would otherwise cost the same in every tile."""


class AnnotationIndex:
    """Annotations ready to rasterize window after window: labels resolved, paint order fixed, STRtree built.

    Build it once per image; :meth:`rasterize` then touches only the annotations that meet a window.
    ``skipped_unknown`` counts annotations whose class is not in the map (key :data:`UNCLASSIFIED` for
    none) and ``skipped_no_area`` points/lines, so callers can tell the user what was left out.
    """

    def __init__(self, annotations: Iterable[Annotation], class_map: ClassMap) -> None:
        self.class_map = class_map
        self.skipped_unknown: Counter[str] = Counter()
        self.skipped_no_area = 0
        geoms: list[BaseGeometry] = []
        values: list[int] = []
        for a in annotations:
            label = class_map.index(a.classification)
            if label is None:
                self.skipped_unknown[a.classification or UNCLASSIFIED] += 1
                continue
            g = polygonal_part(a.geometry)
            if g is None:
                self.skipped_no_area += 1
                continue
            geoms.append(g)
            values.append(label)
        areas = shapely.area(np.array(geoms, dtype=object)) if geoms else np.zeros(0)
        order = np.argsort(-areas, kind="stable")  # larger first; ties keep input order
        self.geometries = np.array(geoms, dtype=object)[order] if geoms else np.array([], dtype=object)
        self.labels = np.array(values, dtype=np.uint8)[order]
        self._ncoords = shapely.get_num_coordinates(self.geometries) if geoms else np.zeros(0, int)
        self._bounds = shapely.bounds(self.geometries) if geoms else np.zeros((0, 4))
        self._tree = shapely.STRtree(self.geometries)

    def __len__(self) -> int:
        return len(self.geometries)

    def query(self, window: Window) -> np.ndarray:
        """Indices (in paint order) of annotations whose bounding boxes meet the window."""
        if not len(self):
            return np.zeros(0, dtype=np.intp)
        return np.sort(self._tree.query(box(*window.level0_bounds)))

    def intersects(self, window: Window) -> bool:
        """Whether any annotation geometry (not just its bounding box) meets the window."""
        if not len(self):
            return False
        return bool(len(self._tree.query(box(*window.level0_bounds), predicate="intersects")))

    def rasterize(self, window: Window) -> np.ndarray:
        """uint8 labels of ``window``: class index, or :data:`IGNORE` where unannotated or ``Ignore*``."""
        idx = self.query(window)
        if not len(idx):
            return np.full(window.shape, IGNORE, dtype=np.uint8)
        x0, y0, x1, y1 = window.level0_bounds
        m = window.downsample  # a grid pixel of margin: clipping never moves a pixel centre's inside test
        cx0, cy0, cx1, cy1 = x0 - m, y0 - m, x1 + m, y1 + m
        geoms = self.geometries[idx]
        b = self._bounds[idx]
        big = (self._ncoords[idx] > CLIP_MIN_VERTICES) & (
            (b[:, 0] < cx0) | (b[:, 1] < cy0) | (b[:, 2] > cx1) | (b[:, 3] > cy1)
        )
        if big.any():
            geoms = geoms.copy()
            clip = box(cx0, cy0, cx1, cy1)
            for i in np.flatnonzero(big):
                try:
                    geoms[i] = polygonal_part(shapely.intersection(geoms[i], clip))
                except shapely.errors.GEOSException:  # invalid input: GDAL's even-odd fill copes unclipped
                    pass
        shapes = [(g, int(v)) for g, v in zip(geoms, self.labels[idx]) if g is not None and not g.is_empty]
        if not shapes:
            return np.full(window.shape, IGNORE, dtype=np.uint8)
        return rasterio.features.rasterize(
            shapes,
            out_shape=window.shape,
            fill=IGNORE,
            transform=window.transform,
            all_touched=False,
            dtype="uint8",
        )


def _polygon_from_geojson(g: dict) -> Polygon:
    rings = g["coordinates"]
    return Polygon(rings[0], rings[1:])


def polygons(values: np.ndarray, window: Window, mask: np.ndarray) -> dict[int, BaseGeometry]:
    """One (Multi)Polygon per value, of the 4-connected regions where ``mask`` is set, in level-0 px.

    Pixels touching only at a corner are separate parts. This is the one vectorizer: class maps go
    through :func:`vectorize`, per-object maps (each region its own value) through prediction.
    """
    parts: dict[int, list[Polygon]] = {}
    for geom, value in rasterio.features.shapes(values, mask=mask, connectivity=4, transform=window.transform):
        parts.setdefault(int(value), []).append(_polygon_from_geojson(geom))
    return {v: _union(p) for v, p in parts.items()}


def vectorize(
    labels: np.ndarray,
    class_map: ClassMap,
    window: Window,
    *,
    simplify: float = 0.0,
    min_area_um2: float = 0.0,
    mpp: float | None = None,
) -> dict[str, BaseGeometry]:
    """One (Multi)Polygon per class present in ``labels``, in level-0 pixel coordinates.

    Regions are 4-connected (pixels touching only at a corner are separate parts); :data:`IGNORE` and
    indices outside the class map are not vectorized. ``simplify`` is a tolerance in level-0 px
    (topology-preserving within a class); ``min_area_um2`` drops parts smaller than that area (needs ``mpp``,
    the level-0 µm/px).
    """
    if labels.shape != window.shape:
        raise ValueError(f"labels of shape {labels.shape} do not match the window {window.shape}")
    if min_area_um2 > 0 and not mpp:
        raise ValueError("min_area_um2 needs mpp (level-0 µm/px) to convert the area to pixels")
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    valid = labels < len(class_map)
    if not valid.any():
        return {}
    by_class = polygons(labels, window, valid)
    min_px = min_area_um2 / (mpp * mpp) if min_area_um2 > 0 and mpp else 0.0
    out: dict[str, BaseGeometry] = {}
    for k in sorted(by_class):
        geom = by_class[k]
        if simplify > 0:
            geom = shapely.simplify(geom, simplify, preserve_topology=True)
        if min_px > 0:
            kept = [p for p in shapely.get_parts(geom) if p.area >= min_px]
            geom = kept[0] if len(kept) == 1 else MultiPolygon(kept)
        if not geom.is_empty:
            out[class_map.classes[k].name] = geom
    return out


def _union(polys: list[Polygon]) -> BaseGeometry:
    """Union of the 4-connected regions of one class.

    Regions of one class never share an edge (they would be one region) and never overlap, so as a
    MultiPolygon they are already their union; only if a region's own ring pinches (GDAL can emit rings that
    touch themselves at a corner) is a real union needed. They form a coverage, so the fast coverage
    union applies.
    """
    if len(polys) == 1 and polys[0].is_valid:
        return polys[0]
    geom = MultiPolygon(polys)
    if geom.is_valid:
        return geom
    try:
        geom = shapely.coverage_union_all(np.array(polys, dtype=object))
    except shapely.errors.GEOSException:
        geom = shapely.union_all(np.array(polys, dtype=object))
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    return geom
