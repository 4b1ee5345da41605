"""The ``pdseg-qupath`` command line: thin wiring of the core functions, with rich progress and tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .errors import PdsegError

# Without a terminal rich assumes 80 columns, which truncates metric tables in logs and CI output.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, soft_wrap=True)

app = typer.Typer(
    name="pdseg-qupath",
    help="PathSegDiff tissue segmentation for QuPath: annotations in, masks, models and predictions out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def progress_bar() -> Progress:
    """The one progress display every long command uses."""
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _classes_option(classes: Optional[str]) -> Optional[list[str]]:
    return [c.strip() for c in classes.split(",") if c.strip()] if classes else None


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
    classes: Optional[str] = typer.Option(
        None, "--classes", help="Comma-separated class names, in label order (default: all classes, sorted)."
    ),
    overlay: bool = typer.Option(False, "--overlay", help="Also write overlays/<image>.png (mask blended on the image) to check by eye."),
) -> None:
    """Rasterize QuPath annotations into training label masks (class k → k, unannotated → 255)."""
    from .masks import export_source_masks

    with progress_bar() as progress:
        result = export_source_masks(
            source,
            out,
            mpp=mpp,
            image_mpp=image_mpp,
            tile_size=tile_size,
            classes=_classes_option(classes),
            overlay=overlay,
            progress=progress,
        )
    table = Table(title=f"Masks at {mpp:g} µm/px → {out}")
    table.add_column("image")
    for name in result.class_map.names:
        table.add_column(f"{name} px", justify="right")
    table.add_column("ignored px", justify="right")
    table.add_column("files", justify="right")
    table.add_column("repaired / skipped", justify="right")
    table.add_column("status")
    for row in result.rows:
        stats = row.stats
        cells = [f"{stats.pixels.get(n, 0):,}" if stats else "" for n in result.class_map.names]
        table.add_row(
            row.image,
            *cells,
            f"{stats.ignored_pixels:,}" if stats else "",
            str(len(stats.files)) if stats else "",
            f"{row.report.repaired} / {row.report.skipped}" if row.report else "",
            "[green]ok" if row.error is None else f"[red]{row.error}",
        )
    console.print(table)
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
    from .backbone.convert import convert_checkpoint

    use_ema: bool | str = {"auto": "auto", "yes": True, "no": False}.get(ema.lower(), "auto")
    with console.status(f"converting {ckpt.name} …"):
        record = convert_checkpoint(ckpt, config, out, use_ema=use_ema, overwrite=overwrite)
    console.print_json(data=record)
    console.print(f"[green]backbone written to {out}[/] — use it with --backbone {out}")


bench_app = typer.Typer(help="Benchmarks that print JSON (figures go to docs/PERFORMANCE.md).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("features")
def bench_features_cmd(
    backbone: str = typer.Option("pathsegdiff-brca-20x", "--backbone", help="Backbone spec (folder, hub id or config name)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(4, "--batch-size"),
    steps: int = typer.Option(3, "--steps", help="Timed batches after warm-up."),
    compile: str = typer.Option("no", "--compile", help="no, yes, auto, or a torch.compile mode."),
    t: Optional[str] = typer.Option(None, "--t", help="Timestep(s), comma-separated (default: the backbone's)."),
    blocks: Optional[str] = typer.Option(None, "--blocks", help="Up-block indices, comma-separated, 0 = coarsest."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32."),
    channels_last: bool = typer.Option(False, "--channels-last"),
) -> None:
    """Feature-extraction tiles/s, GFLOP/tile, TFLOP/s, peak memory and error vs eager fp32, as JSON."""
    from .backbone.bench import bench_features

    comp: bool | str = {"no": False, "yes": True}.get(compile, compile)
    result = bench_features(
        backbone, device, batch_size, steps, comp,
        t=[int(v) for v in t.split(",")] if t else None,
        blocks=[int(v) for v in blocks.split(",")] if blocks else None,
        precision=precision, channels_last=channels_last,
    )
    print(json.dumps(result, indent=2))


def main() -> None:
    """Console entry point: user errors become one red line and exit code 2, never a traceback."""
    try:
        app()
    except PdsegError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted; finished outputs are kept, rerun to continue[/]")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
