"""File names derived from image names: the one place that decides what an output file is called.

Two rules, each for a reason:

- :func:`output_name`: pdseg's own per-image outputs (predictions GeoJSON, overlays, class maps, reports)
  keep the whole image name, extension included (``a.svs`` → ``a.svs.geojson``), with characters that
  some file systems refuse replaced by ``_``. ``groovy/*.groovy`` apply the same rule, so QuPath finds
  the files pdseg writes.
- :func:`qupath_export_basename`: label masks are named the way QuPath names its own exports (the image
  name without its extension, invalid characters dropped), so they line up with tiles QuPath exports.

And one rule for names given in list options (``--images``, ``--val-images``, ``--classes``):
:func:`given_names`.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from pdseg_qupath.core.errors import PdsegError

PDSEG_DIR = "pdseg"
"""Folder beside a source (inside a QuPath project, or a folder of images) that holds what pdseg writes."""

UNSAFE_CHARS = '/\\:*?"<>|'
"""Characters not allowed in file names on some OS; each becomes ``_``. Same rule in ``groovy/*.groovy``."""

_UNSAFE = re.compile("[" + re.escape(UNSAFE_CHARS) + "]")

# Extensions QuPath's GeneralTools.getNameWithoutExtension would strip; multi-part ones first.
_IMAGE_EXTENSIONS = (
    ".ome.tiff", ".ome.tif", ".ome.zarr", ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs",
    ".bif", ".svslide", ".czi", ".qptiff", ".dcm", ".isyntax", ".png", ".jpg", ".jpeg", ".bmp", ".gif",
    ".jp2", ".zarr", ".lif", ".nd2", ".vsi",
)
_INVALID_CHARS = re.compile(r'[\\/:*?"<>|\n\r\t]')


def safe_filename(name: str) -> str:
    """``name`` with each of ``/\\:*?"<>|`` replaced by ``_`` (QuPath image names may contain them)."""
    return _UNSAFE.sub("_", name)


def output_name(image_name: str, suffix: str) -> str:
    """The file name of a per-image output: ``safe_filename(image_name) + suffix`` (e.g. ``.geojson``)."""
    return safe_filename(image_name) + suffix


def qupath_export_basename(image_name: str) -> str:
    """The base name QuPath gives exports of an image: no image extension, no characters invalid in files."""
    name = image_name
    low = name.lower()
    for ext in _IMAGE_EXTENSIONS:
        if low.endswith(ext) and len(name) > len(ext):
            name = name[: -len(ext)]
            break
    return _INVALID_CHARS.sub("", name) or "image"


def given_names(values: Sequence[str] | None, known: Iterable[str]) -> list[str] | None:
    """Names as given in a list option, resolved against the ``known`` names (the source's images, or the
    classes its annotations use): each value that is exactly a known name is that name, so a name that
    contains a comma works (``--images "Patient 3, block A.svs"``); any other value is split at commas
    (``--images a.svs,b.svs``, as well as repeating the option). Order is kept, repeats are dropped; an
    unknown name is left for the caller to report. None stays None."""
    if values is None:
        return None
    known = set(known)
    names: list[str] = []
    for value in values:
        whole = value if value in known else value.strip()
        parts = [whole] if whole in known else [p.strip() for p in value.split(",")]
        names.extend(p for p in parts if p and p not in names)
    return names


NAME_MAX = 255
"""Longest file name (bytes, UTF-8) that common file systems accept."""


def check_unique(names: Iterable[tuple[str, str]], where: str = "") -> None:
    """Refuse, up front, two inputs whose outputs would share a file name.

    ``names`` holds (input name, output file name) pairs. Names are compared case-insensitively (as macOS
    and Windows do), so ``A.png`` and ``a.png`` clash too; an input listed twice is not a clash.
    """
    seen: dict[str, tuple[str, str]] = {}
    for image, out in names:
        key = out.casefold()
        if key in seen and seen[key][0] != image:
            first = seen[key]
            raise PdsegError(f"{first[0]!r} and {image!r} would both be written as {first[1]!r}"
                             f"{f' in {where}' if where else ''}; rename one of the images (or predict them into "
                             "different folders)")
        seen.setdefault(key, (image, out))


def check_name_length(image_name: str, out_name: str, folder: str = "") -> None:
    """Refuse an output name longer than file systems accept, before any work is done for it."""
    if len(out_name.encode("utf-8")) > NAME_MAX:
        raise PdsegError(f"{image_name}: the output file name would be {len(out_name.encode('utf-8'))} bytes "
                         f"({out_name[:40]}…){f' in {folder}' if folder else ''}, more than the {NAME_MAX} file "
                         "systems accept; rename the image (shorter name) and run again")
