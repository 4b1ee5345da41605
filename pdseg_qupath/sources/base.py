"""The one interface between the core and the outside world: a set of images with QuPath annotations.

Two adapters implement it: :class:`pdseg_qupath.sources.qupath.folder.GeoJSONFolder` (slides plus sidecar
``<image>.geojson``) and :class:`pdseg_qupath.sources.qupath.project.QuPathProjectSource` (a ``.qpproj``
via paquo). Train, predict and evaluate only ever see this interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from pdseg_qupath.core.annotations import RGB, Annotation, ReadReport
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.names import given_names

IMAGE_SUFFIXES: tuple[str, ...] = (
    ".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff", ".png", ".jpg", ".jpeg", ".bmp",
)
"""Images tiffslide or PIL open. MIRAX (.mrxs) is left out: its pixels live in a side folder tiffslide can't read."""


@dataclass
class ImageRecord:
    """One image of a source. ``mpp`` is µm/px at level 0, or ``None`` when the image records none."""

    name: str
    uri: str
    path: Path | None = None
    width: int | None = None
    height: int | None = None
    mpp: float | None = None
    error: str | None = None
    """Why the image cannot be used (missing file, unreadable); the other images go on."""


@dataclass
class WriteReport:
    """What a write-back did: pdseg objects removed and added, user objects left untouched."""

    image: str
    removed: int = 0
    added: int = 0
    kept: int = 0
    backup: Path | None = None
    messages: list[str] = field(default_factory=list)
    target: Path | None = None
    """Where the objects went: the predictions file, or the project file."""


@runtime_checkable
class AnnotationSource(Protocol):
    """A collection of images and their annotations, readable and (unless read-only) writable."""

    def images(self) -> list[ImageRecord]:
        """All images, in a stable order; unusable ones carry ``error`` instead of raising."""

    def read_annotations(self, image: ImageRecord) -> tuple[list[Annotation], ReadReport]:
        """The image's annotation objects (areas only), with what was repaired or skipped."""

    def write_predictions(self, image: ImageRecord, annotations: Sequence[Annotation]) -> WriteReport:
        """Replace earlier pdseg objects of ``image`` with ``annotations``; never touch user objects."""

    def class_colors(self) -> dict[str, RGB]:
        """Colours of the source's own class list (QuPath's project classes), by name."""

    def close(self) -> None:
        """Release resources (and save, for writable sources)."""


def select_images(records: Sequence[ImageRecord], names: Sequence[str] | None) -> list[ImageRecord]:
    """The records named in ``names`` (all when None; :func:`~pdseg_qupath.core.names.given_names`, so a
    value may list several names separated by commas); an unknown name is an error that lists the known ones."""
    if names is None:
        return list(records)
    known = {r.name for r in records}
    names = given_names(names, known) or []
    missing = [n for n in names if n not in known]
    if missing:
        raise PdsegError(f"image(s) {missing} not in the source; it has {sorted(known)}")
    wanted = set(names)
    return [r for r in records if r.name in wanted]


def require_pixel_sizes(records: Sequence[ImageRecord], image_mpp: float | None) -> None:
    """The one message, in every command, for images that record no pixel size when ``--image-mpp`` is missing."""
    if image_mpp is not None:
        return
    missing = [r.name for r in records if not r.error and r.mpp is None]
    if missing:
        more = ", …" if len(missing) > 3 else ""
        raise PdsegError(f"{len(missing)} image(s) record no pixel size in µm ({', '.join(missing[:3])}{more}): pass "
                         "their resolution with --image-mpp (for example --image-mpp 0.5 for 20x); pdseg never "
                         "guesses one")
