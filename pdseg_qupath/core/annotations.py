"""The QuPath-agnostic annotation model: classed shapely geometries in level-0 pixel coordinates."""

from __future__ import annotations

import uuid
import zlib
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import shapely
from shapely.geometry.base import BaseGeometry

from pdseg_qupath.core.names import given_names

RGB = tuple[int, int, int]
IGNORE: int = 255
"""Label value for pixels that carry no label (unannotated, or QuPath class ``Ignore*``)."""

PDSEG_MARKER = "pdseg"
"""Prefix of the ``name`` of every object pdseg writes; write-back replaces only such objects."""


@dataclass
class Annotation:
    """One QuPath object: geometry in level-0 px, its class name (``None`` if unclassified) and metadata."""

    geometry: BaseGeometry
    classification: str | None = None
    color: RGB | None = None
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    name: str | None = None
    locked: bool = False
    measurements: dict[str, float] = field(default_factory=dict)
    object_type: str = "annotation"
    metadata: dict[str, str] = field(default_factory=dict)
    object_color: RGB | None = None
    """QuPath's per-object colour (``properties.color``), distinct from the class colour ``color``."""

    @property
    def is_pdseg(self) -> bool:
        """True for objects pdseg wrote earlier (the only ones a write-back may replace)."""
        return is_pdseg_name(self.name)

    @property
    def is_ignore(self) -> bool:
        """QuPath's ignored classes (``Ignore*``, ``Region*``, any name ending in ``*``) mark areas to leave
        out of training and scoring."""
        return is_ignore_class(self.classification)

    @property
    def role(self) -> str:
        """What the object is to training (:func:`label_role`)."""
        return label_role(self)


def is_pdseg_name(name: object) -> bool:
    """True for the name of an object pdseg wrote (it starts with the marker); only these are ever replaced."""
    return isinstance(name, str) and name.startswith(PDSEG_MARKER)


def prediction_name(a: Annotation) -> str:
    """The name a prediction object gets in QuPath: always starts with the pdseg marker."""
    if is_pdseg_name(a.name):
        return str(a.name)
    return f"{PDSEG_MARKER} {a.name or a.classification or 'unclassified'}"


def stamped(a: Annotation) -> Annotation:
    """``a`` as pdseg writes it: named with the marker, its fingerprint among its measurements."""
    return replace(a, name=prediction_name(a), measurements={**a.measurements, **fingerprint(a.geometry, a.classification)})


def is_ignore_class(name: str | None) -> bool:
    """QuPath's convention: a class whose name ends in ``*`` (``Ignore*``, ``Region*``, ``Review*``) is ignored
    by its classifiers; pdseg gives it label :data:`IGNORE` (255). Derived classes (``Tumor: Region*``) too."""
    return name is not None and name.strip().endswith("*")


# ------------------------------------------------------------------------- predictions vs. labels

FINGERPRINT = "pdseg: fingerprint"
"""Measurement holding a 24-bit hash of the class a prediction was written with (exact in QuPath's float32)."""
FINGERPRINT_AREA = "pdseg: written area px^2"
FINGERPRINT_X = "pdseg: written centroid x px"
FINGERPRINT_Y = "pdseg: written centroid y px"
FINGERPRINT_KEYS = (FINGERPRINT, FINGERPRINT_AREA, FINGERPRINT_X, FINGERPRINT_Y)

USER, ACCEPTED, CORRECTED, UNTOUCHED = "user", "accepted", "corrected", "untouched"
"""The roles of an object: drawn by the user; a prediction renamed by the user (the ``pdseg`` prefix
removed); a prediction whose class or outline the user changed; a prediction as pdseg wrote it."""


def class_hash(name: str | None) -> float:
    """24 bits of CRC-32 of the class name, as a float (exactly representable in float32)."""
    return float(zlib.crc32((name or "").encode("utf-8")) & 0xFFFFFF)


def fingerprint(geometry: BaseGeometry, classification: str | None) -> dict[str, float]:
    """The measurements stored in every object pdseg writes, so that a later read can tell an untouched
    prediction from one the pathologist edited: the class hash, the area and the centroid in level-0 px."""
    c = geometry.centroid
    return {
        FINGERPRINT: class_hash(classification),
        FINGERPRINT_AREA: float(round(geometry.area, 2)),
        FINGERPRINT_X: float(round(c.x, 2)),
        FINGERPRINT_Y: float(round(c.y, 2)),
    }


def matches_fingerprint(a: "Annotation") -> bool:
    """True when ``a`` still has the class and outline it was written with.

    Tolerances absorb what storing does to a shape (QuPath keeps coordinates at 0.01 px, some as float32):
    area within 1 px² + 0.005 px × perimeter, centroid within 0.5 px. A real edit in QuPath (brush, wand,
    moving vertices, translating) changes far more; a new class always changes the hash.
    """
    m = a.measurements
    try:
        stored = [float(m[k]) for k in FINGERPRINT_KEYS]
    except (KeyError, TypeError, ValueError):
        return False
    if stored[0] != class_hash(a.classification):
        return False
    g = a.geometry
    if g is None or g.is_empty:
        return False
    c = g.centroid
    tol = 1.0 + 0.005 * float(shapely.length(g))
    return abs(g.area - stored[1]) <= tol and abs(c.x - stored[2]) <= 0.5 and abs(c.y - stored[3]) <= 0.5


def label_role(a: "Annotation") -> str:
    """:data:`USER`, :data:`ACCEPTED`, :data:`CORRECTED` or :data:`UNTOUCHED` (see their note).

    The rule, as the README states it: an object whose name starts with ``pdseg`` is a prediction and is
    never a label unless the pathologist changed its class or outline; removing ``pdseg`` from its name
    accepts it as it is. A prediction without a fingerprint (written by an older pdseg) counts as untouched.
    """
    if not is_pdseg_name(a.name):
        return ACCEPTED if FINGERPRINT in a.measurements else USER
    if FINGERPRINT not in a.measurements:
        return UNTOUCHED
    return UNTOUCHED if matches_fingerprint(a) else CORRECTED


@dataclass
class LabelCount:
    """How many objects of each role an image's labels took (untouched predictions are left out)."""

    user: int = 0
    accepted: int = 0
    corrected: int = 0
    untouched: int = 0

    def add(self, other: "LabelCount") -> "LabelCount":
        for k in (USER, ACCEPTED, CORRECTED, UNTOUCHED):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        return self

    def describe(self) -> str:
        return (f"{self.user} drawn, {self.corrected} corrected and {self.accepted} accepted prediction(s) used as "
                f"labels; {self.untouched} untouched prediction(s) left out")


def training_labels(annotations: Iterable["Annotation"]) -> tuple[list["Annotation"], LabelCount]:
    """The objects that are labels: everything except untouched predictions, with the count of each role."""
    out: list[Annotation] = []
    count = LabelCount()
    for a in annotations:
        role = label_role(a)
        setattr(count, role, getattr(count, role) + 1)
        if role != UNTOUCHED:
            out.append(a)
    return out, count


@dataclass
class ReadReport:
    """What a reader had to repair or skip, so the user can be told instead of losing data silently."""

    source: str = ""
    read: int = 0
    repaired: int = 0
    skipped_points: int = 0
    skipped_lines: int = 0
    skipped_empty: int = 0
    skipped_other: int = 0
    messages: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.skipped_points + self.skipped_lines + self.skipped_empty + self.skipped_other

    def merge(self, other: "ReadReport") -> "ReadReport":
        for name in ("read", "repaired", "skipped_points", "skipped_lines", "skipped_empty", "skipped_other"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.messages.extend(other.messages)
        return self


# QuPath's default colours for its built-in classes (PathClassFactory), used when a file gives none.
QUPATH_DEFAULT_COLORS: dict[str, RGB] = {
    "Tumor": (200, 0, 0),
    "Stroma": (150, 200, 150),
    "Immune cells": (160, 90, 160),
    "Necrosis": (50, 50, 50),
    "Other": (255, 200, 0),
    "Region*": (0, 0, 180),
    "Ignore*": (180, 180, 180),
    "Positive": (200, 50, 50),
    "Negative": (112, 112, 225),
}


def default_color(name: str) -> RGB:
    """A stable colour for a class name: QuPath's own where it has one, else derived from the name."""
    if name in QUPATH_DEFAULT_COLORS:
        return QUPATH_DEFAULT_COLORS[name]
    h = uuid.uuid5(uuid.NAMESPACE_OID, name).bytes
    return (64 + h[0] % 192, 64 + h[1] % 192, 64 + h[2] % 192)


@dataclass(frozen=True)
class ClassInfo:
    name: str
    color: RGB


@dataclass(frozen=True)
class ClassMap:
    """Ordered classes: index k is class k; :data:`IGNORE` (255) means no label."""

    classes: tuple[ClassInfo, ...]

    def __post_init__(self) -> None:
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate class names in {names}")
        if len(names) >= IGNORE:
            raise ValueError(f"at most {IGNORE} classes are supported, got {len(names)}")
        if any(is_ignore_class(n) for n in names):
            raise ValueError("classes ending in '*' (Ignore*, Region*) are not trainable: they mark pixels to "
                             "leave out (label 255)")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def __len__(self) -> int:
        return len(self.classes)

    def index(self, name: str | None) -> int | None:
        """Label index of a class name, :data:`IGNORE` for an ignored class (``*``), ``None`` if not in the map."""
        if is_ignore_class(name):
            return IGNORE
        for i, c in enumerate(self.classes):
            if c.name == name:
                return i
        return None

    def to_json(self) -> dict:
        return {
            "classes": [{"index": i, "name": c.name, "color": list(c.color)} for i, c in enumerate(self.classes)],
            "ignore": IGNORE,
        }

    @classmethod
    def from_json(cls, data: dict) -> "ClassMap":
        """The map as :meth:`to_json` writes it; ``ValueError`` names what is malformed."""
        classes = []
        for c in data["classes"]:
            name, color = c["name"], c["color"]
            if not isinstance(name, str) or not name:
                raise ValueError(f"class name {name!r} is not text (QuPath class names are text: write \"{name}\")")
            if not (isinstance(color, list) and len(color) == 3
                    and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in color)):
                raise ValueError(f"class {name!r}: colour {color!r} is not [r, g, b] with values 0-255")
            classes.append(ClassInfo(name, tuple(color)))  # type: ignore[arg-type]
        return cls(tuple(classes))

    @classmethod
    def from_annotations(
        cls, annotations: Iterable[Annotation], names: Sequence[str] | None = None
    ) -> "ClassMap":
        """Build the map from the classes used (sorted), or in the order of ``names``; colours from the data.
        ``names`` follow :func:`~pdseg_qupath.core.names.given_names` (``"A,B"`` is two classes unless a class
        is called that).

        Raises ``ValueError`` naming any requested class that no annotation uses (an unknown class).
        """
        colors: dict[str, RGB] = {}
        for a in annotations:
            if a.classification and not is_ignore_class(a.classification):
                colors.setdefault(a.classification, a.color or default_color(a.classification))
        if names is None:
            names = sorted(colors)
        else:
            names = given_names(names, colors) or []
            ignored = [n for n in names if is_ignore_class(n)]
            if ignored:
                raise ValueError(f"{ignored}: classes ending in '*' are ignored by QuPath and pdseg (label 255), "
                                 "not trainable")
            unknown = [n for n in names if n not in colors]
            if unknown:
                raise ValueError(
                    f"unknown class(es) {unknown}: the annotations use {sorted(colors) or 'no classes'}"
                )
        return cls(tuple(ClassInfo(n, colors.get(n) or default_color(n)) for n in names))


def outside_image(annotations: Iterable[Annotation], width: int, height: int) -> list[Annotation]:
    """The annotations that lie entirely outside a ``width`` × ``height`` px image (level 0): they label
    no pixel, which usually means they belong to another image or were drawn at another scale."""
    out = []
    for a in annotations:
        if a.geometry is None or a.geometry.is_empty:
            continue
        x0, y0, x1, y1 = a.geometry.bounds
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            out.append(a)
    return out


def outside_message(image: str, n: int, width: int, height: int) -> str:
    return (f"{image}: {n} annotation(s) lie entirely outside the image ({width} × {height} px) and label nothing; "
            "were they drawn on another image, or at another resolution?")
