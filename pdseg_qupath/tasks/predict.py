"""Predict whole slides with a trained model and write the results back (the ``predict`` command).

Per image: detect tissue on a thumbnail; run the backbone and head on overlapping tiles at the model's
resolution, in batches; blend the logits strip by strip (:mod:`pdseg_qupath.learn.stitch`); turn each band of
final rows into polygons with their pixel counts and probability sums; merge the pieces cut at band
borders; write QuPath objects (level-0 coordinates) with their area in µm² and mean probability.

Reading, inference and stitching/vectorizing overlap as stages (:mod:`pdseg_qupath.learn.pipeline`); batch
runs over many slides live in :mod:`pdseg_qupath.tasks.cohort`.

Memory stays bounded for any slide size: one tile row of logits, one band of uint8 labels and float32
probabilities, the (vector) objects, and a ≤ 2048-px overlay. No whole-slide array exists at the work
resolution.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import rasterio.features
import shapely
import torch
from rich.console import Console
from scipy import ndimage
from shapely.geometry import Polygon, shape

from pdseg_qupath.core.annotations import IGNORE, PDSEG_MARKER, Annotation, ClassMap
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.learn.cache import BatchRunner, resolve_device
from pdseg_qupath.core.grid import Window, grid_size
from pdseg_qupath.learn.modelio import SegModel, load_model
from pdseg_qupath.outputs.report import AreaRow, OverlayCanvas, areas_table, write_areas_csv
from pdseg_qupath.sources.base import AnnotationSource, WriteReport, select_images
from pdseg_qupath.learn.pipeline import run_region
from pdseg_qupath.learn.stitch import Strip

AREA_MEASUREMENT = "pdseg: area µm^2"
PROB_MEASUREMENT = "pdseg: mean probability"
BAND_PIXELS = 16_000_000
"""Rows are vectorized in bands of about this many pixels (bounded memory, few merges)."""


# ----------------------------------------------------------------------------------------- predictor


class Predictor:
    """A model with its backbone loaded: tiles in, logits out (batched, out-of-memory safe)."""

    def __init__(self, model: SegModel, device: str = "auto", batch_size: int = 8,
                 on_backoff: Callable[[int], None] | None = None) -> None:
        from pdseg_qupath.backbone.features import LDMFeatures
        from pdseg_qupath.backbone.model import describe, load_backbone

        self.model = model
        self.device = resolve_device(device)
        spec = model.backbone.get("spec")
        if not spec:
            raise PdsegError(f"{model.path}: model.json names no backbone spec")
        bb = load_backbone(spec, device=self.device)
        want, have = model.backbone.get("sha256"), getattr(bb, "sha256", None)
        if bool(model.backbone.get("random_weights")) != bool(bb.random_weights) or (want and want != have):
            raise PdsegError(
                f"{model.path}: the model was trained on backbone {spec!r} "
                f"({model.backbone.get('label')}, sha256 {want}), but {spec!r} now resolves to "
                f"{describe(bb)} (sha256 {have}). Install the backbone it was trained with, or retrain."
            )
        self.label = describe(bb)
        f = model.features
        self.extractor = LDMFeatures(bb, t=f.get("t"), blocks=f.get("blocks"), device=self.device,
                                     seed=int(f.get("seed", 0)))
        if self.extractor.channels != model.head.config.in_channels:
            raise PdsegError(f"{model.path}: the head expects {model.head.config.in_channels} feature channels, "
                             f"the backbone gives {self.extractor.channels}; retrain the model")
        self.head = model.head.to(self.device).eval()
        self.runner = BatchRunner(batch_size, on_backoff=on_backoff)

    def logits(self, tiles: np.ndarray | torch.Tensor, origins: Sequence[tuple[int, int]]) -> np.ndarray:
        """(B, K, T, T) float32 logits for uint8 tiles (B, T, T, 3) with work-grid top-left ``origins``.

        ``tiles`` may be a (pinned) torch tensor: the batch is copied to the device once, asynchronously.
        """
        x_all = torch.from_numpy(np.ascontiguousarray(tiles)) if isinstance(tiles, np.ndarray) else tiles
        x_all = x_all.to(self.device, non_blocking=True)

        def run(idx: list[int]) -> list[torch.Tensor]:
            with torch.no_grad():
                x = x_all[idx[0] : idx[-1] + 1]  # runner batches are contiguous index ranges
                feats = self.extractor.extract(x, origins=[origins[i] for i in idx]).float()
                outs = []
                for j in range(len(idx)):  # one tile at a time: the head's full-resolution activations
                    rgb = None             # (hidden × tile²) stay small whatever the batch size
                    if self.head.config.rgb_skip:
                        rgb = x[j : j + 1].permute(0, 3, 1, 2).float()
                    outs.append(self.head(feats[j : j + 1], rgb)[0].float())
            return outs

        out = self.runner(run, list(range(len(x_all))))
        return torch.stack(out).cpu().numpy()  # one device-to-host copy per batch


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
        h = labels.shape[0]
        comp = np.zeros(labels.shape, dtype=np.int32)
        n_total = 0
        owner: list[int] = [-1]
        for k in range(self.k):
            mask = labels == k
            if not mask.any():
                continue
            lab, n = ndimage.label(mask)  # 4-connectivity, as rasterio's shapes below
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
        window = Window(self.x0, self.y0 + y, self.width, h, self.d)
        parts: dict[int, list[Polygon]] = {}
        for g, v in rasterio.features.shapes(comp, mask=comp > 0, connectivity=4, transform=window.transform):
            parts.setdefault(int(v), []).append(shape(g))
        for v, polys in parts.items():
            geom = polys[0] if len(polys) == 1 else shapely.union_all(polys)
            if not geom.is_valid:
                geom = shapely.make_valid(geom)
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
            polys = [g for g in shapely.get_parts(merged) if not g.is_empty]
            tree = shapely.STRtree(polys)
            stats = np.zeros((len(polys), 2))
            for p in group:
                hit = tree.query(p.geom.representative_point(), predicate="intersects")
                j = int(hit[0]) if len(hit) else 0
                stats[j] += (p.pixels, p.prob_sum)
            done.extend(_Piece(k, g, int(s[0]), float(s[1]), False) for g, s in zip(polys, stats))
        self.pieces = []  # the caller owns them now (and frees them while converting)
        return done


# -------------------------------------------------------------------------------------- per image


@dataclass
class PredictOptions:
    batch_size: int = 8
    tissue_only: bool = True
    tissue_mpp: float | None = None
    """Resolution of the tissue mask; default: fine enough for ~2048 px on the slide's long side, at
    least 2 µm/px (small slides get a detailed outline, whole slides a cheap thumbnail)."""
    simplify: float = 1.0
    """Simplification tolerance in work-resolution pixels (0 keeps the pixel staircase)."""
    min_area_um2: float = 0.0
    overlay: bool = True
    overlay_max: int = 2048
    grid_offset: tuple[int, int] = (0, 0)
    io_threads: int = 2
    """Tile-reading threads that run ahead of the backbone (0: read, infer and stitch in one thread)."""
    prefetch: int = 3
    """Batches in flight between the stages (bounds host memory)."""


@dataclass
class ImagePrediction:
    image: str
    annotations: list[Annotation]
    areas: list[AreaRow]
    overlay: OverlayCanvas | None
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


def tissue_mask_mpp(slide) -> float:
    """Default tissue-mask resolution for a slide (see :attr:`PredictOptions.tissue_mpp`)."""
    return max(2.0, max(slide.width, slide.height) * slide.mpp / 2048)


def _tissue_lookup(slide, mpp: float, d: float):
    """(keep_tile, pixel_mask, tissue fraction) from a thumbnail tissue mask dilated by one mask pixel.

    Pixels are looked up by bilinear interpolation of the mask (threshold 0.5), so the outline is
    smooth at the work resolution instead of blocky at the mask's.
    """
    from pdseg_qupath.core.slide import tissue_mask

    mask, md = tissue_mask(slide, mpp)
    mask = ndimage.binary_dilation(mask, iterations=1)
    mh, mw = mask.shape
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    soft = mask.astype(np.float32)

    def keep(x: int, y: int, size: int) -> bool:
        x0 = min(mw, max(0, int(math.floor(x * d / md))))
        y0 = min(mh, max(0, int(math.floor(y * d / md))))
        x1 = min(mw, max(0, int(math.ceil((x + size) * d / md))))
        y1 = min(mh, max(0, int(math.ceil((y + size) * d / md))))
        if x1 <= x0 or y1 <= y0:
            return False
        return bool(integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0] > 0)

    def pixels(y: int, h: int, x0: int, w: int) -> np.ndarray:
        rows = (np.arange(y, y + h) + 0.5) * d / md - 0.5
        cols = (np.arange(x0, x0 + w) + 0.5) * d / md - 0.5
        rr, cc = np.meshgrid(rows.astype(np.float32), cols.astype(np.float32), indexing="ij")
        return ndimage.map_coordinates(soft, [rr, cc], order=1, mode="nearest") >= 0.5

    return keep, pixels, float(mask.mean())


def predict_image(
    slide,
    predictor: Predictor,
    *,
    options: PredictOptions | None = None,
    on_tiles: Callable[[int], None] | None = None,
    strip_sink: Callable[[Window, Strip], None] | None = None,
    region: Window | None = None,
    keep: Callable[[int, int], bool] | None = None,
    vectorize: bool = True,
    on_total: Callable[[int], None] | None = None,
) -> ImagePrediction:
    """Predict one open slide (or a ``region`` of its work grid); objects in level-0 coordinates.

    ``keep(x, y)`` (absolute work-grid tile origin) can restrict tiles further; ``strip_sink`` sees
    every final strip (``evaluate`` scores them); ``vectorize=False`` skips building objects;
    ``on_total(n)`` learns how many tiles will run (after tissue detection), for progress bars.
    """
    opts = options or PredictOptions()
    model = predictor.model
    t0 = time.perf_counter()
    d = model.mpp / slide.mpp
    gw, gh = grid_size(slide.width, slide.height, d)
    if region is None:
        region = Window(0, 0, gw, gh, d)
    rx, ry = region.x, region.y
    tile, k = model.tile_size, len(model.class_map)
    messages: list[str] = []
    tissue_px = None
    keep_fn = None
    if opts.tissue_only:
        tkeep, tissue_px, frac = _tissue_lookup(slide, opts.tissue_mpp or tissue_mask_mpp(slide), d)
        if frac == 0:
            messages.append(f"{slide.name}: no tissue detected; nothing predicted (use --all to predict everywhere)")
        keep_fn = lambda x, y: tkeep(rx + x, ry + y, tile) and (keep is None or keep(rx + x, ry + y))  # noqa: E731
    elif keep is not None:
        keep_fn = lambda x, y: keep(rx + x, ry + y)  # noqa: E731

    pin = predictor.device.startswith("cuda")

    def read(origins: Sequence[tuple[int, int]]):
        tiles = np.stack([slide.read(Window(rx + x, ry + y, tile, tile, d)) for x, y in origins])
        return torch.from_numpy(tiles).pin_memory() if pin else tiles

    def infer(tiles, origins: Sequence[tuple[int, int]]) -> np.ndarray:
        return predictor.logits(tiles, [(rx + x, ry + y) for x, y in origins])

    overlay = OverlayCanvas(region.width, region.height, opts.overlay_max) if opts.overlay else None
    builder = ObjectBuilder(k, region.width, rx, ry, d, max(tile, BAND_PIXELS // max(1, region.width)))
    counts = np.zeros(k, dtype=np.int64)
    stages: dict[str, float] = {}
    n_tiles = [0]

    def count(n: int) -> None:
        n_tiles[0] += n
        if on_tiles is not None:
            on_tiles(n)

    def on_strip(strip: Strip) -> None:
        if tissue_px is not None:
            strip.labels[~tissue_px(ry + strip.y, strip.height, rx, region.width)] = IGNORE
        counts[:] += np.bincount(strip.labels.ravel(), minlength=256)[:k]
        if strip_sink is not None:
            strip_sink(region, strip)
        if overlay is not None:
            overlay.add_strip(strip.y, strip.labels)
        if vectorize:
            builder.add(strip)

    if on_total is not None:
        from pdseg_qupath.learn.pipeline import count_tiles

        on_total(count_tiles(region.width, region.height, tile, model.overlap, keep_fn, opts.grid_offset))
    run_region(region.width, region.height, k, tile, model.overlap, read, infer, on_strip, keep=keep_fn,
               batch_size=max(1, predictor.runner.batch_size), offset=opts.grid_offset, on_tiles=count,
               io_threads=opts.io_threads, prefetch=opts.prefetch, stage_seconds=stages)
    anns: list[Annotation] = []
    areas: list[AreaRow] = []
    if vectorize:
        t_vec = time.perf_counter()
        pieces = builder.finish()
        anns, areas = _objects(pieces, model, slide, opts, builder)
        stages["objects"] = time.perf_counter() - t_vec
    px_mm2 = model.mpp**2 / 1e6
    return ImagePrediction(slide.name, anns, areas, overlay, n_tiles[0], time.perf_counter() - t0, region,
                           messages, tissue_mm2=float(counts.sum() * px_mm2),
                           class_mm2={c.name: float(counts[i] * px_mm2) for i, c in enumerate(model.class_map.classes)},
                           stage_seconds=stages)


def _objects(pieces, model: SegModel, slide, opts: PredictOptions, builder: ObjectBuilder):
    cmap: ClassMap = model.class_map
    px_um2 = model.mpp**2
    min_px = opts.min_area_um2 / px_um2 if opts.min_area_um2 > 0 else 0.0
    tol = opts.simplify * model.mpp / slide.mpp  # work px → level-0 px
    anns: list[Annotation] = []
    per_class = {i: [0, 0, 0.0] for i in range(len(cmap))}  # objects, pixels, prob sum (kept objects)
    pieces.sort(key=lambda p: (p.cls, -p.pixels))
    for i in range(len(pieces)):
        p, pieces[i] = pieces[i], None  # let each unsimplified outline go as soon as it is converted
        if p.pixels < min_px:
            continue
        geom = shapely.simplify(p.geom, tol, preserve_topology=True) if tol > 0 else p.geom
        if geom.is_empty:
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


def overlay_background(slide, region: Window, canvas: OverlayCanvas) -> np.ndarray:
    """The slide under an overlay canvas, read at the canvas resolution."""
    s = canvas.scale
    win = Window(int(round(region.x / s)), int(round(region.y / s)), canvas.ow, canvas.oh, region.downsample * s)
    return slide.read(win)


# ------------------------------------------------------------------------------------------ source


@dataclass
class ImageResult:
    image: str
    error: str | None = None
    objects: int = 0
    tiles: int = 0
    seconds: float = 0.0
    areas: list[AreaRow] = field(default_factory=list)
    write: WriteReport | None = None
    geojson: Path | None = None
    overlay: Path | None = None
    messages: list[str] = field(default_factory=list)


@dataclass
class PredictResult:
    images: list[ImageResult]
    model: SegModel
    backbone_label: str
    areas_csv: Path | None
    tiles: int
    seconds: float

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    @property
    def failed(self) -> list[ImageResult]:
        return [r for r in self.images if r.error]


def predict_source(
    source: AnnotationSource,
    model: str | Path | SegModel,
    *,
    images: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 8,
    tissue_only: bool = True,
    image_mpp: float | None = None,
    simplify: float = 1.0,
    min_area_um2: float = 0.0,
    write_back: bool = True,
    areas_csv: str | Path | None = None,
    progress=None,
    console: Console | None = None,
) -> PredictResult:
    """Predict the images of ``source`` and write the objects back (and to ``out_dir`` as GeoJSON).

    - write-back goes through ``source.write_predictions`` (a project: objects in QuPath, backed up
      first; a folder: ``pdseg/predictions/<image>.geojson``), unless ``write_back`` is False;
    - with ``out_dir``: ``<image>.geojson`` (QuPath GeoJSON), ``<image>.overlay.png`` and the areas CSV;
    - the areas CSV goes to ``areas_csv``, else ``out_dir/areas.csv``, else ``<source root>/pdseg/areas.csv``.
    An image that cannot be read is reported and skipped; the others go on.
    """
    from pdseg_qupath.sources.qupath.geojson import write_geojson
    from pdseg_qupath.sources.qupath.names import safe_filename
    from pdseg_qupath.core.slide import open_slide

    console = console or Console()
    m = model if isinstance(model, SegModel) else load_model(model)
    predictor = Predictor(m, device, batch_size, on_backoff=lambda b: console.print(
        f"[yellow]out of GPU memory: retrying with batch size {b}"))
    console.print(f"model {m.name} ({m.model_id[:8]}): {', '.join(m.class_map.names)} at {m.mpp:g} µm/px · "
                  f"backbone: {predictor.label}")
    opts = PredictOptions(batch_size=batch_size, tissue_only=tissue_only, simplify=simplify,
                          min_area_um2=min_area_um2, overlay=out_dir is not None)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    records = select_images(source.images(), images or None)
    results: list[ImageResult] = []
    total_tiles, t_all = 0, time.perf_counter()
    task = progress.add_task("predict", total=None) if progress is not None else None
    for rec in records:
        res = ImageResult(rec.name)
        results.append(res)
        if rec.error or rec.path is None:
            res.error = rec.error or f"not a local file ({rec.uri})"
            console.print(f"[red]{rec.name}: skipped ({res.error})")
            continue
        try:
            slide = open_slide(rec.path, mpp=rec.mpp, fallback_mpp=image_mpp)
        except PdsegError as exc:
            res.error = str(exc)
            console.print(f"[red]{rec.name}: skipped ({exc})")
            continue
        try:
            if progress is not None:
                progress.update(task, description=f"predict {rec.name}", total=None, completed=0)
            pred = predict_image(
                slide, predictor, options=opts,
                on_tiles=(lambda n: progress.advance(task, n)) if progress is not None else None,
                on_total=(lambda n: progress.update(task, total=n)) if progress is not None else None)
            res.objects, res.tiles, res.seconds, res.areas = len(pred.annotations), pred.tiles, pred.seconds, pred.areas
            res.messages += pred.messages
            total_tiles += pred.tiles
            for msg in pred.messages:
                console.print(f"[yellow]{msg}")
            if out is not None:
                res.geojson = out / f"{safe_filename(rec.name)}.geojson"
                write_geojson(res.geojson, pred.annotations)
                if pred.overlay is not None:
                    res.overlay = pred.overlay.render(
                        overlay_background(slide, pred.region, pred.overlay), m.class_map,
                        out / f"{safe_filename(rec.name)}.overlay.png",
                        title=f"{rec.name} · pdseg {m.name} · {predictor.label}")
            if write_back:
                try:
                    res.write = source.write_predictions(rec, pred.annotations)
                except PdsegError as exc:
                    res.messages.append(f"write-back failed: {exc}")
                    console.print(f"[red]{rec.name}: predictions not written back ({exc})")
        finally:
            slide.close()
    seconds = time.perf_counter() - t_all
    rows = [a for r in results for a in r.areas]
    csv_path = Path(areas_csv) if areas_csv is not None else (out / "areas.csv" if out is not None else None)
    if csv_path is None and getattr(source, "root", None) is not None:
        csv_path = Path(source.root) / "pdseg" / "areas.csv"  # type: ignore[attr-defined]
    if csv_path is None and getattr(source, "path", None) is not None:
        p = Path(source.path)  # type: ignore[attr-defined]
        csv_path = (p.parent if p.suffix == ".qpproj" else p) / "pdseg" / "areas.csv"
    if rows and csv_path is not None:
        write_areas_csv(rows, csv_path)
    if rows:
        console.print(areas_table(rows))
    return PredictResult(results, m, predictor.label, csv_path if rows else None, total_tiles, seconds)
