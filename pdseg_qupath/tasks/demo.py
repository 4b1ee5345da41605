"""The one-command demo: train on the bundled example, predict the whole slide, evaluate, write outputs.

``examples/`` holds CMU-1-Small-Region.svs (CC0) with sparse Epidermis / Dermis / Background polygons
(``CMU-1-Small-Region.geojson``) and a separate set of validation polygons
(``validation/CMU-1-Small-Region.geojson``). The demo never writes into ``examples/``.

Outputs (``OUT/``): ``model/`` (the model folder and its training curve), ``predictions/`` (QuPath
GeoJSON, overlay PNG, areas CSV), ``evaluation/`` (metrics.json, confusion matrix, overlay), and
``qupath-project/`` when QuPath is installed. Sized to finish in under 5 minutes on 2 CPU cores with the
``small`` backbone.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.events import SILENT, Events
from pdseg_qupath.learn.options import PredictOptions, TrainOptions
from pdseg_qupath.learn.runtime import resolve_device
from pdseg_qupath.sources.inputs import open_source
from pdseg_qupath.sources.qupath.geojson import read_geojson
from pdseg_qupath.sources.qupath.project import QuPathProjectSource, create_project
from pdseg_qupath.tasks.evaluate import evaluate
from pdseg_qupath.tasks.predict import predict
from pdseg_qupath.tasks.train import train

EXAMPLE_IMAGE = "CMU-1-Small-Region.svs"
PREFERENCE_GPU = ("pathsegdiff-brca-20x", "zoomldm", "base", "small")
"""Backbones in order of preference when their weights are installed and a GPU is present. On CPU only
``small`` runs in the demo's time budget (the paper's model takes ~25 s per tile there)."""

SETUP_MESSAGE = """\
Next steps
• The paper's backbone (PathSegDiff, BRCA 20x LDM, ~400 M parameters) is not bundled. Download the
  Large-Image-Diffusion BRCA 20x checkpoint and its YAML (github.com/cvlab-stonybrook/Large-Image-Diffusion),
  then convert it once:
      pdseg-qupath convert-backbone model.ckpt --config config.yaml --out ~/pdseg-backbones/brca20x
  or use a Hugging Face repo id directly, e.g. --backbone StonyBrook-CVLab/ZoomLDM.
• On a machine with an NVIDIA GPU (torch with CUDA), train and predict with it:
      pdseg-qupath train PROJECT.qpproj --backbone ~/pdseg-backbones/brca20x --device cuda --out MODEL
      pdseg-qupath predict PROJECT.qpproj --model MODEL --device cuda
  The full model runs ~235 tiles/s on an H100 (bf16) but ~25 s per tile on a 2-core CPU."""


@dataclass
class DemoResult:
    out_dir: Path
    backbone: str
    backbone_label: str
    model_dir: Path
    geojson: Path
    overlay: Path | None
    areas_csv: Path | None
    metrics: dict
    report_dir: Path
    qupath_project: Path | None
    qupath_message: str
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def default_examples_dir() -> Path:
    """``examples/`` of the source tree this package runs from."""
    return Path(__file__).resolve().parents[2] / "examples"


def choose_demo_backbone(device: str) -> str:
    """The best backbone with installed weights that fits the demo's budget on this device."""
    from pdseg_qupath.backbone.folder import MANIFEST
    from pdseg_qupath.backbone.spec import SHIPPED_WEIGHTS
    candidates = PREFERENCE_GPU if device.startswith("cuda") else ("small",)
    for name in candidates:
        if (SHIPPED_WEIGHTS / name / MANIFEST).is_file():
            return name
    return "small"  # resolves to random weights, loudly labelled, when nothing is installed


def _stage(src: Path, dst_dir: Path, sidecar: Path) -> Path:
    """A folder with the example slide (linked, or copied) and one GeoJSON beside it."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    img = dst_dir / src.name
    if not img.exists():
        try:
            img.symlink_to(src.resolve())
        except OSError:
            shutil.copy2(src, img)
    shutil.copy2(sidecar, dst_dir / f"{src.stem}.geojson")
    return dst_dir


def run_demo(
    out_dir: str | Path = "pdseg-demo",
    *,
    backbone: str | None = None,
    device: str = "auto",
    epochs: int = 20,
    examples_dir: str | Path | None = None,
    events: Events = SILENT,
) -> DemoResult:
    """Train → predict → evaluate on the bundled example; returns where everything went."""
    t0 = time.perf_counter()
    ex = Path(examples_dir) if examples_dir is not None else default_examples_dir()
    slide = ex / EXAMPLE_IMAGE
    train_json = ex / f"{slide.stem}.geojson"
    val_json = ex / "validation" / f"{slide.stem}.geojson"
    for p in (slide, train_json, val_json):
        if not p.is_file():
            raise PdsegError(f"{p}: missing; the demo needs the repository's examples/ folder "
                             "(run it from a git checkout, or pass --examples DIR)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    spec = backbone or choose_demo_backbone(dev)
    timings: dict[str, float] = {}
    staged = _stage(slide, out / "data" / "train", train_json)
    val = _stage(slide, out / "data" / "validation", val_json)

    # 1. Train on the sparse training polygons.
    events.section("1/3 train")
    t = time.perf_counter()
    opts = TrainOptions(tiles_per_class=24, views=2, patience=6, max_val_tiles=16)
    res = train(open_source(staged), out / "model", backbone=spec, mpp=0.5, epochs=epochs, device=dev,
                seed=0, options=opts, events=events)
    timings["train_s"] = time.perf_counter() - t

    # 2. Predict the whole slide.
    events.section("2/3 predict the whole slide")
    t = time.perf_counter()
    pred = predict(open_source(staged), out / "model", out_dir=out / "predictions", device=dev, write_back=False,
                   options=PredictOptions(simplify_um=0.5, min_area_um2=50.0, overlay=True), events=events)
    timings["predict_s"] = time.perf_counter() - t
    image = pred.images[0]
    if image.error:
        raise PdsegError(f"{slide}: prediction failed ({image.error})")

    # 3. Evaluate on the separate validation polygons.
    events.section("3/3 evaluate on the validation polygons")
    t = time.perf_counter()
    metrics = evaluate(open_source(val), out / "model", out / "evaluation", device=dev, events=events,
                       include_training=True,  # same slide, but polygons drawn apart from the training ones
                       notes=["validation polygons drawn separately from the training ones"])
    timings["evaluate_s"] = time.perf_counter() - t

    with events.step("writing the QuPath project"):
        qp_path, qp_msg = _qupath_project(out / "qupath-project", slide, staged, image.geojson, events)
    seconds = time.perf_counter() - t0
    events.section("done")
    for line in (f"backbone: {res.backbone_label}", f"QuPath GeoJSON: {image.geojson}", f"overlay: {image.overlay}",
                 f"metrics: {out / 'evaluation' / 'metrics.json'} (mIoU {metrics['miou']:.3f}, "
                 f"accuracy {metrics['accuracy']:.3f})", f"QuPath project: {qp_path or qp_msg}",
                 f"total {seconds:.0f} s ({', '.join(f'{k[:-2]} {v:.0f} s' for k, v in timings.items())})",
                 SETUP_MESSAGE):
        events.message(line)
    return DemoResult(out, spec, res.backbone_label, out / "model", image.geojson, image.overlay, pred.areas_csv,
                      metrics, out / "evaluation", qp_path, qp_msg, seconds, timings)


def _qupath_project(path: Path, slide: Path, staged: Path, predictions: Path, events: Events) -> tuple[Path | None, str]:
    """A QuPath project with the slide, the training annotations and the predictions (needs QuPath)."""
    try:
        if path.exists():
            shutil.rmtree(path)
        anns, _ = read_geojson(staged / f"{slide.stem}.geojson")
        qpproj = create_project(path, [(slide, anns)])
        preds, _ = read_geojson(predictions)
        with QuPathProjectSource(qpproj, writable=True) as src:
            src.write_predictions(src.images()[0], preds)
        return qpproj, "written"
    except PdsegError as exc:  # the project is a bonus; the demo's other outputs stand
        if "QuPath not available" in str(exc):
            return None, "not written: QuPath not found; set PAQUO_QUPATH_DIR to a QuPath 0.5/0.6"
        events.message(f"QuPath project not written: {exc}", "warn")
        return None, f"not written: {exc}"
