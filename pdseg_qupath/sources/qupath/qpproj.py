"""Pure helpers for the QuPath project adapter: project files, pixel sizes, classes, geometry.

Nothing here starts Java, so all of it is tested without QuPath. The JSON layouts are QuPath 0.5/0.6's:
``project.qpproj`` lists ``images[i].serverBuilder.metadata`` and ``data/<entryID>/server.json`` holds the
same server builder, with ``metadata.pixelCalibration.pixelWidth = {"value": 0.25, "unit": "µm"}``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import unquote, urlsplit

import shapely
from shapely.geometry.base import BaseGeometry

from pdseg_qupath.core.annotations import PDSEG_MARKER, Annotation, polygonal_part
from pdseg_qupath.core.errors import PdsegError

MICROMETER_UNITS = {"µm", "μm", "um", "micron", "microns", "micrometer", "micrometre"}
"""Units QuPath (``PixelCalibration.MICROMETER`` is U+00B5) or a hand-edited file may use for µm."""


def project_file(path: str | Path) -> Path:
    """The ``project.qpproj`` of ``path`` (the file itself or its folder); :class:`PdsegError` if absent."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "project.qpproj"
    if p.suffix != ".qpproj":
        raise PdsegError(f"{p}: not a QuPath project file (expected a .qpproj file or the folder holding one)")
    if not p.is_file():
        raise PdsegError(f"{p}: no such QuPath project. Pass the project folder or its project.qpproj file.")
    return p.absolute()


def path_from_file_uri(uri: str) -> Path | None:
    """Local path of a ``file:`` URI as QuPath writes it (``file:/C:/x%20y.svs``), else ``None``."""
    parts = urlsplit(uri)
    if parts.scheme.lower() != "file":
        return None
    path = unquote(parts.path)
    if parts.netloc and parts.netloc.lower() != "localhost":
        path = f"//{parts.netloc}{path}"  # a network share
    elif re.match(r"^/[A-Za-z]:[/\\]", path):
        path = path[1:]  # drive letter: /C:/x -> C:/x
    return Path(path)


def mpp_from_pair(width_um: Any, height_um: Any) -> float | None:
    """Mean of the pixel width and height in µm, or ``None`` unless both are positive finite numbers."""
    try:
        w, h = float(width_um), float(height_um)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
        return None
    return (w + h) / 2.0


def mpp_from_calibration(calibration: Any) -> float | None:
    """µm/px from a ``pixelCalibration`` JSON object; ``None`` when uncalibrated (QuPath: 1.0 ``px``)."""
    if not isinstance(calibration, dict):
        return None
    sizes = []
    for key in ("pixelWidth", "pixelHeight"):
        q = calibration.get(key)
        if not isinstance(q, dict) or str(q.get("unit", "")).strip().lower() not in MICROMETER_UNITS:
            return None
        sizes.append(q.get("value"))
    return mpp_from_pair(*sizes)


def _builder_field(builder: Any, key: str, kind: type) -> Any:
    """``builder[key]`` of a server builder, looking into wrapping builders (rotated, cropped...)."""
    while isinstance(builder, dict):
        if isinstance(builder.get(key), kind):
            return builder[key]
        builder = builder.get("builder")
    return None


def _metadata(builder: Any) -> dict | None:
    """The ``metadata`` of a server builder (the image's size and calibration as QuPath recorded them)."""
    return _builder_field(builder, "metadata", dict)


def uri_from_builder(builder: Any) -> str | None:
    """The image URI of a server builder (of the innermost one that names it)."""
    return _builder_field(builder, "uri", str)


def mpp_from_builder(builder: Any) -> float | None:
    """µm/px recorded in a server builder (``server.json`` or a ``.qpproj`` entry's ``serverBuilder``)."""
    md = _metadata(builder)
    return mpp_from_calibration(md.get("pixelCalibration")) if md else None


def size_from_builder(builder: Any) -> tuple[int, int] | None:
    """Level-0 (width, height) recorded in a server builder, if any."""
    md = _metadata(builder)
    try:
        return (int(md["width"]), int(md["height"])) if md else None
    except (KeyError, TypeError, ValueError):
        return None


_MOVED_PIXELS = {"rotated": "rotated", "affine": "transformed", "cropped": "cropped", "sparse": "stitched"}


def server_problem(builder: Any) -> str | None:
    """Why the image QuPath shows differs from the file's main image, or None if they are the same.

    QuPath can wrap a file in servers that rotate, crop or stitch it, or show one series of a
    multi-image file; its annotation coordinates then do not match the file pdseg reads.
    """
    while isinstance(builder, dict):
        kind = builder.get("builderType")
        if kind in _MOVED_PIXELS:
            return f"QuPath shows it {_MOVED_PIXELS[kind]} (a '{kind}' image server)"
        if kind == "uri" or "uri" in builder:
            args = [str(a) for a in builder.get("args") or []]
            if "--series" in args[:-1]:
                series = args[args.index("--series") + 1]
                if series.strip() != "0":
                    return f"QuPath shows series {series} of a multi-image file"
            return None
        builder = builder.get("builder")
    return None


def read_server_builders(qpproj: Path) -> dict[str, dict]:
    """``entryID`` → ``serverBuilder`` from a ``.qpproj``; ``{}`` if it cannot be read (only a fallback)."""
    try:
        data = json.loads(Path(qpproj).read_text(encoding="utf-8"))
        return {
            str(img["entryID"]): img["serverBuilder"]
            for img in data.get("images", [])
            if isinstance(img, dict) and "entryID" in img and isinstance(img.get("serverBuilder"), dict)
        }
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def read_server_json(entry_dir: Path) -> dict | None:
    """``data/<entryID>/server.json`` (written when QuPath saves an image), or ``None``."""
    try:
        data = json.loads((Path(entry_dir) / "server.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------- classes & names


def is_pdseg_name(name: str | None) -> bool:
    """True for an object pdseg wrote (its name starts with the marker); only these are ever replaced."""
    return bool(name) and str(name).startswith(PDSEG_MARKER)


def prediction_name(a: Annotation) -> str:
    """The name a prediction object gets in QuPath: always starts with the pdseg marker."""
    if is_pdseg_name(a.name):
        return str(a.name)
    return f"{PDSEG_MARKER} {a.name or a.classification or 'unclassified'}"


def split_class_name(name: str) -> list[str]:
    """``"Tumor: Positive"`` → ``["Tumor", "Positive"]``: QuPath's derived classes joined by ``": "``."""
    return [part.strip() for part in str(name).split(":") if part.strip()]


def missing_classes(existing: Iterable[str], wanted: Iterable[str | None]) -> list[str]:
    """Names in ``wanted`` not yet in ``existing``, in first-seen order, without duplicates or ``None``."""
    have = set(existing)
    out: list[str] = []
    for name in wanted:
        if name and name not in have:
            have.add(name)
            out.append(name)
    return out


# --------------------------------------------------------------------------------------------- geometry


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
        area = polygonal_part(geom) if kind == "GeometryCollection" else geom
        return (area, "ok") if area is not None and area.area > 0 else (None, "empty")
    fixed = polygonal_part(shapely.make_valid(geom))
    return (fixed, "repaired") if fixed is not None else (None, "empty")
