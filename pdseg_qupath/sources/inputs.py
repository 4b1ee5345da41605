"""What the user named on the command line, turned into sources and images.

- :func:`open_source`: a QuPath project (through paquo) or a folder of images with sidecar GeoJSON, as an
  :class:`~pdseg_qupath.sources.base.AnnotationSource`.
- :func:`expand_inputs`: slides, folders, glob patterns and QuPath projects, as a flat list of
  :class:`~pdseg_qupath.sources.base.ImageRecord` (batch prediction and pretraining read images only, so
  a project is read as JSON here and needs no QuPath).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Sequence

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.sources.base import IMAGE_SUFFIXES, AnnotationSource, ImageRecord


def is_project(path: Path) -> bool:
    """A ``.qpproj`` file, or a folder that holds ``project.qpproj``."""
    return path.suffix == ".qpproj" or (path.is_dir() and (path / "project.qpproj").exists())


def open_source(path: str | Path, *, writable: bool = False) -> AnnotationSource:
    """Open a ``.qpproj`` (paquo, imported lazily) or a folder of images with sidecar GeoJSON."""
    p = Path(path)
    if not p.exists():
        raise PdsegError(f"{p}: no such project or folder")
    if is_project(p):
        from pdseg_qupath.sources.qupath.project import QuPathProjectSource  # starts QuPath's JVM

        return QuPathProjectSource(p, writable=writable)
    if p.is_dir():
        from pdseg_qupath.sources.qupath.folder import GeoJSONFolder

        return GeoJSONFolder(p)
    raise PdsegError(f"{p}: expected a QuPath project (.qpproj) or a folder of images with <name>.geojson")


def _record(path: Path) -> ImageRecord:
    return ImageRecord(name=path.name, uri=path.absolute().as_uri(), path=path.absolute())


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(f for f in found if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def expand_inputs(inputs: Sequence[str | Path], *, recursive: bool = False) -> list[ImageRecord]:
    """Images from files, folders (their images; with ``recursive`` also those in sub-folders), glob
    patterns (``**`` recurses) and QuPath projects (every image, with the pixel size QuPath recorded).

    Each file is listed once, in the order given. An image that cannot be used (not a local file, a
    rotated or cropped view in QuPath) is listed with ``error`` set, so the caller can report it.
    """
    from pdseg_qupath.sources.qupath.qpproj import project_images

    records: list[ImageRecord] = []
    seen: set[str] = set()
    for raw in inputs:
        s = str(raw)
        p = Path(s).expanduser()
        if any(ch in s for ch in "*?["):
            files = [Path(m) for m in sorted(glob.glob(str(p), recursive=True))]
            files = [f for f in files if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
            if not files:
                raise PdsegError(f"{s}: no files match this pattern (images: {', '.join(IMAGE_SUFFIXES)})")
            found = [_record(f) for f in files]
        elif is_project(p):
            found = project_images(p)
        elif p.is_dir():
            files = _images_in(p, recursive)
            if not files:
                raise PdsegError(f"{p}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            found = [_record(f) for f in files]
        elif p.is_file():
            found = [_record(p)]
        else:
            raise PdsegError(f"{s}: no such slide, folder, pattern or QuPath project")
        for rec in found:
            key = str(rec.path) if rec.path is not None else f"{rec.uri}#{rec.name}"
            if key not in seen:
                seen.add(key)
                records.append(rec)
    return records
