"""QuPath's GeoJSON, read leniently (every form QuPath itself reads) and written the way QuPath writes it.

Reading never loses data silently: whatever is repaired or skipped is counted in a :class:`ReadReport`
with a message that names the file and the object. Only a file that is not JSON, or not GeoJSON at all,
raises :class:`PdsegError`; a bad feature is skipped and reported, the rest of the file goes on.

All object types are returned (``object_type`` is kept: annotation, detection, cell, tile, tmaCore);
training uses annotation objects only, so callers filter (the source adapters do).
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

import geojson
import numpy as np
import shapely
from shapely.errors import GEOSException
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry
from shapely.validation import explain_validity

from pdseg_qupath.core.annotations import RGB, Annotation, ReadReport, default_color
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.fileio import atomic_write_text
from pdseg_qupath.core.geometry import TooTangled, repair

__all__ = [
    "read_geojson",
    "load_json",
    "parse_geojson",
    "write_geojson",
    "annotation_to_feature",
    "to_feature_collection",
    "raw_features",
    "dump_feature_collection",
]

# QuPath's object-type names, including the v0.2 class names (once stored in "id") and "tma_core".
_OBJECT_TYPES: dict[str, str] = {
    "annotation": "annotation",
    "PathAnnotationObject": "annotation",
    "unknown": "annotation",
    "detection": "detection",
    "PathDetectionObject": "detection",
    "cell": "cell",
    "PathCellObject": "cell",
    "tile": "tile",
    "PathTileObject": "tile",
    "tmaCore": "tmaCore",
    "tma_core": "tmaCore",
    "TMACoreObject": "tmaCore",
    "root": "root",
    "PathRootObject": "root",
}
_LEGACY_TYPE_IDS = {k for k in _OBJECT_TYPES if k.startswith(("Path", "TMA"))}
_GEOMETRY_TYPES = {
    "Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon", "GeometryCollection"
}
MAX_COORDINATE = 1e9
"""Coordinates are level-0 pixels: beyond a billion no slide exists, and geometry maths loses precision."""
# Nesting depth of "coordinates" for each geometry type (a position is depth 1).
_COORD_DEPTH = {"Point": 1, "MultiPoint": 2, "LineString": 2, "MultiLineString": 3, "Polygon": 3, "MultiPolygon": 4}
_FIX_HINT = "Fix the file, or export it again from QuPath (File > Export objects as GeoJSON)."


# ----------------------------------------------------------------------------------------------- reading


def read_geojson(path: Path) -> tuple[list[Annotation], ReadReport]:
    """Read a QuPath GeoJSON file; a file that is not JSON/GeoJSON raises :class:`PdsegError`."""
    return parse_geojson(load_json(path), str(path))


def load_json(path: Path) -> Any:
    """The file's JSON; errors name the file and, for syntax errors, the line and column."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PdsegError(f"{path}: file not found") from None
    except OSError as e:
        raise PdsegError(f"{path}: cannot read the file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PdsegError(
            f"{path}: not UTF-8 text (bad byte at offset {e.start}); expected a QuPath GeoJSON file. {_FIX_HINT}"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PdsegError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}. {_FIX_HINT}") from None
    except ValueError as e:  # e.g. an integer longer than Python converts (4300 digits)
        raise PdsegError(f"{path}: unreadable JSON ({e}). {_FIX_HINT}") from None
    except RecursionError:
        raise PdsegError(f"{path}: JSON nested too deeply to be GeoJSON. {_FIX_HINT}") from None


def raw_features(data: object, source: str) -> list[Any]:
    """The feature list of any container QuPath reads: FeatureCollection, bare array, or single Feature."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        kind = data.get("type")
        if kind is not None and not isinstance(kind, str):
            raise PdsegError(f"{source}: the top-level \"type\" is {type(kind).__name__}, not a name such as "
                             f"\"FeatureCollection\". {_FIX_HINT}")
        if kind == "FeatureCollection" or (kind is None and "features" in data):
            features = data.get("features")
            if not isinstance(features, list):
                raise PdsegError(f"{source}: the FeatureCollection's 'features' is not a list. {_FIX_HINT}")
            return features
        if kind == "Feature" or (kind is None and "geometry" in data):
            return [data]
        if kind in _GEOMETRY_TYPES:
            raise PdsegError(
                f"{source}: holds a bare {kind} geometry, not a Feature, so it has no class. Wrap it as "
                '{"type": "Feature", "geometry": ..., "properties": {"objectType": "annotation", '
                '"classification": {"name": ...}}} or export the objects from QuPath.'
            )
    raise PdsegError(
        f"{source}: not GeoJSON (expected a FeatureCollection, an array of Features or a Feature). {_FIX_HINT}"
    )


def parse_geojson(data: object, source: str) -> tuple[list[Annotation], ReadReport]:
    """Objects from already-parsed GeoJSON; ``source`` names the file in every message."""
    report = ReadReport(source=source)
    out: list[Annotation] = []
    for i, feature in enumerate(raw_features(data, source)):
        _read_feature(feature, f"feature {i + 1}", out, report)
    return out, report


def _read_feature(feature: Any, where: str, out: list[Annotation], report: ReadReport) -> None:
    src = report.source
    if not isinstance(feature, dict):
        report.skipped_other += 1
        report.messages.append(f"{src}: {where} skipped: not a JSON object but {type(feature).__name__}")
        return
    props = feature.get("properties")
    if props is None:
        props = {}
    elif not isinstance(props, dict):
        report.messages.append(f"{src}: {where}: 'properties' is not an object; ignored")
        props = {}

    raw_id = feature.get("id")
    name = _text(props.get("name"))
    label = _label(src, where, raw_id, name)
    object_type = _object_type(props, raw_id, label, report)

    if object_type != "root":  # a hierarchy export's root holds only children
        raw_geometry = feature.get("geometry")
        if raw_geometry is None:
            report.skipped_other += 1
            report.messages.append(f"{label} skipped: it has no geometry")
        else:
            geometry = _area(raw_geometry, label, report)
            if geometry is not None:
                out.append(_annotation(geometry, props, raw_id, name, object_type, label, report))
                report.read += 1

    children = props.get("childObjects", props.get("children", feature.get("childObjects")))
    if children is not None:
        if not isinstance(children, list):
            report.messages.append(f"{label}: 'childObjects' is not a list; ignored")
            return
        for j, child in enumerate(children):
            _read_feature(child, f"{where}.{j + 1}", out, report)


def _label(src: str, where: str, raw_id: Any, name: str | None) -> str:
    bits = [f"id {raw_id}"] if isinstance(raw_id, (str, int)) and raw_id != "" else []
    if name:
        bits.append(f'name "{name}"')
    return f"{src}: {where}" + (f" ({', '.join(bits)})" if bits else "")


def _object_type(props: dict, raw_id: Any, label: str, report: ReadReport) -> str:
    raw = next((props[k] for k in ("objectType", "object_type", "type") if k in props), None)
    if raw is None and isinstance(raw_id, str) and raw_id in _LEGACY_TYPE_IDS:
        raw = raw_id
    if raw is None:
        return "annotation"
    kind = _OBJECT_TYPES.get(str(raw))
    if kind is None:  # QuPath does the same: an unknown type becomes an annotation
        report.messages.append(f"{label}: unknown object type {raw!r}, read as an annotation")
        return "annotation"
    return kind


def _annotation(
    geometry: BaseGeometry,
    props: dict,
    raw_id: Any,
    name: str | None,
    object_type: str,
    label: str,
    report: ReadReport,
) -> Annotation:
    cls_name, cls_color = _classification(props.get("classification"), label, report)
    object_color = None
    if props.get("color") is not None:
        object_color = _rgb(props["color"])
        if object_color is None:
            report.messages.append(f"{label}: object colour {props['color']!r} not understood; ignored")
    if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) and str(raw_id) and (
        str(raw_id) not in _LEGACY_TYPE_IDS
    ):
        object_id = str(raw_id)
    else:
        object_id = str(uuid.uuid4())
    locked = props.get("isLocked")
    return Annotation(
        geometry=geometry,
        classification=cls_name,
        color=cls_color,
        id=object_id,
        name=name,
        locked=locked is True or (isinstance(locked, str) and locked.lower() == "true"),
        measurements=_measurements(props.get("measurements"), label, report),
        object_type=object_type,
        metadata=_metadata(props.get("metadata"), label, report),
        object_color=object_color,
    )


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _classification(value: Any, label: str, report: ReadReport) -> tuple[str | None, RGB | None]:
    """(name, colour) from every form QuPath reads; a derived class's names are joined with ': '."""
    if value is None:
        return None, None
    if isinstance(value, str):
        return (value or None), None
    if not isinstance(value, dict):
        report.messages.append(f"{label}: classification {value!r} not understood; read as unclassified")
        return None, None
    names = value.get("names")
    if isinstance(names, list) and names and value.get("name") is None:
        name: str | None = ": ".join(str(n) for n in names)
    else:
        name = _text(value.get("name"))
    parent = value.get("parentClass")  # pre-0.4 serialisation of a derived class
    if isinstance(parent, dict) and name:
        parent_name, _ = _classification(parent, label, report)
        if parent_name:
            name = f"{parent_name}: {name}"
    raw_color = value.get("color", value.get("colorRGB"))
    color = _rgb(raw_color) if raw_color is not None else None
    if raw_color is not None and color is None:
        report.messages.append(f"{label}: class colour {raw_color!r} not understood; ignored")
    return (name or None), color


def _rgb(value: Any) -> RGB | None:
    """[r, g, b(, a)] or a packed (A)RGB int, possibly negative as Java writes it."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return ((value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF)
    if isinstance(value, (list, tuple)) and len(value) in (3, 4):
        if all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 255 for c in value):
            return (int(value[0]), int(value[1]), int(value[2]))
    return None


_SPECIAL_FLOATS = {"nan": math.nan, "inf": math.inf, "infinity": math.inf, "-inf": -math.inf, "-infinity": -math.inf}


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float: not a measurement
            return None
    if isinstance(value, str):  # QuPath writes NaN and infinities as strings
        special = _SPECIAL_FLOATS.get(value.strip().lower())
        if special is not None:
            return special
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _measurements(value: Any, label: str, report: ReadReport) -> dict[str, float]:
    """Measurements as an object (QuPath >= 0.4) or a list of {name, value} (older)."""
    if value is None:
        return {}
    pairs: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        pairs = value.items()
    elif isinstance(value, list):
        pairs = [(m.get("name"), m.get("value")) if isinstance(m, dict) else (None, None) for m in value]
    else:
        report.messages.append(f"{label}: 'measurements' is neither an object nor a list; ignored")
        return {}
    out: dict[str, float] = {}
    bad = 0
    for key, raw in pairs:
        number = _number(raw)
        if key is None or number is None:
            bad += 1
        else:
            out[str(key)] = number
    if bad:
        report.messages.append(f"{label}: {bad} measurement(s) without a name or a numeric value ignored")
    return out


def _metadata(value: Any, label: str, report: ReadReport) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        report.messages.append(f"{label}: 'metadata' is not an object; ignored")
        return {}
    return {str(k): t for k, v in value.items() if (t := _text(v)) is not None}


# ---------------------------------------------------------------------------------------------- geometry


def _area(geometry: Any, label: str, report: ReadReport) -> BaseGeometry | None:
    """The feature's area as a valid Polygon/MultiPolygon, or None (counted in ``report``)."""
    try:
        parts, dropped = _polygon_parts(geometry)
    except _BadGeometry as e:
        report.skipped_other += 1
        report.messages.append(f"{label} skipped: {e}")
        return None
    if not parts:
        if "point" in dropped:
            report.skipped_points += 1
            report.messages.append(f"{label} skipped: a point has no area")
        elif "line" in dropped:
            report.skipped_lines += 1
            report.messages.append(f"{label} skipped: a line has no area")
        else:
            report.skipped_empty += 1
            report.messages.append(f"{label} skipped: empty geometry")
        return None
    if dropped - {"empty"}:
        report.messages.append(f"{label}: {' and '.join(sorted(dropped - {'empty'}))} parts dropped (no area)")
    geom: BaseGeometry
    if len(parts) == 1 and geometry["type"] != "MultiPolygon":
        geom = parts[0]
    else:
        geom = MultiPolygon(parts)
    try:
        if geom.is_valid:
            return geom
        reason = explain_validity(geom)
        fixed = repair(geom)
    except (TooTangled, GEOSException) as e:
        report.skipped_other += 1
        report.messages.append(f"{label} skipped: invalid geometry that cannot be repaired: {e}")
        return None
    if fixed is None:
        report.skipped_empty += 1
        report.messages.append(f"{label} skipped: invalid geometry ({reason}) has no area once repaired")
        return None
    report.repaired += 1
    report.messages.append(f"{label}: invalid geometry repaired ({reason})")
    return fixed


class _BadGeometry(ValueError):
    """A geometry that is not well-formed GeoJSON (the feature is skipped, the file goes on)."""


def _polygon_parts(geometry: Any) -> tuple[list[Polygon], set[str]]:
    """Polygons of a GeoJSON geometry, and the kinds of parts that carry no area ('point', 'line', 'empty')."""
    if not isinstance(geometry, dict):
        raise _BadGeometry(f"geometry is not a GeoJSON object but {type(geometry).__name__}")
    kind = geometry.get("type")
    if not isinstance(kind, str):
        raise _BadGeometry(f"geometry \"type\" is {type(kind).__name__}, not a GeoJSON geometry name")
    if kind == "GeometryCollection":
        members = geometry.get("geometries")
        if not isinstance(members, list):
            raise _BadGeometry("GeometryCollection without a 'geometries' list")
        parts: list[Polygon] = []
        dropped: set[str] = set()
        for member in members:
            p, d = _polygon_parts(member)
            parts.extend(p)
            dropped |= d
        return parts, dropped
    if kind not in _COORD_DEPTH:
        raise _BadGeometry(f"unknown geometry type {kind!r}")
    if "coordinates" not in geometry:
        raise _BadGeometry(f"{kind} without 'coordinates'")
    coords = geometry["coordinates"]
    if kind not in ("Polygon", "MultiPolygon"):
        problem = _check_coords(coords, _COORD_DEPTH[kind], kind)
        if problem:
            raise _BadGeometry(problem)
        return [], {"point" if kind.endswith("Point") else "line"}
    if not isinstance(coords, list):
        raise _BadGeometry(f"{kind} coordinates are not nested lists as GeoJSON requires: {coords!r:.60}")
    parts, dropped = [], set()
    for rings in [coords] if kind == "Polygon" else coords:
        if not isinstance(rings, list):
            raise _BadGeometry(f"{kind} coordinates are not nested lists as GeoJSON requires: {rings!r:.60}")
        poly = _polygon([_positions(ring, kind) for ring in rings])
        if poly is None:
            dropped.add("empty")
        else:
            parts.append(poly)
    return parts, dropped


def _positions(ring: Any, kind: str) -> np.ndarray:
    """An (n, 2) float array of a ring's positions (z dropped); numpy fast path, exact checks on failure."""
    if not isinstance(ring, list):
        raise _BadGeometry(f"{kind} coordinates are not nested lists as GeoJSON requires: {ring!r:.60}")
    if not ring:
        return np.empty((0, 2))
    try:
        arr = np.asarray(ring)
    except (ValueError, TypeError):  # ragged
        arr = None
    if arr is None or arr.ndim != 2 or arr.shape[1] < 2 or arr.dtype.kind not in "iuf":
        problem = _check_coords(ring, 2, kind)  # names the offending value
        if problem:
            raise _BadGeometry(problem)
        arr = np.array([p[:2] for p in ring], dtype=float)  # valid but mixed 2-D/3-D positions
    arr = arr[:, :2].astype(float, copy=False)
    if not np.isfinite(arr).all():
        raise _BadGeometry(f"{kind} has a coordinate that is not a finite number")
    if (np.abs(arr) > MAX_COORDINATE).any():
        raise _BadGeometry(f"{kind} has a coordinate beyond ±{MAX_COORDINATE:.0e} px (no slide is that large)")
    return arr


def _finite(c: int | float) -> bool:
    try:
        return math.isfinite(c)
    except OverflowError:  # an integer too large for a float
        return False


def _short(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**15:
        return f"an integer of {len(str(abs(value)))} digits"
    return f"{value!r:.60}"


def _check_coords(value: Any, depth: int, kind: str) -> str | None:
    """Why nested ``value`` is not ``depth`` levels of GeoJSON positions of finite numbers, or None."""
    if depth == 1:
        if not isinstance(value, list) or len(value) < 2:
            return f"{kind} has a position that is not a list of 2 numbers: {value!r:.60}"
        for c in value:
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not _finite(c):
                return f"{kind} has a coordinate that is not a finite number: {_short(c)}"
            if abs(c) > MAX_COORDINATE:
                return f"{kind} has a coordinate beyond ±{MAX_COORDINATE:.0e} px: {_short(c)}"
        return None
    if not isinstance(value, list):
        return f"{kind} coordinates are not nested lists as GeoJSON requires: {value!r:.60}"
    for item in value:
        problem = _check_coords(item, depth - 1, kind)
        if problem:
            return problem
    return None


def _ring(arr: np.ndarray) -> np.ndarray | None:
    if len(arr) > 1 and (arr[0] == arr[-1]).all():
        arr = arr[:-1]  # shapely closes the ring itself
    return arr if len(arr) >= 3 else None


def _polygon(rings: list[np.ndarray]) -> Polygon | None:
    if not rings:
        return None
    shell = _ring(rings[0])
    if shell is None:
        return None
    holes = [h for h in (_ring(r) for r in rings[1:]) if h is not None]
    return Polygon(shell, holes)


# ----------------------------------------------------------------------------------------------- writing


def _uuid(value: str) -> str:
    """QuPath ids are UUIDs; a foreign id maps to a stable UUID derived from it."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"pdseg:{value}"))


def _ring_json(ring: BaseGeometry) -> list[list[float]]:
    return shapely.get_coordinates(ring).tolist()  # float64 -> Python floats, 2-D


def _geometry_json(geom: BaseGeometry) -> dict:
    if isinstance(geom, Polygon):
        return {"type": "Polygon", "coordinates": _polygon_json(geom)}
    if isinstance(geom, MultiPolygon):
        return {"type": "MultiPolygon", "coordinates": [_polygon_json(p) for p in geom.geoms]}
    return json.loads(json.dumps(shapely.geometry.mapping(geom)))  # tuples -> lists


def _polygon_json(poly: Polygon) -> list[list[list[float]]]:
    return [_ring_json(r) for r in shapely.get_rings(poly)]  # exterior first; faster than .interiors


def _measurement_json(value: float) -> float | str:
    value = float(value)
    if math.isnan(value):
        return "NaN"  # as QuPath writes it, keeping the file standard JSON
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _classification_json(name: str, color: RGB | None) -> dict:
    rgb = [int(c) for c in (color or default_color(name))]
    names = name.split(": ")
    if len(names) > 1 and all(names):  # a derived class, written as QuPath writes it
        return {"names": names, "color": rgb}
    return {"name": name, "color": rgb}


def annotation_to_feature(a: Annotation) -> dict:
    """One QuPath Feature in the form QuPath writes (only the properties that are set)."""
    props: dict[str, Any] = {"objectType": a.object_type or "annotation"}
    if a.name is not None:
        props["name"] = a.name
    if a.object_color is not None:
        props["color"] = [int(c) for c in a.object_color]
    if a.classification:
        props["classification"] = _classification_json(a.classification, a.color)
    if a.locked:
        props["isLocked"] = True
    if a.measurements:
        props["measurements"] = {str(k): _measurement_json(v) for k, v in a.measurements.items()}
    if a.metadata:
        props["metadata"] = {str(k): str(v) for k, v in a.metadata.items()}
    return {"type": "Feature", "id": _uuid(a.id), "geometry": _geometry_json(a.geometry), "properties": props}


def to_feature_collection(annotations: Sequence[Annotation]) -> dict:
    """A FeatureCollection of the annotations; empty geometries (no area, no meaning) are left out."""
    return {
        "type": "FeatureCollection",
        "features": [annotation_to_feature(a) for a in annotations if not a.geometry.is_empty],
    }


def dump_feature_collection(features: Sequence[Any], pdseg: dict[str, Any] | None = None) -> str:
    """FeatureCollection text with one Feature per line: valid JSON that still diffs well.

    Features built here never hold NaN (measurements write it as "NaN", as QuPath does); NaN is let
    through only for foreign features passed on unchanged, which QuPath's lenient reader accepts.
    ``pdseg`` (e.g. the model id) goes into a top-level ``"pdseg"`` member on the first line, a foreign
    member that QuPath ignores and :func:`read_pdseg_member` reads without parsing the features.
    """
    body = ",\n".join(json.dumps(f, ensure_ascii=False) for f in features)
    head = f', "pdseg": {json.dumps(pdseg, ensure_ascii=False)}' if pdseg else ""
    return '{"type": "FeatureCollection"' + head + ', "features": [\n' + body + ("\n" if body else "") + "]}\n"


def read_pdseg_member(path: Path) -> dict[str, Any]:
    """The ``"pdseg"`` member of a GeoJSON file pdseg wrote (``{}`` if none, or unreadable)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 16).decode("utf-8")
        head = json.loads(first.rstrip().removesuffix("[") + "[]}")
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    member = head.get("pdseg") if isinstance(head, dict) else None
    return member if isinstance(member, dict) else {}


def write_geojson(path: Path, annotations: Sequence[Annotation], pdseg: dict[str, Any] | None = None) -> None:
    """Write ``annotations`` as QuPath GeoJSON, atomically (a crash leaves the old file intact).

    Each geometry is first checked with the ``geojson`` package (spec-valid structure; no NaN or infinite
    coordinates, which json would write as bare ``NaN``), so a file QuPath cannot read is never written.
    """
    features = to_feature_collection(annotations)["features"]
    for f in features:
        try:
            problems = geojson.GeoJSON.to_instance(f["geometry"], strict=True).errors()
            geojson.dumps(f["geometry"])  # allow_nan=False: non-finite coordinates raise
        except (ValueError, TypeError) as exc:
            problems = str(exc)
        if problems:
            raise PdsegError(f"{path}: refusing to write invalid GeoJSON for object {f.get('id')}: {problems}")
    atomic_write_text(Path(path), dump_feature_collection(features, pdseg))


