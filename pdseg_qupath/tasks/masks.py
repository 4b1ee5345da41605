"""``pdseg-qupath masks``: every image of a source → label masks, one classes.json, and a summary.

The class map is decided once for the whole source (``--classes`` order, else all classes used, sorted),
so index k means the same class in every file. Per-image failures are recorded and the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rich.progress import Progress

from pdseg_qupath.core.annotations import Annotation, ClassInfo, ClassMap, ReadReport
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.outputs.masks import MaskExportStats, export_image_masks, write_classes_json
from pdseg_qupath.sources.base import ImageRecord, open_source


@dataclass
class MaskRow:
    image: str
    stats: MaskExportStats | None = None
    report: ReadReport | None = None
    error: str | None = None


@dataclass
class MasksResult:
    class_map: ClassMap
    rows: list[MaskRow] = field(default_factory=list)
    classes_json: Path | None = None


def build_class_map(
    annotations: Sequence[Annotation], names: Sequence[str] | None, colors: dict[str, tuple[int, int, int]]
) -> ClassMap:
    """Class map for a whole source; the project's own class colours win over per-file ones."""
    try:
        cmap = ClassMap.from_annotations(annotations, names)
    except ValueError as exc:
        raise PdsegError(f"--classes: {exc}") from None
    if not len(cmap):
        raise PdsegError("no classified area annotations found: nothing to learn from or export")
    return ClassMap(tuple(ClassInfo(c.name, colors.get(c.name, c.color)) for c in cmap.classes))


def export_source_masks(
    source_path: Path,
    out_dir: Path,
    *,
    mpp: float,
    image_mpp: float | None = None,
    tile_size: int = 4096,
    classes: Sequence[str] | None = None,
    overlay: bool = False,
    progress: Progress | None = None,
) -> MasksResult:
    """Rasterize the annotations of every image in ``source_path`` at ``mpp`` µm/px into ``out_dir``."""
    from pdseg_qupath.core.slide import open_slide

    if mpp <= 0:
        raise PdsegError(f"--mpp must be positive, got {mpp}")
    source = open_source(source_path)
    try:
        records = source.images()
        rows: dict[str, MaskRow] = {}
        loaded: list[tuple[ImageRecord, list[Annotation]]] = []
        for rec in records:
            row = rows.setdefault(rec.name, MaskRow(rec.name))
            if rec.error:
                row.error = rec.error
                continue
            try:
                anns, row.report = source.read_annotations(rec)
            except PdsegError as exc:
                row.error = str(exc)
                continue
            loaded.append((rec, anns))
        try:
            cmap = build_class_map([a for _, anns in loaded for a in anns], classes, source.class_colors())
        except PdsegError as exc:
            failed = [f"{r.image}: {r.error}" for r in rows.values() if r.error]
            raise PdsegError("\n".join([str(exc), *failed])) from None
        task = progress.add_task("masks", total=len(loaded)) if progress else None
        for rec, anns in loaded:
            row = rows[rec.name]
            try:
                slide_mpp = rec.mpp or image_mpp
                if slide_mpp is None or rec.width is None or rec.height is None or overlay:
                    slide = open_slide(rec.path, mpp=rec.mpp, fallback_mpp=image_mpp) if rec.path else None
                    if slide is None:
                        raise PdsegError(f"{rec.name}: image is not a local file ({rec.uri})")
                    slide_mpp, size, reader = slide.mpp, (slide.width, slide.height), slide.read
                else:
                    slide, size, reader = None, (rec.width, rec.height), None
                sub = progress.add_task(f"  {rec.name}", total=None) if progress else None
                try:
                    row.stats = export_image_masks(
                        size, slide_mpp, anns, cmap, out_dir, rec.name, mpp=mpp, tile_size=tile_size,
                        on_tile=(lambda d, t: progress.update(sub, completed=d, total=t)) if progress else None,
                        overlay_reader=reader if overlay else None,
                    )
                finally:
                    if progress:
                        progress.remove_task(sub)
                    if slide is not None:
                        slide.close()
            except PdsegError as exc:
                row.error = str(exc)
            if progress:
                progress.advance(task)
        result = MasksResult(cmap, list(rows.values()))
        result.classes_json = write_classes_json(out_dir, cmap, mpp)
        return result
    finally:
        source.close()
