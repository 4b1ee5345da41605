"""Training data: the images of a source with their usable annotations, open slides and class map."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from pdseg_qupath.core.annotations import (
    Annotation,
    ClassInfo,
    ClassMap,
    LabelCount,
    outside_image,
    outside_message,
    training_labels,
)
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.raster import AnnotationIndex
from pdseg_qupath.core.slide import Slide, open_slide
from pdseg_qupath.sources.base import AnnotationSource, ImageRecord, require_pixel_sizes, select_images


@dataclass
class TrainingImage:
    """An annotated image ready to sample: its record, annotations, open slide and raster index."""

    record: ImageRecord
    annotations: list[Annotation]
    slide: Slide | Any = None
    index: AnnotationIndex | None = None
    labels: LabelCount = field(default_factory=LabelCount)
    """Drawn, corrected and accepted objects taken as labels; untouched predictions left out."""


def label_objects(annotations: Sequence[Annotation]) -> tuple[list[Annotation], LabelCount]:
    """The classified area objects that are labels (never an untouched pdseg prediction), and their roles."""
    areas = [a for a in annotations if a.object_type == "annotation" and a.classification]
    return training_labels(areas)


def total_labels(images: Sequence[TrainingImage]) -> LabelCount:
    total = LabelCount()
    for im in images:
        total.add(im.labels)
    return total


def source_class_map(annotations: Sequence[Annotation], names: Sequence[str] | None,
                     colors: dict[str, tuple[int, int, int]]) -> ClassMap:
    """The class map of a whole source (``names`` order, else all classes used, sorted); the source's
    own class colours (QuPath's project classes) win over per-file ones."""
    try:
        cmap = ClassMap.from_annotations(annotations, names)
    except ValueError as exc:
        raise PdsegError(f"--classes: {exc}") from None
    return ClassMap(tuple(ClassInfo(c.name, tuple(colors.get(c.name, c.color))) for c in cmap.classes))  # type: ignore[arg-type]


def load_training_images(
    source: AnnotationSource,
    *,
    image_mpp: float | None,
    classes: Sequence[str] | None,
    messages: list[str],
    names: Sequence[str] | None = None,
) -> tuple[list[TrainingImage], ClassMap]:
    """Images with usable annotations, and the class map. Unusable images are reported, not fatal."""
    images: list[TrainingImage] = []
    for rec in select_images(source.images(), names):
        if rec.error:
            messages.append(f"{rec.name}: skipped ({rec.error})")
            continue
        anns, report = source.read_annotations(rec)
        for m in report.messages[:5]:
            messages.append(f"{rec.name}: {m}")
        if report.skipped:
            messages.append(f"{rec.name}: {report.skipped} point/line/empty object(s) carry no area and were skipped")
        areas, roles = label_objects(anns)
        if not any(not a.is_ignore for a in areas):
            why = f" ({roles.untouched} untouched prediction(s) are not labels)" if roles.untouched else ""
            messages.append(f"{rec.name}: no classified annotations{why}; not used for training")
            continue
        images.append(TrainingImage(rec, areas, labels=roles))
    if not images:
        raise PdsegError(
            "no image of the source has classified annotations to train on; draw and classify some "
            "areas in QuPath (or check the <image>.geojson files), then train again"
        )
    cmap = source_class_map([a for im in images for a in im.annotations], classes, source.class_colors())
    if len(cmap) < 2:
        raise PdsegError(
            f"only one class ({cmap.names[0] if len(cmap) else 'none'}) is annotated; a segmentation model "
            "needs at least two (annotate e.g. the background or other tissue too)"
        )
    require_pixel_sizes([im.record for im in images], image_mpp)
    for im in images:
        if im.record.path is None:
            raise PdsegError(f"{im.record.name}: its image is not a local file ({im.record.uri})")
        im.slide = open_slide(im.record.path, mpp=im.record.mpp, fallback_mpp=image_mpp)
        messages.extend(im.slide.notes)
        away = outside_image(im.annotations, im.slide.width, im.slide.height)
        if away:
            messages.append(outside_message(im.record.name, len(away), im.slide.width, im.slide.height))
        im.index = AnnotationIndex(im.annotations, cmap)
        for name, n in im.index.skipped_unknown.items():
            messages.append(f"{im.record.name}: {n} annotation(s) of class {name!r} are not in the class list; ignored")
    return images, cmap


def close_images(images: Sequence[TrainingImage]) -> None:
    for im in images:
        if im.slide is not None:
            im.slide.close()
