"""``predict``: a model's tissue classes for the images of a source, written back and/or into a folder.

The steps of :func:`predict`:

1. **Model.** Load it with its backbone on the device (:class:`~pdseg_qupath.learn.predictor.Predictor`).
2. **Images.** The source's images (or those named); unreadable ones are reported and skipped.
3. **Each image.** Tissue, tiles, blended logits, objects (:func:`~pdseg_qupath.learn.inference.predict_image`);
   with ``out_dir`` its files (:mod:`pdseg_qupath.outputs.slide_outputs`); with ``write_back`` the objects
   go back into the source, replacing only earlier pdseg objects.
4. **Areas.** ``areas.csv`` (area per image and class in mm²) and a table.

Batch prediction of whole cohorts (:mod:`pdseg_qupath.tasks.cohort`) runs :func:`predict_job` on each
slide, which writes the same files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.events import SILENT, Events
from pdseg_qupath.core.names import PDSEG_DIR, check_name_length, check_unique, output_name
from pdseg_qupath.core.slide import open_slide
from pdseg_qupath.learn.inference import AreaRow, predict_image
from pdseg_qupath.learn.modelio import SegModel, load_model
from pdseg_qupath.learn.options import PredictOptions
from pdseg_qupath.learn.predictor import Predictor
from pdseg_qupath.outputs.slide_outputs import write_slide_outputs
from pdseg_qupath.outputs.tables import write_areas_csv
from pdseg_qupath.sources.base import AnnotationSource, ImageRecord, WriteReport, require_pixel_sizes, select_images


@dataclass
class ImageResult:
    image: str
    error: str | None = None
    objects: int = 0
    tiles: int = 0
    seconds: float = 0.0
    areas: list[AreaRow] = field(default_factory=list)
    write: WriteReport | None = None
    write_failed: bool = False
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


def open_predictor(model: str | Path | SegModel, device: str, batch_size: int, events: Events = SILENT) -> Predictor:
    """The model (a folder, or loaded) with its backbone on ``device``; GPU memory back-off is reported."""
    with events.step("loading the model and its backbone"):
        m = model if isinstance(model, SegModel) else load_model(model)
        return Predictor(m, device, batch_size,
                         on_backoff=lambda b: events.message(f"out of GPU memory: retrying with batch size {b}",
                                                             "warn"))


def predict(
    source: AnnotationSource,
    model: str | Path | SegModel,
    *,
    images: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    options: PredictOptions | None = None,
    write_back: bool = True,
    areas_csv: str | Path | None = None,
    events: Events = SILENT,
) -> PredictResult:
    """Predict the images of ``source``; write the objects back and, with ``out_dir``, the files of
    :mod:`pdseg_qupath.outputs.slide_outputs` (an overlay by default) and ``areas.csv`` there.

    Without ``out_dir`` the areas CSV goes to ``areas_csv``, else ``<source root>/pdseg/areas.csv``.
    An image that cannot be read is reported and skipped; the others go on.
    """
    opts = options or PredictOptions(overlay=out_dir is not None)
    # 1. The images (checked before the model is loaded), and the model on the device.
    records = select_images(source.images(), images or None)
    if not records:
        raise PdsegError(f"{_where(source)}: no images to predict (an empty folder or project?)")
    require_pixel_sizes(records, opts.image_mpp)
    predictor = open_predictor(model, device, opts.batch_size, events)
    m = predictor.model
    prec, trained = predictor.extractor.precision, m.features.get("precision")
    events.message(f"model {m.name} ({m.model_id[:8]}): {', '.join(m.class_map.names)} at {m.io.mpp:g} µm/px · "
                   f"backbone: {predictor.label} · {predictor.extractor.summary()}"
                   + (f" (trained on {trained})" if trained and trained != prec else ""))
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    # 2. Their output names.
    _check_output_names(source, records, out, opts, write_back)
    # 3. Each image: predict, write its files, write back.
    results: list[ImageResult] = []
    t_all = time.perf_counter()
    step = events.step("predict")
    for rec in records:
        results.append(_predict_one(source, rec, predictor, opts, out, write_back, step, events))
    step.close()
    seconds = time.perf_counter() - t_all
    # 4. Old backups, once every write-back of the run has succeeded.
    if write_back and not any(r.write_failed for r in results):
        _prune_backups(source, opts.keep_backups, events)
    # 5. Areas.
    rows = [a for r in results for a in r.areas]
    csv_path = _areas_path(source, out, areas_csv)
    if rows and csv_path is not None:
        write_areas_csv(rows, csv_path)
    if rows:
        events.show("areas", rows)
    return PredictResult(results, m, predictor.label, csv_path if rows else None,
                         sum(r.tiles for r in results), seconds)


def _predict_one(source: AnnotationSource, rec: ImageRecord, predictor: Predictor, opts: PredictOptions,
                 out: Path | None, write_back: bool, step: Any, events: Events) -> ImageResult:
    res = ImageResult(rec.name)
    if rec.error or rec.path is None:
        res.error = rec.error or f"not a local file ({rec.uri})"
        events.message(f"{rec.name}: skipped ({res.error})", "error")
        return res
    try:
        slide = open_slide(rec.path, mpp=rec.mpp, fallback_mpp=opts.image_mpp)
    except PdsegError as exc:
        res.error = str(exc)
        events.message(f"{rec.name}: skipped ({exc})", "error")
        return res
    m = predictor.model
    problem = m.io.resolution_problem(rec.name, slide.mpp, slide.width, slide.height)
    if problem:
        res.messages.append(problem)
        events.message(problem, "warn")
    with slide:
        step.describe(rec.name)
        step.set_total(None, done=0)
        pred = predict_image(slide, predictor, options=opts, on_tiles=step.advance,
                             on_total=lambda n: step.set_total(n, done=0),
                             on_phase=lambda phase: step.describe(
                                 rec.name if phase == "tiles" else f"{rec.name} · {phase}"))
        res.objects, res.tiles, res.seconds, res.areas = len(pred.annotations), pred.tiles, pred.seconds, pred.areas
        res.messages += pred.messages
        for msg in pred.messages:
            events.message(msg, "warn")
        if out is not None:
            step.describe(f"{rec.name} · writing files")
            files = write_slide_outputs(out, rec.name, pred, slide, m.class_map, opts,
                                        title=f"{rec.name} · pdseg {m.name} · {predictor.label}")
            res.geojson, res.overlay = files.geojson, files.overlay
    if write_back:
        step.describe(f"{rec.name} · writing back")
        try:
            res.write = source.write_predictions(rec, [*pred.annotations, *pred.review])
            for msg in res.write.messages:  # corrections kept, a wiped earlier write, where the file went
                events.message(msg, "warn" if "are gone" in msg else "note")
        except PdsegError as exc:
            res.error = f"write-back failed: {exc}"  # the run goes on; the command exits non-zero
            res.write_failed = True
            res.messages.append(res.error)
            events.message(f"{rec.name}: predictions not written back ({exc})", "error")
    step.describe(rec.name)
    return res


def _prune_backups(source: AnnotationSource, keep: int, events: Events) -> None:
    prune = getattr(source, "prune_backups", None)  # a QuPath project keeps backups; a folder keeps <file>.bak
    if prune is None:
        return
    report = prune(keep)
    pruned = report.message(keep)
    if pruned:
        events.message(pruned, "note")
    for failed in report.failed:
        events.message(failed, "warn")


def _check_output_names(source: AnnotationSource, records: Sequence[ImageRecord], out: Path | None,
                        opts: PredictOptions, write_back: bool) -> None:
    """Before any work: no two images write one file, and every output name fits the file system."""
    suffixes = []
    if out is not None:
        suffixes.append(".overlay.png" if opts.overlay or opts.classmap else ".geojson")
    if write_back and hasattr(source, "predictions_path"):  # a folder: pdseg/predictions/<name>.geojson(.bak)
        suffixes.append(".geojson.bak")
    if not suffixes:
        return
    live = [r for r in records if not r.error]
    check_unique([(r.name, output_name(r.name, "")) for r in live])
    for r in live:
        check_name_length(r.name, output_name(r.name, max(suffixes, key=len)))


def _where(source: AnnotationSource) -> str:
    return str(getattr(source, "path", None) or getattr(source, "root", None) or "the source")


def _areas_path(source: AnnotationSource, out: Path | None, areas_csv: str | Path | None) -> Path | None:
    if areas_csv is not None:
        return Path(areas_csv)
    if out is not None:
        return out / "areas.csv"
    if getattr(source, "root", None) is not None:
        return Path(source.root) / PDSEG_DIR / "areas.csv"  # type: ignore[attr-defined]
    if getattr(source, "path", None) is not None:
        p = Path(source.path)  # type: ignore[attr-defined]
        return (p.parent if p.suffix == ".qpproj" else p) / PDSEG_DIR / "areas.csv"
    return None


# ------------------------------------------------------------------------------------------ one slide


def predict_job(job: ImageRecord, predictor: Predictor, out_dir: str | Path, options: PredictOptions,
                on_tiles: Callable[[int], None] | None = None,
                on_total: Callable[[int], None] | None = None,
                on_phase: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Predict one slide of a cohort into ``out_dir`` and return its summary row. Never raises for a bad
    slide: the error goes into the row, so the cohort goes on."""
    m = predictor.model
    row: dict[str, Any] = {"slide": job.name, "status": "failed", "model_id": m.model_id,
                           "path": str(job.path or job.uri), "device": str(predictor.device)}
    t0 = time.perf_counter()
    if job.error:
        row["error"] = job.error
        return row
    try:
        with open_slide(job.path, mpp=job.mpp, fallback_mpp=options.image_mpp) as slide:
            problem = m.io.resolution_problem(job.name, slide.mpp, slide.width, slide.height)
            if problem:  # batch mode: skip it, with the reason, rather than spend hours on a typo
                row["error"] = f"skipped: {problem}"
                return row
            pred = predict_image(slide, predictor, options=options, on_tiles=on_tiles, on_total=on_total,
                                 on_phase=on_phase)
            if on_phase is not None:
                on_phase("writing files")
            write_slide_outputs(out_dir, job.name, pred, slide, m.class_map, options,
                                title=f"{job.name} - pdseg {m.name}", model_id=m.model_id)
    except PdsegError as exc:
        row["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad slide must not stop a cohort
        row["error"] = f"{job.path}: {type(exc).__name__}: {exc}"
    else:
        row.update(status="ok", tissue_mm2=f"{pred.tissue_mm2:.6f}", objects=len(pred.annotations),
                   tiles=pred.tiles, error="; ".join(pred.messages))
        row.update({f"{name}_mm2": f"{v:.6f}" for name, v in pred.class_mm2.items()})
    row["seconds"] = f"{time.perf_counter() - t0:.2f}"
    return row
