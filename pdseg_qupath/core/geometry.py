"""Area geometry: the one place where shapes are reduced to their polygons and invalid ones repaired.

Every reader (QuPath GeoJSON, a QuPath project) and the rasterizer go through :func:`clean_geometry` or
:func:`polygonal_part`, so an annotation means the same area whichever way it came in.
"""

from __future__ import annotations

import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry


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


def repair(geom: BaseGeometry) -> Polygon | MultiPolygon | None:
    """The area of an invalid geometry after ``make_valid``, or None if nothing with area is left."""
    return polygonal_part(shapely.make_valid(geom))


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
    fixed = repair(geom)
    return (fixed, "repaired") if fixed is not None else (None, "empty")
