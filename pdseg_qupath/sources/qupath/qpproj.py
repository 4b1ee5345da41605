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

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.sources.base import ImageRecord

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


def read_saved_classes(project_dir: Path) -> dict[str, tuple[int, int, int] | None]:
    """Class name → RGB from ``classifiers/classes.json`` as saved now (QuPath writes it whenever its class
    list changes); ``{}`` if it cannot be read. QuPath stores a colour as one packed (A)RGB int."""
    try:
        data = json.loads((Path(project_dir) / "classifiers" / "classes.json").read_text(encoding="utf-8"))
        entries = data.get("pathClasses", []) if isinstance(data, dict) else []
    except (OSError, ValueError):
        return {}
    out: dict[str, tuple[int, int, int] | None] = {}
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not split_class_name(e["name"]):
            continue
        c = e.get("color")
        out[e["name"]] = ((c >> 16) & 255, (c >> 8) & 255, c & 255) if isinstance(c, int) else None
    return out


def project_images(path: str | Path) -> list[ImageRecord]:
    """The images of a ``.qpproj``, read as JSON (no QuPath needed), with the pixel size QuPath recorded.

    Images pdseg cannot read as QuPath shows them (not a local file; a rotated, cropped or stitched
    view) carry ``error``.
    """
    qp = project_file(path)
    try:
        data = json.loads(qp.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PdsegError(f"{qp}: cannot read this QuPath project ({e})") from None
    records = []
    for i, img in enumerate(data.get("images", []) if isinstance(data, dict) else []):
        builder = img.get("serverBuilder") if isinstance(img, dict) else None
        name = str(img.get("imageName") or f"image #{i + 1}") if isinstance(img, dict) else f"image #{i + 1}"
        uri = uri_from_builder(builder) or ""
        local = path_from_file_uri(uri) if uri else None
        rec = ImageRecord(name=name, uri=uri, path=local, mpp=mpp_from_builder(builder))
        size = size_from_builder(builder)
        if size:
            rec.width, rec.height = size
        problem = server_problem(builder)
        if problem:
            rec.error = problem
        elif local is None:
            rec.error = f"not a local file ({uri})"
        records.append(rec)
    if not records:
        raise PdsegError(f"{qp}: the project has no images")
    return records
