"""Score a model against annotations (the ``evaluate`` command): only annotated pixels count.

For each image, the model predicts the tiles that meet an annotation (nothing else is needed to score),
with the same stitching as ``predict``; each final strip is compared with the rasterized annotations
of the same rows and added to one confusion matrix. Outputs in the report folder:

- ``metrics.json``: per-class Dice/IoU/pixels, accuracy, mIoU, macro Dice (plus per-image scores);
- ``confusion.png``: the row-normalised confusion matrix;
- ``overlays/<image>.overlay.png``: over the tissue of the annotated region, the prediction (class
  colour, outlined) on the annotated pixels, and the annotations' own outlines in black, so that
  disagreements show at a glance.

Annotation classes the model does not know are not scored; they are counted and named in the report.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import shapely
from rich.console import Console

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.grid import Window, grid_size
from pdseg_qupath.core.metrics import Confusion, scores
from pdseg_qupath.learn.modelio import SegModel, load_model
from pdseg_qupath.tasks.predict import PredictOptions, Predictor, overlay_background, predict_image
from pdseg_qupath.outputs.report import OverlayCanvas, render_overlay, scores_table, write_confusion_png, write_json
from pdseg_qupath.sources.base import AnnotationSource, select_images


def evaluate(
    source: AnnotationSource,
    model: str | Path | SegModel,
    report_dir: str | Path,
    *,
    images: Sequence[str] | None = None,
    device: str = "auto",
    batch_size: int = 8,
    image_mpp: float | None = None,
    overlays: bool = True,
    notes: Sequence[str] = (),
    progress=None,
    console: Console | None = None,
) -> dict:
    """Score ``model`` on the annotated pixels of ``source``; write the report; return metrics.json."""
    from pdseg_qupath.sources.qupath.names import safe_filename
    from pdseg_qupath.core.raster import AnnotationIndex
    from pdseg_qupath.core.slide import open_slide

    console = console or Console()
    m = model if isinstance(model, SegModel) else load_model(model)
    cmap = m.class_map
    predictor = Predictor(m, device, batch_size)
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    total = Confusion(len(cmap))
    per_image: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    unknown: dict[str, int] = {}
    tiles = 0
    records = select_images(source.images(), images or None)
    task = progress.add_task("evaluate", total=None) if progress is not None else None
    for rec in records:
        if rec.error or rec.path is None:
            skipped[rec.name] = rec.error or "not a local file"
            continue
        anns, _ = source.read_annotations(rec)
        anns = [a for a in anns if a.object_type == "annotation" and a.classification]
        index = AnnotationIndex(anns, cmap)
        for name, n in index.skipped_unknown.items():
            unknown[name] = unknown.get(name, 0) + n
        scored = [g for g, v in zip(index.geometries, index.labels) if v < len(cmap)]
        if not scored:
            skipped[rec.name] = "no annotations of the model's classes"
            continue
        try:
            slide = open_slide(rec.path, mpp=rec.mpp, fallback_mpp=image_mpp)
        except PdsegError as exc:
            skipped[rec.name] = str(exc)
            continue
        try:
            d = m.mpp / slide.mpp
            gw, gh = grid_size(slide.width, slide.height, d)
            minx, miny, maxx, maxy = shapely.total_bounds(np.array(scored, dtype=object))
            stride = 4
            x0 = max(0, int(np.floor(minx / d)) // stride * stride)
            y0 = max(0, int(np.floor(miny / d)) // stride * stride)
            x1, y1 = min(gw, int(np.ceil(maxx / d))), min(gh, int(np.ceil(maxy / d)))
            if x1 <= x0 or y1 <= y0:
                skipped[rec.name] = "annotations lie outside the image"
                continue
            region = Window(x0, y0, x1 - x0, y1 - y0, d)
            conf = Confusion(len(cmap))
            canvas = OverlayCanvas(region.width, region.height) if overlays else None
            truth_canvas = OverlayCanvas(region.width, region.height) if overlays else None

            def sink(reg: Window, strip) -> None:
                truth = index.rasterize(Window(reg.x, reg.y + strip.y, reg.width, strip.height, d))
                conf.update(truth, strip.labels)
                if canvas is not None:
                    canvas.add_strip(strip.y, np.where(truth < len(cmap), strip.labels, 255).astype(np.uint8))
                    truth_canvas.add_strip(strip.y, truth)

            tile = m.tile_size
            keep = lambda x, y: index.intersects(Window(x, y, tile, tile, d))  # noqa: E731
            if progress is not None:
                progress.update(task, description=f"evaluate {rec.name}", total=None, completed=0)
            pred = predict_image(
                slide, predictor, options=PredictOptions(batch_size=batch_size, tissue_only=False, overlay=False),
                region=region, keep=keep, strip_sink=sink, vectorize=False,
                on_tiles=(lambda n: progress.advance(task, n)) if progress is not None else None,
                on_total=(lambda n: progress.update(task, total=n)) if progress is not None else None,
            )
            tiles += pred.tiles
            total.merge(conf)
            per_image[rec.name] = {k: v for k, v in scores(conf, cmap.names).items() if k != "confusion"}
            if canvas is not None:
                (out / "overlays").mkdir(exist_ok=True)
                render_overlay(overlay_background(slide, region, canvas), canvas.labels, cmap,
                               out / "overlays" / f"{safe_filename(rec.name)}.overlay.png",
                               reference=truth_canvas.labels,
                                    title=f"{rec.name} · pdseg {m.name} · {predictor.label}")
        finally:
            slide.close()
    if not per_image:
        detail = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "the source has no images"
        raise PdsegError(f"nothing to evaluate: no image has annotations of the model's classes ({detail})")
    metrics = scores(total, cmap.names)
    metrics.update({
        "per_image": per_image,
        "skipped_images": skipped,
        "unscored_annotation_classes": unknown,
        "model": {"path": str(m.path) if m.path else None, "model_id": m.model_id, "mpp": m.mpp,
                  "classes": cmap.names},
        "backbone": predictor.label,
        "tiles": tiles,
        "seconds": round(time.perf_counter() - t0, 2),
        "notes": list(notes),
    })
    write_json(out / "metrics.json", metrics)
    write_confusion_png(np.array(metrics["confusion"]), cmap.names, out / "confusion.png")
    console.print(scores_table(metrics, f"evaluation of {m.name} · {predictor.label}"))
    for n in notes:
        console.print(f"[cyan]{n}")
    for name, why in skipped.items():
        console.print(f"[yellow]{name}: not scored ({why})")
    if unknown:
        console.print(f"[yellow]annotation classes not in the model, not scored: {unknown}")
    return metrics
