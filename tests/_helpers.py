"""Small conveniences the tests share (they once lived in the package, which does not need them)."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from pdseg_qupath.core.annotations import Annotation, ClassMap
from pdseg_qupath.core.grid import Window
from pdseg_qupath.core.metrics import Confusion, scores
from pdseg_qupath.core.raster import AnnotationIndex
from pdseg_qupath.learn.data import TrainingImage
from pdseg_qupath.learn.stitch import Strip, StripStitcher


def fake_images(class_sets: Sequence[set[str]]) -> list[TrainingImage]:
    """Training images named im0, im1, … each holding one tiny annotation per class in its set."""
    from types import SimpleNamespace

    from shapely.geometry import box

    return [TrainingImage(SimpleNamespace(name=f"im{i}"), [Annotation(box(0, 0, 4, 4), classification=c) for c in cs])
            for i, cs in enumerate(class_sets)]


def rasterize(annotations: Sequence[Annotation] | AnnotationIndex, class_map: ClassMap, window: Window) -> np.ndarray:
    """Label map of one window (an index is built when annotations are given)."""
    index = annotations if isinstance(annotations, AnnotationIndex) else AnnotationIndex(annotations, class_map)
    return index.rasterize(window)


def scores_from_labels(truth: np.ndarray, pred: np.ndarray, class_names: Sequence[str]) -> dict:
    """metrics.json scores of one pair of label arrays."""
    conf = Confusion(len(class_names))
    conf.update(truth, pred)
    return scores(conf, class_names)


def stitch_region(width: int, height: int, n_classes: int, tile: int, overlap: int,
                  infer: Callable[[Sequence[tuple[int, int]]], np.ndarray], *,
                  keep: Callable[[int, int], bool] | None = None, batch_size: int = 8,
                  offset: tuple[int, int] = (0, 0),
                  on_tiles: Callable[[int], None] | None = None) -> Iterator[Strip]:
    """The plain, single-threaded reference loop the streaming pipeline must reproduce exactly."""
    st = StripStitcher(width, height, n_classes, tile, overlap, offset)
    for y in st.row_ys:
        origins = [(x, y) for x in st.col_xs if keep is None or keep(x, y)]
        for i in range(0, len(origins), batch_size):
            batch = origins[i : i + batch_size]
            for (bx, by), lg in zip(batch, infer(batch)):
                st.add(bx, by, lg)
            if on_tiles is not None:
                on_tiles(len(batch))
        strip = st.finish_row()
        if strip is not None:
            yield strip
