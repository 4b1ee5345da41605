"""Predicting one slide: tissue, overlapping tiles, blended logits, objects with their areas.

Per image: detect tissue on a thumbnail; run the backbone and head on overlapping tiles at the model's
resolution, in batches; blend the logits strip by strip (:mod:`pdseg_qupath.learn.stitch`); turn each
band of final rows into polygons with their pixel counts and probability sums; merge the pieces cut at
band borders; make QuPath-ready objects (level-0 coordinates) with their area in µm² and mean
probability. Reading, inference and stitching/vectorizing overlap as stages (:mod:`.pipeline`).

Memory stays bounded for any slide size: one tile row of logits, one band of uint8 labels and float32
probabilities, the (vector) objects, and a ≤ 2048-px label canvas for overlays. No whole-slide array
exists at the work resolution.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import shapely
import torch
from scipy import ndimage

from pdseg_qupath.core.annotations import IGNORE, PDSEG_MARKER, Annotation, ClassMap
from pdseg_qupath.core.geometry import polygonal_part
from pdseg_qupath.core.grid import Window, grid_size
from pdseg_qupath.core.raster import polygons
from pdseg_qupath.core.tissue import TissueMap
from pdseg_qupath.learn.options import PredictOptions
from pdseg_qupath.learn.pipeline import count_tiles, run_region
from pdseg_qupath.learn.predictor import Predictor
from pdseg_qupath.learn.review import ReviewGrid
from pdseg_qupath.learn.stitch import Strip

AREA_MEASUREMENT = "pdseg: area µm^2"
PROB_MEASUREMENT = "pdseg: mean probability"
BAND_PIXELS = 16_000_000
"""Rows are vectorized in bands of about this many pixels (bounded memory, few merges)."""


# ------------------------------------------------------------------------------------------ results


@dataclass
class AreaRow:
    """Predicted area of one class on one image."""

    image: str
    class_name: str
    area_mm2: float
    objects: int
    mean_probability: float | None


class LabelCanvas:
    """A downsampled label map of a region, filled from prediction strips (nearest pixel).

    ``scale`` is an integer number of work pixels per canvas pixel, so that at most ``max_size``
    canvas pixels span the longer side. Overlays and class-map PNGs are drawn from it.
    """

    def __init__(self, width: int, height: int, max_size: int = 2048) -> None:
        self.width, self.height = width, height
        self.scale = max(1, math.ceil(max(width, height) / max_size))
        self.ow = max(1, math.ceil(width / self.scale))
        self.oh = max(1, math.ceil(height / self.scale))
        self.labels = np.full((self.oh, self.ow), IGNORE, dtype=np.uint8)
        self._cols = np.minimum((np.arange(self.ow) * self.scale + self.scale // 2), width - 1)
        self._rows = np.minimum((np.arange(self.oh) * self.scale + self.scale // 2), height - 1)

    def add_strip(self, y: int, labels: np.ndarray) -> None:
        """Take the canvas rows whose source rows lie in region rows ``[y, y + labels.shape[0])``."""
        sel = np.flatnonzero((self._rows >= y) & (self._rows < y + labels.shape[0]))
        if len(sel):
            self.labels[sel] = labels[self._rows[sel] - y][:, self._cols]

    def background(self, slide: Any, region: Window) -> np.ndarray:
        """The slide under the canvas (``region`` of the work grid), read at the canvas resolution."""
        s = self.scale
        win = Window(int(round(region.x / s)), int(round(region.y / s)), self.ow, self.oh, region.downsample * s)
        return slide.read(win)


@dataclass
class ImagePrediction:
    image: str
    annotations: list[Annotation]
    areas: list[AreaRow]
    canvas: LabelCanvas | None
    tiles: int
    seconds: float
    region: Window
    messages: list[str] = field(default_factory=list)
    tissue_mm2: float = 0.0
    """Area with a prediction (inside the tissue mask), before ``min_area_um2`` filtering."""
    class_mm2: dict[str, float] = field(default_factory=dict)
    """Predicted area of each class in mm², before ``min_area_um2`` filtering."""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Busy seconds per pipeline stage (see :func:`pdseg_qupath.learn.pipeline.run_region`)."""
    review: list[Annotation] = field(default_factory=list)
    """With ``review``: the ranked ``Review*`` regions, then the uncertainty map (detections)."""


# ---------------------------------------------------------------------------------------- objects


@dataclass
class _Piece:
    cls: int
    geom: Any
    pixels: int
    prob_sum: float
    open_edge: bool


class ObjectBuilder:
    """Polygons and their statistics from strips, vectorized band by band and merged at band borders."""

    def __init__(self, n_classes: int, width: int, x0: int, y0: int, downsample: float,
                 band_rows: int) -> None:
        self.k, self.width, self.x0, self.y0, self.d = n_classes, width, x0, y0, downsample
        self.band_rows = max(1, band_rows)
        self._strips: list[Strip] = []
        self._rows = 0
        self.pieces: list[_Piece] = []
        self.class_pixels = np.zeros(n_classes, dtype=np.int64)
        self.class_prob = np.zeros(n_classes, dtype=np.float64)

    def add(self, strip: Strip) -> None:
        self._strips.append(strip)
        self._rows += strip.height
        if self._rows >= self.band_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._strips:
            return
        y = self._strips[0].y
        labels = np.concatenate([s.labels for s in self._strips])
        prob = np.concatenate([s.prob for s in self._strips])
        self._strips, self._rows = [], 0
        self._vectorize(y, labels, prob)

    def _vectorize(self, y: int, labels: np.ndarray, prob: np.ndarray) -> None:
        comp = np.zeros(labels.shape, dtype=np.int32)
        n_total = 0
        owner: list[int] = [-1]
        for k in range(self.k):
            mask = labels == k
            if not mask.any():
                continue
            lab, n = ndimage.label(mask)  # 4-connectivity, as the vectorizer's
            comp[mask] = lab[mask] + n_total
            owner.extend([k] * n)
            n_total += n
        if n_total == 0:
            return
        counts = np.bincount(comp.ravel(), minlength=n_total + 1)
        psum = np.bincount(comp.ravel(), weights=prob.ravel().astype(np.float64), minlength=n_total + 1)
        edge = set(np.unique(comp[0]).tolist()) | set(np.unique(comp[-1]).tolist())
        owner_arr = np.array(owner)
        np.add.at(self.class_pixels, owner_arr[1:], counts[1:])
        np.add.at(self.class_prob, owner_arr[1:], psum[1:])
        window = Window(self.x0, self.y0 + y, self.width, labels.shape[0], self.d)
        for v, geom in polygons(comp, window, comp > 0).items():
            self.pieces.append(_Piece(int(owner_arr[v]), geom, int(counts[v]), float(psum[v]), v in edge))

    def finish(self) -> list[_Piece]:
        """All objects: pieces touching a band border are merged with their neighbours."""
        self._flush()
        done = [p for p in self.pieces if not p.open_edge]
        for k in range(self.k):
            group = [p for p in self.pieces if p.open_edge and p.cls == k]
            if not group:
                continue
            if len(group) == 1:
                done.append(group[0])
                continue
            merged = shapely.union_all([p.geom for p in group])
            parts = [g for g in shapely.get_parts(merged) if not g.is_empty]
            tree = shapely.STRtree(parts)
            stats = np.zeros((len(parts), 2))
            for p in group:
                hit = tree.query(p.geom.representative_point(), predicate="intersects")
                j = int(hit[0]) if len(hit) else 0
                stats[j] += (p.pixels, p.prob_sum)
            done.extend(_Piece(k, g, int(s[0]), float(s[1]), False) for g, s in zip(parts, stats))
        self.pieces = []  # the caller owns them now (and frees them while converting)
        return done


def _objects(pieces: list, model: Any, slide: Any, opts: PredictOptions) -> tuple[list[Annotation], list[AreaRow]]:
    cmap: ClassMap = model.class_map
    px_um2 = model.io.mpp**2
    min_px = opts.min_area_um2 / px_um2 if opts.min_area_um2 > 0 else 0.0
    tol = opts.simplify_um / slide.mpp  # µm → level-0 px (the one place --simplify becomes pixels)
    bounds = shapely.box(0, 0, slide.width, slide.height)  # the last work pixel may reach past the image edge
    anns: list[Annotation] = []
    per_class = {i: [0, 0, 0.0] for i in range(len(cmap))}  # objects, pixels, prob sum (kept objects)
    pieces.sort(key=lambda p: (p.cls, -p.pixels))
    for i in range(len(pieces)):
        p, pieces[i] = pieces[i], None  # let each unsimplified outline go as soon as it is converted
        if p.pixels < min_px:
            continue
        geom = shapely.simplify(p.geom, tol, preserve_topology=True) if tol > 0 else p.geom
        if not bounds.contains(geom):
            geom = polygonal_part(shapely.intersection(geom, bounds))
        if geom is None or geom.is_empty:
            continue
        c = cmap.classes[p.cls]
        area = p.pixels * px_um2
        mean_p = p.prob_sum / max(1, p.pixels)
        anns.append(Annotation(
            geometry=geom,
            classification=c.name,
            color=c.color,
            name=f"{PDSEG_MARKER} {c.name} [{model.model_id[:8]}]",
            measurements={AREA_MEASUREMENT: float(round(area, 3)), PROB_MEASUREMENT: float(round(mean_p, 4))},
            metadata={"pdseg_model": model.model_id, "pdseg_class_index": str(p.cls)},
        ))
        s = per_class[p.cls]
        s[0] += 1
        s[1] += p.pixels
        s[2] += p.prob_sum
    areas = [
        AreaRow(slide.name, cmap.classes[i].name, s[1] * px_um2 / 1e6, s[0], (s[2] / s[1]) if s[1] else None)
        for i, s in per_class.items()
    ]
    return anns, areas


# -------------------------------------------------------------------------------------- per image


def _tile_filter(slide: Any, region: Window, tile: int, opts: PredictOptions,
                 keep: Callable[[int, int], bool] | None, messages: list[str]):
    """(keep(x, y) on region tile origins or None, the tissue map or None)."""
    rx, ry = region.x, region.y
    if opts.tissue_only:
        tissue = TissueMap.detect(slide, region.downsample, opts.tissue_mpp, dilate=1)
        if tissue.fraction == 0:
            messages.append(f"{slide.name}: no tissue detected; nothing predicted (use --all to predict everywhere)")
        return (lambda x, y: tissue.any_in(rx + x, ry + y, tile) and (keep is None or keep(rx + x, ry + y))), tissue
    if keep is not None:
        return (lambda x, y: keep(rx + x, ry + y)), None
    return None, None


def predict_image(
    slide: Any,
    predictor: Predictor,
    *,
    options: PredictOptions | None = None,
    on_tiles: Callable[[int], None] | None = None,
    strip_sink: Callable[[Window, Strip], None] | None = None,
    region: Window | None = None,
    keep: Callable[[int, int], bool] | None = None,
    vectorize: bool = True,
    on_total: Callable[[int], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> ImagePrediction:
    """Predict one open slide (or a ``region`` of its work grid); objects in level-0 coordinates.

    ``keep(x, y)`` (absolute work-grid tile origin) can restrict tiles further; ``strip_sink`` sees
    every final strip (``evaluate`` scores them); ``vectorize=False`` skips building objects;
    ``on_total(n)`` learns how many tiles will run (after tissue detection), for progress bars;
    ``on_phase(name)`` hears each phase as it starts (``detecting tissue``, ``tiles``, ``vectorizing``),
    so the display can say what a silent step is doing.
    """
    opts = options or PredictOptions()
    model = predictor.model
    t0 = time.perf_counter()
    d = model.io.downsample(slide.mpp)
    if region is None:
        region = Window(0, 0, *grid_size(slide.width, slide.height, d), d)
    rx, ry = region.x, region.y
    tile, k = model.io.tile, len(model.class_map)
    messages: list[str] = list(getattr(slide, "notes", []))
    phase = on_phase or (lambda name: None)
    if opts.tissue_only:
        phase("detecting tissue")
    keep_fn, tissue = _tile_filter(slide, region, tile, opts, keep, messages)
    pin = predictor.device.startswith("cuda")

    def read(origins: Sequence[tuple[int, int]]):
        tiles = np.stack([slide.read(Window(rx + x, ry + y, tile, tile, d)) for x, y in origins])
        return torch.from_numpy(tiles).pin_memory() if pin else tiles

    def infer(tiles, origins: Sequence[tuple[int, int]]) -> np.ndarray:
        return predictor.logits(tiles, [(rx + x, ry + y) for x, y in origins])

    canvas = LabelCanvas(region.width, region.height, opts.overlay_max) if opts.canvas else None
    builder = ObjectBuilder(k, region.width, rx, ry, d, max(tile, BAND_PIXELS // max(1, region.width)))
    counts = np.zeros(k, dtype=np.int64)
    review = ReviewGrid(region, max(4, round(opts.review_size_um / model.io.mpp))) if opts.review > 0 else None
    stages: dict[str, float] = {}
    n_tiles = [0]

    def count(n: int) -> None:
        n_tiles[0] += n
        if on_tiles is not None:
            on_tiles(n)

    def on_strip(strip: Strip) -> None:
        if tissue is not None:
            strip.labels[~tissue.pixels(ry + strip.y, strip.height, rx, region.width)] = IGNORE
        counts[:] += np.bincount(strip.labels.ravel(), minlength=256)[:k]
        if strip_sink is not None:
            strip_sink(region, strip)
        if canvas is not None:
            canvas.add_strip(strip.y, strip.labels)
        if review is not None:
            review.add(strip)
        if vectorize:
            builder.add(strip)

    phase("tiles")
    if on_total is not None:
        on_total(count_tiles(region.width, region.height, tile, model.io.overlap, keep_fn, opts.grid_offset))
    run_region(region.width, region.height, k, tile, model.io.overlap, read, infer, on_strip, keep=keep_fn,
               batch_size=max(1, predictor.runner.batch_size), offset=opts.grid_offset, on_tiles=count,
               io_threads=opts.io_threads, prefetch=opts.prefetch, stage_seconds=stages)
    anns, areas = [], []
    if vectorize:
        phase("vectorizing")
        t_vec = time.perf_counter()
        anns, areas = _objects(builder.finish(), model, slide, opts)
        stages["objects"] = time.perf_counter() - t_vec
    px_mm2 = model.io.mpp**2 / 1e6
    return ImagePrediction(slide.name, anns, areas, canvas, n_tiles[0], time.perf_counter() - t0, region,
                           messages, tissue_mm2=float(counts.sum() * px_mm2),
                           class_mm2={c.name: float(counts[i] * px_mm2) for i, c in enumerate(model.class_map.classes)},
                           stage_seconds=stages,
                           review=review.objects(opts.review, model.model_id, (slide.width, slide.height))
                           if review is not None else [])
