"""The ``pdseg-qupath`` command line: options in, a task run with the console's events, results out.

Wiring only: each command turns its options into the arguments of one task (:mod:`pdseg_qupath.tasks`)
and shows what the task reports through :mod:`pdseg_qupath.ui`.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import closing
from pathlib import Path
from typing import Optional

import typer

from pdseg_qupath import __version__, ui
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.ui import console, err_console


def _flags_without_type() -> None:
    """typer 0.29 prints ``<bool>`` after on/off flags in ``--help`` (they take no value): show no type there."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - another typer layout
        return
    shown = TyperOption.display_type_rich
    if getattr(shown, "_pdseg", False):
        return

    def display_type_rich(self, ctx):  # type: ignore[no-untyped-def]
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    display_type_rich._pdseg = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_without_type()

app = typer.Typer(
    name="pdseg-qupath",
    help="PathSegDiff tissue segmentation for QuPath: annotations in, masks, models and predictions out.\n\n"
    "Options that take several values (--images, --classes, --val-images, --timesteps, --blocks, "
    "--class-weights, --devices): repeat the option or separate the values with commas; an image or class "
    "name that contains a comma is taken whole.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


_ON_INTERRUPT: list[str] = []
"""What the running command has saved so far and how to continue, said when the user presses Ctrl-C."""


def _on_interrupt(note: str) -> None:
    _ON_INTERRUPT[:] = [note]


LIST_HELP = "Several: repeat the option or separate with commas"
"""Said in the help of every list option: one rule for all of them (README, "List options")."""


def _parts(values: str | list[str] | None) -> list[str]:
    """Every value of a list option given by repeating it and/or with commas (numbers, devices: never a comma
    inside one)."""
    if not values:
        return []
    return [p.strip() for v in ([values] if isinstance(values, str) else values) for p in v.split(",") if p.strip()]


def _names_option(values: Optional[list[str]]) -> Optional[list[str]]:
    """Image or class names as given (repeated options, each may hold several names separated by commas).
    They are split where they meet the source's names (:func:`pdseg_qupath.core.names.given_names`), so
    that a name containing a comma can still be chosen."""
    names = [v for v in values or [] if v.strip()]
    return names or None


def _class_weights_option(value: str | list[str] | None) -> Optional[str | list[float]]:
    parts = _parts(value)
    if not parts or parts == ["balanced"]:
        return parts[0] if parts else None
    try:
        weights = [float(v) for v in parts]
    except ValueError:
        raise PdsegError(f"--class-weights {','.join(parts)}: expected 'balanced' or numbers like 1,2.5") from None
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise PdsegError(f"--class-weights {','.join(parts)}: each weight must be a finite number >= 0")
    return weights


def _int_list(value: str | list[str] | None, flag: str) -> Optional[list[int]]:
    """``1,2,3`` (or the option repeated) as integers, or one clear line naming the flag."""
    parts = _parts(value)
    if not parts:
        return None
    try:
        return [int(v) for v in parts]
    except ValueError:
        raise PdsegError(f"{flag} {','.join(parts)}: expected whole numbers separated by commas, e.g. {flag} 1,2") from None


def _int_list_or_auto(value: str | list[str] | None, flag: str) -> Optional[list[int] | str]:
    """``auto`` as is, else :func:`_int_list`."""
    return "auto" if [p.lower() for p in _parts(value)] == ["auto"] else _int_list(value, flag)


def _version(value: bool) -> None:
    if value:
        console.print(f"pdseg-qupath {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """PathSegDiff segmentation in the QuPath annotate → train → predict loop."""


@app.command()
def masks(
    source: Path = typer.Argument(..., help="A QuPath project (.qpproj) or a folder of images with <name>.geojson."),
    out: Path = typer.Option(..., "--out", help="Output folder for label PNGs and classes.json."),
    mpp: float = typer.Option(..., "--mpp", help="Resolution of the output masks, in µm/px."),
    image_mpp: Optional[float] = typer.Option(
        None, "--image-mpp", help="µm/px of images that record no pixel size (PNG/JPEG); never guessed."
    ),
    tile_size: int = typer.Option(4096, "--tile-size", help="Masks larger than this (px) are written as tiles."),
    classes: Optional[list[str]] = typer.Option(
        None, "--classes", metavar="<name>", help=f"Class names, in label order (default: all classes, sorted). {LIST_HELP}."
    ),
    overlay: bool = typer.Option(False, "--overlay", help="Also write overlays/<image>.png (mask blended on the image) to check by eye."),
) -> None:
    """Rasterize QuPath annotations into training label masks (class k → k, unannotated → 255)."""
    from pdseg_qupath.sources.inputs import open_source
    from pdseg_qupath.tasks.masks import masks as run_masks

    with ui.session(name="masks") as events, closing(_opening(events, source, open_source)) as src:
        result = run_masks(src, out, mpp=mpp, image_mpp=image_mpp, tile_size=tile_size,
                           classes=_names_option(classes), overlay=overlay, events=events)
    console.print(ui.masks_table(result, mpp, out))
    for row in result.rows:
        messages = row.report.messages if row.report else []
        for message in messages[:5]:
            console.print(f"[yellow]{row.image}: {message}")
        if len(messages) > 5:
            console.print(f"[yellow]{row.image}: … and {len(messages) - 5} more repaired/skipped objects")
        if row.stats and row.stats.skipped_unknown:
            console.print(f"[yellow]{row.image}: left out, class not in --classes: {row.stats.skipped_unknown}")
        if row.stats and row.stats.stale_files:
            console.print(f"[yellow]{row.image}: {len(row.stats.stale_files)} older mask file(s) in {out} were not rewritten")
    console.print(f"classes: {', '.join(result.class_map.names)} (ignore = 255) → {out / 'classes.json'}")
    if any(r.error for r in result.rows):
        raise typer.Exit(1)


TORCH_STEP = "loading PyTorch and diffusers"
"""The step around a command's first import of torch (seconds; more on a busy or network file system)."""


def _opening(events: ui.ConsoleEvents, source: Path, open_fn, *args, **kwargs):
    """``open_fn(source, ...)`` as a named step (opening a QuPath project starts its JVM: seconds)."""
    with events.step(f"opening {source}"):
        return open_fn(source, *args, **kwargs)


def _open_source_or_dataset(source: Path, dataset: Optional[str], split: str):
    """SOURCE as a project or folder, or with ``--dataset`` as BCSS or GlaS in its published layout."""
    if dataset:
        from pdseg_qupath.sources.datasets import open_dataset

        return open_dataset(dataset, source, **({"split": split} if dataset == "glas" else {}))
    from pdseg_qupath.sources.inputs import open_source

    return open_source(source)


BACKBONE_HELP = "Backbone: 'small' (shipped, pretrained), a diffusers folder, a Hugging Face repo id, or random:<config>."
DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N."


@app.command()
def train(
    source: Path = typer.Argument(..., help="A QuPath project (.qpproj, opened read-only) or a folder of images with <name>.geojson."),
    out: Path = typer.Option(..., "--out", help="Model folder to write (head.safetensors + model.json + plots)."),
    backbone: str = typer.Option("small", "--backbone", help=BACKBONE_HELP),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="Work resolution in µm/px (default 0.5 ≈ 20x, what PathSegDiff used; with --dataset the data set's own)."),
    classes: Optional[list[str]] = typer.Option(None, "--classes", metavar="<name>", help=f"Class names in label order (default: all, sorted). {LIST_HELP}."),
    image_mpp: Optional[float] = typer.Option(None, "--image-mpp", help="µm/px of images that record none (PNG/JPEG)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Read SOURCE as a published data set: bcss or glas."),
    split: str = typer.Option("train", "--split", help="GlaS split to train on: train, testA, testB or test (A+B)."),
    epochs: int = typer.Option(30, "--epochs", help="Maximum epochs (early stopping on the validation split)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    val_images: Optional[list[str]] = typer.Option(None, "--val-images", metavar="<name>", help=f"Image names held out for validation (default: chosen so every class stays in training). {LIST_HELP}."),
    seed: int = typer.Option(0, "--seed", help="Same seed and inputs → same metrics on CPU."),
    cache_mb: float = typer.Option(2048.0, "--cache-mb", help="Upper bound of the in-memory feature cache, in MB (the context head: 1.75 MB per tile view with small, plus 0.6 MB of texture maps). When the planned views do not fit, every tile is kept once before any augmented copy, and train says what was left out. Peak memory is up to about 1.4x the cache used plus 1.5 GB (IvyGAP, 8 classes: 1.84 GB of cache, 3.97 GB peak; gbm40: 0.55 GB, 1.80 GB)."),
    tiles_per_class: int = typer.Option(48, "--tiles-per-class", help="Training tiles sampled per class (stratified, so rare classes are seen)."),
    t: Optional[list[str]] = typer.Option(None, "--timesteps", "--t", metavar="<int|auto>", help=f"Diffusion timestep(s) the features are taken at, 0–999 (default: the backbone's), or auto: chosen by image-wise cross-validation on your annotations. {LIST_HELP}. --t is the old name."),
    blocks: Optional[list[str]] = typer.Option(None, "--blocks", metavar="<int|auto>", help=f"Decoder (up) blocks to tap, 0 = coarsest (default: the backbone's), or auto: chosen by image-wise cross-validation. {LIST_HELP}."),
    class_weights: Optional[list[str]] = typer.Option(None, "--class-weights", metavar="<weight|balanced>", help=f"'balanced' (inverse frequency) or one weight per class, in --classes order. {LIST_HELP}."),
    prior_correction: float = typer.Option(0.5, "--prior-correction", metavar="<0..1>", help="How far predictions follow the class proportions of your annotations: 1 fully, 0 as if every class were equally common (more of the rare classes). Training samples every class equally; this shifts the head's output back by this share of log(annotated / sampled share)."),
    rgb_skip: bool = typer.Option(False, "--rgb-skip", help="Give the pixel head the RGB tile beside the features (the context head always has it)."),
    texture: Optional[bool] = typer.Option(None, "--texture/--no-texture", help="Give the context head the tile's multi-scale colour and texture (Gaussian, difference of Gaussians and gradient at 2-16 px, in RGB and H&E stain densities: what a classic pixel classifier sees) beside the LDM features. Default: on for the context head."),
    head: str = typer.Option("context", "--head", help="context (dilated 3x3 blocks: each pixel sees ~124 px around it, plus its colour) or pixel (1x1 per-pixel classifier, faster to train)."),
    ensemble: int = typer.Option(3, "--ensemble", help="Heads trained on the same features, each validated on different held-out images, averaged when predicting (steadier with few images; each costs the head's training time again). 1: one head."),
    encoder: str = typer.Option("auto", "--encoder", help="Encoder of the feature pass: vq (the backbone's own), fast (its distilled fast encoder: 1.7-2x faster on a CPU, scores -0.005 to +0.013 Dice of vq on three test sets; docs/PERFORMANCE.md) or auto (fast on a CPU when the backbone has one). Recorded in the model; predict follows it."),
    keep_features: bool = typer.Option(False, "--keep-features", help="Keep the feature cache so a rerun with other head options skips extraction."),
    force: bool = typer.Option(False, "--force", help="Replace the model already in --out (otherwise refused)."),
) -> None:
    """Train the segmentation head on your annotations (sparse is fine: unannotated pixels are ignored).

    Labels are your own objects plus predictions you corrected or accepted; untouched pdseg predictions
    are never labels. An interrupted run resumes when the same command is run again.
    With --dataset bcss|glas, SOURCE is that data set's folder in its published layout (as for evaluate),
    trained at the data set's own pixel size unless --mpp is given."""
    from pdseg_qupath.learn.options import TrainOptions

    if (out / "model.json").exists() and not force:
        raise PdsegError(f"{out} already holds a trained model: pass --force to replace it, or choose another --out "
                         "(an interrupted run in that folder resumes by itself)")
    _on_interrupt(f"the features extracted so far are kept in {out / '.pdseg-train'}; run the same command again "
                  "to resume where it stopped")
    with ui.session(name="train") as events:
        with events.step(TORCH_STEP):
            from pdseg_qupath.tasks.train import train as run_train
        with closing(_opening(events, source, _open_source_or_dataset, dataset, split)) as src:
            if mpp is None:
                mpp = getattr(src, "mpp", None) or 0.5
            result = run_train(
                src, out, backbone=backbone, mpp=mpp, classes=_names_option(classes), image_mpp=image_mpp,
                epochs=epochs, device=device, val_images=_names_option(val_images), seed=seed, events=events,
                options=TrainOptions(
                    cache_mb=cache_mb, tiles_per_class=tiles_per_class, rgb_skip=rgb_skip, keep_features=keep_features,
                    head=head, ensemble=ensemble, encoder=encoder, texture=texture, prior_correction=prior_correction,
                    t=_int_list_or_auto(t, "--t"),
                    blocks=_int_list_or_auto(blocks, "--blocks"),
                    class_weights=_class_weights_option(class_weights),
                ),
            )
    heads = result.model.training.get("ensemble")
    best = (f"{len(heads)} heads, best epochs {', '.join(str(h['best_epoch']) for h in heads)}" if heads
            else f"best epoch {result.best_epoch}")
    console.print(f"[green]model saved to {result.model_dir}[/] ({best}; backbone {result.backbone_label})")


@app.command()
def predict(
    sources: list[str] = typer.Argument(..., help="A QuPath project or folder (write-back), or with --out: slides, folders, globs and .qpproj files."),
    model: Path = typer.Option(..., "--model", help="Model folder written by `train`."),
    images: Optional[list[str]] = typer.Option(None, "--images", metavar="<name>", help=f"Only these images, by name (write-back mode). {LIST_HELP}; a name that contains a comma is taken whole."),
    out: Optional[Path] = typer.Option(None, "--out", help="Batch mode: <slide>.geojson per slide and summary.csv here; reruns resume."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    batch_size: int = typer.Option(8, "--batch-size", help="Tiles per batch (halved automatically on GPU out-of-memory)."),
    tissue_only: bool = typer.Option(True, "--tissue-only/--all", help="Skip white background found on a thumbnail."),
    image_mpp: Optional[float] = typer.Option(None, "--image-mpp", help="µm/px of images that record none."),
    simplify: float = typer.Option(0.5, "--simplify", help="Polygon simplification tolerance, in µm (0.5 µm = 1 px of a model at 0.5 µm/px; 0 = exact pixel outlines)."),
    min_area: float = typer.Option(0.0, "--min-area", help="Drop predicted pieces smaller than this area, in µm²."),
    review: int = typer.Option(0, "--review", help="Also write the N least certain regions as ranked Review* annotations and an uncertainty map (detections with 'pdseg: uncertainty')."),
    review_size: float = typer.Option(128.0, "--review-size", help="Side of a review region, in µm (map cells: a quarter of it)."),
    write_back: Optional[bool] = typer.Option(None, "--write-back/--no-write-back", help="Write objects into the project (a .qpproj is backed up first). Default: yes without --out."),
    keep_backups: int = typer.Option(10, "--keep-backups", help="Write-back into a .qpproj: when no image failed, keep the newest N backup folders in <project>/pdseg/backups (and the newest holding each image), delete older ones; 0 = keep all."),
    force: bool = typer.Option(False, "--force", help="Batch mode: redo slides already done with this model."),
    devices: Optional[list[str]] = typer.Option(None, "--devices", metavar="<gpu|cpu|auto>", help=f"Batch mode: GPUs to use, e.g. 0,1, or auto (one worker process each). {LIST_HELP}."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Batch mode: worker processes on one device (e.g. CPU)."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="Batch mode: Dask scheduler address (tcp://host:8786); needs pdseg-qupath[distributed]."),
    overlay: bool = typer.Option(False, "--overlay", help="Batch mode: also write <slide>.overlay.png."),
    classmap: bool = typer.Option(False, "--classmap", help="Batch mode: also write <slide>.classes.png (pixel = class index)."),
) -> None:
    """Predict tissue classes: write them back into a project or folder, or batch-predict a cohort into --out."""
    from pdseg_qupath.learn.options import PredictOptions

    batch = out is not None and not write_back
    if not batch and (len(sources) != 1 or any(v for v in (force, devices, workers, cluster, overlay, classmap))):
        raise PdsegError("several slides, --force, --devices, --workers, --cluster, --overlay and --classmap are "
                         "batch-mode options: give --out DIR (and leave out --write-back)")
    opts = PredictOptions(batch_size=batch_size, tissue_only=tissue_only, image_mpp=image_mpp, simplify_um=simplify,
                          min_area_um2=min_area, overlay=overlay or (out is not None and not batch),
                          classmap=classmap, review=review, review_size_um=review_size,
                          keep_backups=keep_backups)
    if batch:
        _on_interrupt(f"finished slides are in {out} (summary.csv); run the same command again to predict the rest "
                      "(finished ones are skipped)")
        with ui.session(name="predict") as events:
            with events.step(TORCH_STEP):
                from pdseg_qupath.tasks.cohort import predict_cohort
            res = predict_cohort(sources, model, out, options=opts, force=force,
                                 devices=",".join(_parts(devices)) or device, workers=workers, cluster=cluster,
                                 events=events)
        console.print(f"{res.count('ok')} predicted, {res.count('skipped')} already done, {res.count('failed')} failed "
                      f"· {res.tiles} tiles in {res.seconds:.1f} s ({res.tiles_per_second:.2f} tiles/s) · {res.summary}")
        if res.count("failed"):
            raise typer.Exit(1)
        return

    from pdseg_qupath.sources.inputs import is_project, open_source

    source = Path(sources[0])
    if source.is_file() and not is_project(source):
        raise PdsegError(f"{source}: a single slide has no annotations to write back into; give --out DIR to "
                         f"predict it into a folder (e.g. pdseg-qupath predict {source} --model {model} --out "
                         "predictions/), or give the QuPath project or folder that holds it")
    write_back = True if write_back is None else write_back
    _on_interrupt("the images finished before the interruption were written (the project's backups are in "
                  "pdseg/backups/); run predict again to do the rest (earlier predictions are replaced, not doubled)")
    with ui.session(name="predict") as events:
        with events.step(TORCH_STEP):
            from pdseg_qupath.tasks.predict import predict as run_predict
        with closing(_opening(events, source, open_source, writable=write_back and is_project(source))) as src:
            result = run_predict(src, model, images=_names_option(images), out_dir=out, device=device, options=opts,
                                 write_back=write_back, events=events)
    console.print(f"{result.tiles} tiles in {result.seconds:.1f} s ({result.tiles_per_second:.2f} tiles/s); backbone {result.backbone_label}")
    for line in _where_written(src, result, out):
        console.print(line)
    if result.failed:
        for r in result.failed:
            err_console.print(f"[red]{r.image}: {r.error}")
        err_console.print(f"[red]{len(result.failed)} of {len(result.images)} image(s) failed[/]; the others "
                          "were predicted and written")
        raise typer.Exit(1)


@app.command()
def evaluate(
    source: Optional[Path] = typer.Argument(None, help="A QuPath project or folder with annotations (ground truth)."),
    model: Path = typer.Option(..., "--model", help="Model folder written by `train`."),
    report: Path = typer.Option(..., "--report", help="Report folder: metrics.json, confusion matrix, overlays."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Read SOURCE as a published data set: bcss or glas."),
    split: str = typer.Option("test", "--split", help="GlaS split: train, testA, testB or test (A+B)."),
    images: Optional[list[str]] = typer.Option(None, "--images", metavar="<name>", help=f"Only these images, by name. {LIST_HELP}; a name that contains a comma is taken whole."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    image_mpp: Optional[float] = typer.Option(None, "--image-mpp", help="µm/px of images that record none."),
    include_training: bool = typer.Option(
        False, "--include-training",
        help="Also score images the model was trained on (left out by default: their scores are optimistic)."),
) -> None:
    """Score a model on annotated pixels only: per-class Dice and IoU, accuracy, mIoU, confusion matrix.

    Scores count annotated pixels inside the tissue that predict detects (all annotated pixels are in
    metrics.json as all_annotated); images the model was trained on are left out unless --include-training.
    """
    if source is None:
        raise PdsegError("give SOURCE: a QuPath project, a folder with GeoJSON, or a data set folder with --dataset")
    with ui.session(name="evaluate") as events:
        with events.step(TORCH_STEP):
            from pdseg_qupath.tasks.evaluate import evaluate as run_evaluate
        with closing(_opening(events, source, _open_source_or_dataset, dataset, split)) as src:
            notes = list(getattr(src, "notes", []))
            metrics = run_evaluate(src, model, report, images=_names_option(images), device=device,
                                   image_mpp=image_mpp, notes=notes, include_training=include_training, events=events)
    console.print(f"[green]report written to {report}[/] (accuracy {metrics['accuracy']:.3f}, mIoU {metrics['miou']:.3f}, macro Dice {metrics['macro_dice']:.3f})")


@app.command()
def demo(
    out: Path = typer.Option(Path("pdseg-demo"), "--out", help="Output folder."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Default: the best installed backbone, else the shipped 'small'."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    epochs: int = typer.Option(20, "--epochs", help="Maximum training epochs of the demo model."),
    examples: Optional[Path] = typer.Option(None, "--examples", help="The examples/ folder (default: the one in this checkout)."),
) -> None:
    """Train on the bundled example slide, predict it whole, evaluate on held-out polygons (a few minutes on CPU)."""
    with ui.session(name="demo") as events:
        with events.step(TORCH_STEP):
            from pdseg_qupath.tasks.demo import run_demo
        result = run_demo(out, backbone=backbone, device=device, epochs=epochs, examples_dir=examples, events=events)
    console.print(f"[green]demo finished in {result.seconds:.0f} s[/] with backbone {result.backbone_label}")


@app.command()
def pretrain(
    sources: list[Path] = typer.Argument(..., help="Slides, image folders or .qpproj files of unlabelled H&E."),
    out: Path = typer.Option(..., "--out", help="Backbone folder to write (usable as --backbone DIR)."),
    config: Optional[str] = typer.Option(None, "--config", help="small, base or pathsegdiff-brca-20x (default small, or that of --from)."),
    from_spec: Optional[str] = typer.Option(None, "--from", help="Fine-tune an existing backbone instead of starting from random weights."),
    mpp: float = typer.Option(0.5, "--mpp", help="Resolution of the training tiles in µm/px."),
    image_mpp: Optional[float] = typer.Option(None, "--image-mpp", help="µm/px of images that record none (e.g. 0.62 for GlaS)."),
    steps_ae: int = typer.Option(3000, "--steps-ae", help="Autoencoder steps (stage 1; 0 keeps the --from autoencoder)."),
    steps_unet: int = typer.Option(3000, "--steps-unet", help="UNet steps (stage 2)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Tiles per training step (default: fits the device)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint of an interrupted run."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed and inputs → same result on CPU)."),
    save_dtype: str = typer.Option("float32", "--save-dtype", help="float32, or float16 to halve the folder (loads as fp32)."),
) -> None:
    """Pretrain (or fine-tune) the latent diffusion backbone on your own unlabelled slides."""
    with ui.session(name="pretrain") as events:
        with events.step(TORCH_STEP):
            from pdseg_qupath.tasks.pretrain import pretrain as run_pretrain
        record = run_pretrain(
            sources, out, config=config, from_spec=from_spec, mpp=mpp, steps_ae=steps_ae, steps_unet=steps_unet,
            batch_size=batch_size, device=device, resume=resume, seed=seed, image_mpp=image_mpp, events=events,
            save_dtype=save_dtype,
        )
    console.print(f"[green]backbone written to {out}[/]; use it with --backbone {out}")
    if isinstance(record, dict) and "psnr_db" in record:
        console.print(f"held-out reconstruction PSNR {record['psnr_db']:.1f} dB")


@app.command("convert-backbone")
def convert_backbone(
    ckpt: Path = typer.Argument(..., help="Original CompVis/Lightning checkpoint (.ckpt, .pt or .safetensors)."),
    config: Path = typer.Option(..., "--config", help="The checkpoint's CompVis YAML config."),
    out: Path = typer.Option(..., "--out", help="Output diffusers-format backbone folder."),
    ema: str = typer.Option("auto", "--ema", help="Use the EMA weights: auto (when present), yes or no."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Convert an original latent-diffusion checkpoint into a folder usable as --backbone DIR.

    The checkpoint is opened with torch.load(weights_only=True): pickles that need arbitrary code are refused.
    """
    use_ema: bool | str = {"auto": "auto", "yes": True, "no": False}.get(ema.lower(), "auto")
    with ui.session(name="convert-backbone") as events:
        with events.step(TORCH_STEP):
            from pdseg_qupath.backbone.convert import convert_checkpoint
        with events.step(f"converting {ckpt.name}"):  # minutes for a 400 M-parameter checkpoint
            record = convert_checkpoint(ckpt, config, out, use_ema=use_ema, overwrite=overwrite)
    console.print_json(data=record)
    console.print(f"[green]backbone written to {out}[/] — use it with --backbone {out}")


bench_app = typer.Typer(help="Benchmarks that print JSON (figures go to docs/PERFORMANCE.md).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("features")
def bench_features_cmd(
    backbone: str = typer.Option("pathsegdiff-brca-20x", "--backbone", help="Backbone spec (folder, hub id or config name)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(4, "--batch-size", help="Tiles per batch."),
    steps: int = typer.Option(3, "--steps", help="Timed batches after warm-up."),
    compile: str = typer.Option("no", "--compile", help="no, yes, auto, or a torch.compile mode."),
    t: Optional[list[str]] = typer.Option(None, "--timesteps", "--t", metavar="<int>", help=f"Diffusion timestep(s), 0–999 (default: the backbone's). {LIST_HELP}. --t is the old name."),
    blocks: Optional[list[str]] = typer.Option(None, "--blocks", metavar="<int>", help=f"Up-block indices, 0 = coarsest (default: the backbone's). {LIST_HELP}."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on CUDA and on CPUs with bf16 "
                                  "instructions, else fp32; PDSEG_PRECISION overrides), bf16 or fp32."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Use the channels-last memory layout (may be faster on GPUs)."),
    reference: bool = typer.Option(False, "--reference", help="Time the reference path (diffusers modules as "
                                   "shipped, NCHW, system allocator): what ran before the CPU fast path."),
    encoder: str = typer.Option("auto", "--encoder", help="vq, fast (the backbone's distilled fast encoder) or "
                                "auto (fast on a CPU when the backbone has one; PDSEG_ENCODER overrides)."),
) -> None:
    """Feature-extraction tiles/s, GFLOP/tile, TFLOP/s, peak memory and error vs eager fp32, as JSON."""
    from pdseg_qupath.backbone.bench import bench_features
    from pdseg_qupath.learn.runtime import resolve_device

    comp: bool | str = {"no": False, "yes": True}.get(compile, compile)
    result = bench_features(
        backbone, resolve_device(device), batch_size, steps, comp,
        t=_int_list(t, "--t"),
        blocks=_int_list(blocks, "--blocks"),
        precision=precision, channels_last=channels_last, reference=reference, encoder=encoder,
    )
    print(json.dumps(result, indent=2))


@bench_app.command("predict")
def bench_predict_cmd(
    backbone: str = typer.Option("small", "--backbone", help="Backbone spec (the head is random: speed only)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    batch_size: int = typer.Option(8, "--batch-size", help="Tiles per batch."),
    tiles: int = typer.Option(64, "--tiles", help="About this many tiles of a synthetic tissue slide."),
    tile: Optional[int] = typer.Option(None, "--tile", help="Tile size in px (default: the backbone's)."),
    slide: Optional[Path] = typer.Option(None, "--slide", help="Time this slide instead (its top-left corner)."),
    io_threads: int = typer.Option(2, "--io-threads", help="Tile-reading threads (0: no overlap of stages)."),
) -> None:
    """End-to-end predict tiles/s, its ratio to features-only tiles/s on the same device, peak RSS, as JSON."""
    from pdseg_qupath.tasks.bench import bench_predict

    print(json.dumps(bench_predict(backbone, device, batch_size, tiles, tile=tile, slide=slide,
                                   io_threads=io_threads), indent=2))


def _where_written(src: object, result: object, out: Optional[Path]) -> list[str]:
    """Where ``predict`` put its objects and files, one line each."""
    lines = []
    written = [r for r in result.images if r.write is not None]  # type: ignore[attr-defined]
    if written:
        objects = sum(r.write.added for r in written)
        targets = sorted({str(r.write.target) for r in written if r.write.target is not None})
        if any(t.endswith(".qpproj") for t in targets):
            backup = next((r.write.backup for r in written if r.write.backup), None)
            lines.append(f"written back into {targets[0]}: {objects} object(s) in {len(written)} image(s)"
                         + (f" (backup of the earlier state: {backup})" if backup else ""))
        elif targets:
            where = ", ".join(targets) if len(targets) <= 3 else f"{Path(targets[0]).parent}/ ({len(targets)} files)"
            lines.append(f"{objects} object(s) written to {where} (import them with File › Import objects, or "
                         "groovy/import_predictions.groovy)")
    if out is not None:
        lines.append(f"files (GeoJSON, overlays, areas.csv) in {out}")
    if getattr(result, "areas_csv", None) is not None:
        lines.append(f"areas per class: {result.areas_csv}")  # type: ignore[attr-defined]
    return lines


def _by_ctrl_c(exc: BaseException) -> bool:
    """Whether an exit was caused by Ctrl-C (typer turns the KeyboardInterrupt into exit code 130)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _interrupted() -> None:
    note = _ON_INTERRUPT[0] if _ON_INTERRUPT else "outputs finished before the interruption are kept"
    err_console.print(f"[yellow]interrupted (Ctrl-C):[/] {note}")


def main() -> None:
    """Console entry point: user errors become one red line and exit code 2, never a traceback; Ctrl-C says
    what was saved and how to continue (exit code 130; the CLI framework itself would print nothing)."""
    try:
        app()
    except PdsegError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130 and _by_ctrl_c(exc):
            _interrupted()
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
