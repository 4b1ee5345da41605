"""Area geometry: the one place where shapes are reduced to their polygons and invalid ones repaired.

Every reader (QuPath GeoJSON, a QuPath project) and the rasterizer go through :func:`clean_geometry` or
:func:`polygonal_part`, so an annotation means the same area whichever way it came in.
"""

from __future__ import annotations

import numpy as np
import shapely
from shapely.errors import GEOSException
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

MAX_CROSSINGS = 500
"""Self-crossings above which an invalid polygon is not repaired: ``make_valid`` splits a polygon into
pieces whose number grows with its crossings (a 400-vertex scribble has ~40,000 and took minutes), so
repair is bounded and a polygon past the bound is skipped and reported instead."""


class TooTangled(ValueError):
    """An invalid polygon whose repair would cost more than :data:`MAX_CROSSINGS` allows."""


def polygonal_part(geom: BaseGeometry | None) -> Polygon | MultiPolygon | None:
    """The area of a geometry as a (Multi)Polygon, or None if it has none.

    A Polygon or MultiPolygon is returned as it is. From a collection (e.g. what ``make_valid`` leaves)
    only the polygons with area are kept; several are merged so that the result stays valid.
    """
    if geom is None or geom.is_empty:
        return None
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom if geom.area > 0 else None
    polys: list[Polygon] = []
    stack = [geom]
    while stack:
        g = stack.pop()
        if isinstance(g, Polygon):
            if not g.is_empty and g.area > 0:
                polys.append(g)
        elif hasattr(g, "geoms"):
            stack.extend(g.geoms)
    if not polys:
        return None
    if len(polys) == 1:
        return polys[0]
    merged = shapely.union_all(polys)
    return merged if isinstance(merged, (Polygon, MultiPolygon)) and not merged.is_empty else None


def self_crossings(geom: BaseGeometry, limit: int = MAX_CROSSINGS) -> int:
    """How often the edges of a geometry's rings cross each other, counted up to ``limit + 1`` only.

    Edges are queried against an R-tree in small, growing batches, so the work stays near ``limit`` crossings
    however tangled the rings are (a full noding of a scribble would cost what the repair costs).
    """
    rings = [g for g in shapely.get_parts(shapely.get_rings(shapely.get_parts(geom)))]
    segs = []
    for r in rings:
        xy = shapely.get_coordinates(r)
        if len(xy) > 1:
            segs.append(np.stack([xy[:-1], xy[1:]], axis=1))
    if not segs:
        return 0
    edges = shapely.linestrings(np.concatenate(segs))
    tree = shapely.STRtree(edges)
    found, start, batch = 0, 0, 1
    while start < len(edges) and found <= limit:
        idx = np.arange(start, min(start + batch, len(edges)))
        pairs = tree.query(edges[idx], predicate="crosses")
        found += int((idx[pairs[0]] < pairs[1]).sum())  # each crossing once
        start += len(idx)
        batch = min(batch * 2, 4096) if found * 4 < limit else batch
    return found


def repair(geom: BaseGeometry) -> Polygon | MultiPolygon | None:
    """The area of an invalid geometry after ``make_valid``, or None if nothing with area is left.

    Raises :class:`TooTangled` when the rings cross each other more than :data:`MAX_CROSSINGS` times, and
    for what GEOS cannot compute (e.g. subnormal coordinates): such a polygon is skipped and reported.
    """
    try:
        if self_crossings(geom) > MAX_CROSSINGS:
            raise TooTangled(f"its outline crosses itself more than {MAX_CROSSINGS} times, too tangled to "
                             "repair in bounded time; redraw or simplify it")
        # Magnitudes far below a pixel (1e-44...) make GEOS fail; they are 0 on any pixel grid.
        geom = shapely.transform(geom, lambda xy: np.where(np.abs(xy) < 1e-9, 0.0, xy))
        return polygonal_part(shapely.make_valid(geom))
    except GEOSException as e:
        raise TooTangled(f"the geometry library cannot repair it ({e})") from None


def clean_geometry(geom: BaseGeometry | None) -> tuple[BaseGeometry | None, str]:
    """An area geometry ready for rasterizing, and what was done: ``ok``, ``repaired``, or why it was
    dropped: ``point``, ``line``, ``empty`` (nothing with area, also after repair) or ``other``.
    """
    if geom is None or geom.is_empty:
        return None, "empty"
    kind = geom.geom_type
    if kind in ("Point", "MultiPoint"):
        return None, "point"
    if kind in ("LineString", "MultiLineString", "LinearRing"):
        return None, "line"
    if kind not in ("Polygon", "MultiPolygon", "GeometryCollection"):
        return None, "other"
    if geom.is_valid:
        area = polygonal_part(geom)
        return (area, "ok") if area is not None else (None, "empty")
    try:
        fixed = repair(geom)
    except TooTangled:
        return None, "other"
    return (fixed, "repaired") if fixed is not None else (None, "empty")
