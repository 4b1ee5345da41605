"""``evaluate``: score a model against annotations; only annotated pixels count.

The steps of :func:`evaluate`:

1. **Model.** Load it with its backbone on the device.
2. **Each image.** Predict the tiles that meet an annotation (nothing else is needed to score), with the
   same stitching as ``predict``; compare each final strip with the rasterized annotations of the same
   rows, into one confusion matrix; draw the overlay.
3. **Report.** In the report folder:

   - ``metrics.json``: per-class Dice/IoU/pixels, accuracy, mIoU, macro Dice (plus per-image scores);
   - ``confusion.png``: the row-normalised confusion matrix;
   - ``overlays/<image>.overlay.png``: over the tissue of the annotated region, the prediction (class
     colour, outlined) on the annotated pixels, and the annotations' own outlines in black, so that
     disagreements show at a glance.

Annotation classes the model does not know are not scored; they are counted and named in the report.

Two rules keep the scores honest:

- **Held-out images.** Images the model was trained on (``training.train_images`` in its model.json) are
  left out, with a warning, unless ``include_training`` (then the report says the scores are optimistic).
- **The tissue ``predict`` sees.** ``predict`` writes objects only where it detects tissue, so the main
  scores count annotated pixels inside the same tissue mask; annotated pixels on glass are scored
  separately (``all_annotated``) and their share is reported, since they never become objects.
  pdseg's own untouched predictions are never ground truth (see :func:`~pdseg_qupath.learn.data.label_objects`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import shapely

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.events import SILENT, Events
from pdseg_qupath.core.fileio import write_json
from pdseg_qupath.core.grid import Window, grid_size
from pdseg_qupath.core.metrics import Confusion, scores
from pdseg_qupath.core.names import output_name
from pdseg_qupath.core.raster import AnnotationIndex
from pdseg_qupath.core.slide import open_slide
from pdseg_qupath.core.tissue import TissueMap
from pdseg_qupath.learn.data import label_objects
from pdseg_qupath.learn.inference import LabelCanvas, predict_image
from pdseg_qupath.learn.modelio import SegModel
from pdseg_qupath.learn.options import PredictOptions
from pdseg_qupath.learn.predictor import Predictor
from pdseg_qupath.outputs.overlay import render_overlay
from pdseg_qupath.outputs.plots import write_confusion_png
from pdseg_qupath.sources.base import AnnotationSource, ImageRecord, require_pixel_sizes, select_images
from pdseg_qupath.tasks.predict import open_predictor


@dataclass
class _Tally:
    """What the images added up to."""

    total: Confusion
    everywhere: Confusion
    """Every annotated pixel, tissue or glass (what the main scores leave out on glass)."""
    tissue_only: bool = True
    tissue_mpp: float | None = None
    per_image: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    unknown: dict[str, int] = field(default_factory=dict)
    tiles: int = 0


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
    include_training: bool = False,
    tissue_only: bool = True,
    events: Events = SILENT,
) -> dict:
    """Score ``model`` on the annotated pixels of ``source``; write the report; return metrics.json.

    Images the model was trained on are skipped unless ``include_training``; with ``tissue_only`` (as
    ``predict``) the main scores count only annotated pixels inside the detected tissue.
    """
    # 1. The model (once the images' pixel sizes are known).
    records = select_images(source.images(), images or None)
    require_pixel_sizes(records, image_mpp)
    predictor = open_predictor(model, device, batch_size, events)
    m = predictor.model
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    notes = list(notes)
    # 2. Each image (held out from training unless asked).
    tally = _Tally(Confusion(len(m.class_map)), Confusion(len(m.class_map)), tissue_only,
                   PredictOptions().tissue_mpp)
    trained = set((m.training or {}).get("train_images") or [])
    used = sorted(r.name for r in records if r.name in trained)
    if used and include_training:
        notes.append(f"{len(used)} image(s) were used to train this model ({', '.join(used[:5])}"
                     f"{', …' if len(used) > 5 else ''}): their scores are optimistic")
        events.message(notes[-1], "warn")
    elif used:
        records = [r for r in records if r.name not in trained]
        events.message(f"left out {len(used)} image(s) the model was trained on ({', '.join(used[:5])}"
                       f"{', …' if len(used) > 5 else ''}); evaluate on held-out images, or pass "
                       "--include-training to score them anyway (optimistic)", "warn")
        if not records:
            raise PdsegError("nothing to evaluate: every image was used to train the model; annotate held-out "
                             "images, or pass --include-training (optimistic scores)")
    step = events.step("evaluate")
    for rec in records:
        why = _score_image(source, rec, predictor, image_mpp, out if overlays else None, tally, step)
        if why:
            tally.skipped[rec.name] = why
    step.close()
    if not tally.per_image:
        detail = "; ".join(f"{k}: {v}" for k, v in tally.skipped.items()) or "the source has no images"
        raise PdsegError(f"nothing to evaluate: no image has annotations of the model's classes ({detail})")
    # 3. The report.
    metrics = scores(tally.total, m.class_map.names)
    everywhere = int(tally.everywhere.matrix.sum())
    glass = everywhere - int(tally.total.matrix.sum())
    if tissue_only:
        metrics["scored_within"] = "detected tissue, as predict"
        metrics["outside_tissue_share"] = round(glass / everywhere, 4) if everywhere else 0.0
        metrics["all_annotated"] = {k: v for k, v in scores(tally.everywhere, m.class_map.names).items()
                                    if k != "confusion"}
        if everywhere and glass / everywhere > 0.05:
            notes.append(f"{glass / everywhere:.0%} of the annotated pixels lie outside the tissue predict detects "
                         f"(glass): scored without them, as predict writes no objects there; with them, macro "
                         f"Dice {metrics['all_annotated']['macro_dice']:.3f} (see all_annotated)")
    metrics.update({
        "excluded_training_images": [] if include_training else used,
        "per_image": tally.per_image,
        "skipped_images": tally.skipped,
        "unscored_annotation_classes": tally.unknown,
        "model": {"path": str(m.path) if m.path else None, "model_id": m.model_id, "mpp": m.io.mpp,
                  "classes": m.class_map.names},
        "backbone": predictor.label,
        "tiles": tally.tiles,
        "seconds": round(time.perf_counter() - t0, 2),
        "notes": list(notes),
    })
    with events.step("writing the report"):
        write_json(out / "metrics.json", metrics)
        write_confusion_png(np.array(metrics["confusion"]), m.class_map.names, out / "confusion.png")
    events.show("scores", (f"evaluation of {m.name} · {predictor.label}", metrics))
    for n in notes:
        events.message(n, "note")
    for name, why in tally.skipped.items():
        events.message(f"{name}: not scored ({why})", "warn")
    if tally.unknown:
        events.message(f"annotation classes not in the model, not scored: {tally.unknown}", "warn")
    return metrics


def _score_image(source: AnnotationSource, rec: ImageRecord, predictor: Predictor, image_mpp: float | None,
                 overlays: Path | None, tally: _Tally, step: Any) -> str | None:
    """Add one image to the tally; returns why it was not scored, or None."""
    m = predictor.model
    cmap = m.class_map
    if rec.error or rec.path is None:
        return rec.error or "not a local file"
    step.describe(f"{rec.name} · reading annotations")
    anns, _ = source.read_annotations(rec)
    labels, _roles = label_objects(anns)  # pdseg's own untouched predictions are never ground truth
    index = AnnotationIndex(labels, cmap)
    for name, n in index.skipped_unknown.items():
        tally.unknown[name] = tally.unknown.get(name, 0) + n
    scored = [g for g, v in zip(index.geometries, index.labels) if v < len(cmap)]
    if not scored:
        return "no annotations of the model's classes"
    try:
        slide = open_slide(rec.path, mpp=rec.mpp, fallback_mpp=image_mpp)
    except PdsegError as exc:
        return str(exc)
    with slide:
        d = m.io.downsample(slide.mpp)
        region = _annotated_region(scored, d, grid_size(slide.width, slide.height, d), m.io.snap)
        if region is None:
            return "annotations lie outside the image"
        conf, everywhere = Confusion(len(cmap)), Confusion(len(cmap))
        step.describe(f"{rec.name} · detecting tissue")
        tissue = TissueMap.detect(slide, d, tally.tissue_mpp, dilate=1) if tally.tissue_only else None
        canvas = LabelCanvas(region.width, region.height) if overlays else None
        truth_canvas = LabelCanvas(region.width, region.height) if overlays else None

        def sink(reg: Window, strip) -> None:
            truth = index.rasterize(Window(reg.x, reg.y + strip.y, reg.width, strip.height, d))
            everywhere.update(truth, strip.labels)
            if tissue is not None:  # predict writes nothing off the tissue: score as it would
                truth = np.where(tissue.pixels(reg.y + strip.y, strip.height, reg.x, reg.width), truth, 255)
                truth = truth.astype(np.uint8)
            conf.update(truth, strip.labels)
            if canvas is not None:
                canvas.add_strip(strip.y, np.where(truth < len(cmap), strip.labels, 255).astype(np.uint8))
                truth_canvas.add_strip(strip.y, truth)

        tile = m.io.tile
        step.describe(rec.name)
        step.set_total(None, done=0)
        pred = predict_image(
            slide, predictor, options=PredictOptions(batch_size=predictor.runner.batch_size, tissue_only=False),
            region=region, keep=lambda x, y: index.intersects(Window(x, y, tile, tile, d)), strip_sink=sink,
            vectorize=False, on_tiles=step.advance, on_total=lambda n: step.set_total(n, done=0))
        tally.tiles += pred.tiles
        tally.total.merge(conf)
        tally.everywhere.merge(everywhere)
        tally.per_image[rec.name] = {k: v for k, v in scores(conf, cmap.names).items() if k != "confusion"}
        if canvas is not None:
            step.describe(f"{rec.name} · drawing the overlay")
            render_overlay(canvas.background(slide, region), canvas.labels, cmap,
                           overlays / "overlays" / output_name(rec.name, ".overlay.png"),
                           reference=truth_canvas.labels, title=f"{rec.name} · pdseg {m.name} · {predictor.label}")
    step.describe(rec.name)
    return None


def _annotated_region(scored: list, d: float, grid: tuple[int, int], snap) -> Window | None:
    """The work-grid window around the scored annotations (origin on the feature stride), or None."""
    minx, miny, maxx, maxy = shapely.total_bounds(np.array(scored, dtype=object))
    x0, y0 = max(0, snap(int(np.floor(minx / d)))), max(0, snap(int(np.floor(miny / d))))
    x1, y1 = min(grid[0], int(np.ceil(maxx / d))), min(grid[1], int(np.ceil(maxy / d)))
    if x1 <= x0 or y1 <= y0:
        return None
    return Window(x0, y0, x1 - x0, y1 - y0, d)
