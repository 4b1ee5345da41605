"""``masks``: every image of a source → label masks, one classes.json, and a summary.

The steps: (1) read every image's labels (never an untouched pdseg prediction); (2) decide the class map once for the whole source
(``--classes`` order, else all classes used, sorted), so index k means the same class in every file;
(3) write each image's masks (:mod:`pdseg_qupath.outputs.masks`); (4) write ``classes.json``.
Per-image failures are recorded and the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pdseg_qupath.core.annotations import (
    Annotation,
    ClassMap,
    LabelCount,
    ReadReport,
    outside_image,
    outside_message,
)
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.events import SILENT, Events
from pdseg_qupath.core.fileio import writable_dir
from pdseg_qupath.core.names import check_name_length, check_unique, qupath_export_basename
from pdseg_qupath.core.slide import check_mpp, open_slide
from pdseg_qupath.learn.data import label_objects, source_class_map
from pdseg_qupath.outputs.masks import TILE_SUFFIX_MAX, MaskExportStats, export_image_masks, write_classes_json
from pdseg_qupath.sources.base import AnnotationSource, ImageRecord, require_pixel_sizes


@dataclass
class MaskRow:
    image: str
    stats: MaskExportStats | None = None
    report: ReadReport | None = None
    error: str | None = None
    labels: LabelCount | None = None
    """Objects taken as labels by role; untouched pdseg predictions are never labels."""


@dataclass
class MasksResult:
    class_map: ClassMap
    rows: list[MaskRow] = field(default_factory=list)
    classes_json: Path | None = None


def masks(
    source: AnnotationSource,
    out_dir: str | Path,
    *,
    mpp: float,
    image_mpp: float | None = None,
    tile_size: int = 4096,
    classes: Sequence[str] | None = None,
    overlay: bool = False,
    events: Events = SILENT,
) -> MasksResult:
    """Rasterize the annotations of every image of ``source`` at ``mpp`` µm/px into ``out_dir``."""
    check_mpp(mpp, "--mpp")
    if image_mpp is not None:
        check_mpp(image_mpp, "--image-mpp")
    writable_dir(out_dir)
    # 1. Every image's annotations.
    rows: dict[str, MaskRow] = {}
    loaded: list[tuple[ImageRecord, list[Annotation]]] = []
    with events.step("reading annotations") as reading:
        for rec in source.images():
            reading.describe(rec.name)
            row = rows.setdefault(rec.name, MaskRow(rec.name))
            if rec.error:
                row.error = rec.error
                continue
            try:
                anns, row.report = source.read_annotations(rec)
            except PdsegError as exc:
                row.error = str(exc)
                continue
            anns, row.labels = label_objects(anns)
            loaded.append((rec, anns))
    # 2. One class map for the whole source.
    try:
        cmap = source_class_map([a for _, anns in loaded for a in anns], classes, source.class_colors())
        if not len(cmap):
            raise PdsegError("no classified area annotations found: nothing to learn from or export")
    except PdsegError as exc:
        failed = [f"{r.image}: {r.error}" for r in rows.values() if r.error]
        raise PdsegError("\n".join([str(exc), *failed])) from None
    require_pixel_sizes([rec for rec, anns in loaded if anns], image_mpp)
    # 3. Each image's masks, once no two images would write the same file and every name fits.
    check_unique([(rec.name, qupath_export_basename(rec.name)) for rec, _ in loaded], str(out_dir))
    for rec, _ in loaded:
        check_name_length(rec.name, qupath_export_basename(rec.name) + TILE_SUFFIX_MAX, str(out_dir))
    step = events.step("masks", total=len(loaded))
    for rec, anns in loaded:
        row = rows[rec.name]
        try:
            row.stats = _export_one(rec, anns, cmap, Path(out_dir), mpp, image_mpp, tile_size, overlay, events)
        except PdsegError as exc:
            row.error = str(exc)
        step.advance()
    step.close()
    # 4. classes.json.
    result = MasksResult(cmap, list(rows.values()))
    result.classes_json = write_classes_json(out_dir, cmap, mpp)
    return result


def _export_one(rec: ImageRecord, anns: list[Annotation], cmap: ClassMap, out_dir: Path, mpp: float,
                image_mpp: float | None, tile_size: int, overlay: bool, events: Events) -> MaskExportStats:
    """One image's masks; the slide is opened only when its size or pixel size is not recorded, or to draw."""
    slide = None
    if (rec.mpp or image_mpp) is None or rec.width is None or rec.height is None or overlay:
        if rec.path is None:
            raise PdsegError(f"{rec.name}: image is not a local file ({rec.uri})")
        slide = open_slide(rec.path, mpp=rec.mpp, fallback_mpp=image_mpp)
    step = events.step(f"  {rec.name}")
    try:
        size = (slide.width, slide.height) if slide else (rec.width, rec.height)
        away = outside_image(anns, *size)
        if away:
            events.message(outside_message(rec.name, len(away), *size), "warn")
        return export_image_masks(size, slide.mpp if slide else (rec.mpp or image_mpp), anns, cmap, out_dir,
                                  rec.name, mpp=mpp, tile_size=tile_size,
                                  on_tile=lambda d, n: step.set_total(n, done=d),
                                  overlay_reader=slide.read if (slide and overlay) else None)
    finally:
        step.close()
        if slide is not None:
            slide.close()
