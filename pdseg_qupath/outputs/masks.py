"""Annotation → label-mask export (the engine of ``pdseg-qupath masks``), plus classes.json and overlays.

Masks are 8-bit greyscale PNGs whose values are class indices, 255 meaning "no label". A grid that fits
in one tile is written as ``<image>.png``; larger grids as tiles named the way QuPath's TileExporter names
them, ``<image> [d=<downsample>,x=<x>,y=<y>,w=<w>,h=<h>].png`` with x, y, w, h in level-0 pixels, so the
files line up with tiles QuPath exports from the same image. Memory is bounded by one tile.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from pdseg_qupath.core.annotations import IGNORE, Annotation, ClassMap
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.fileio import atomic_write_with, write_json
from pdseg_qupath.core.grid import Window, grid_size, iter_windows
from pdseg_qupath.core.names import qupath_export_basename
from pdseg_qupath.core.raster import AnnotationIndex
from pdseg_qupath.outputs.overlay import render_overlay

Reader = Callable[[Window], np.ndarray]
"""Reads RGB uint8 pixels of a grid window (``Slide.read``)."""

OVERLAY_DIR = "overlays"

def format_downsample(d: float) -> str:
    """A downsample as QuPath writes it in tile names: up to 5 decimals, trailing zeros dropped."""
    q = Decimal(float(d)).quantize(Decimal("0.00001"), rounding=ROUND_HALF_EVEN)  # Java rounds the exact double
    s = f"{q:,f}"  # Java's US NumberFormat groups thousands
    return s.rstrip("0").rstrip(".") if "." in s else s


def _count(labels: np.ndarray) -> np.ndarray:
    """Pixels per label value. By row blocks: ``np.bincount`` widens its input to int64, 8 bytes a pixel."""
    counts = np.zeros(256, dtype=np.int64)
    rows = max(1, (1 << 20) // max(1, labels.shape[1]))
    for r in range(0, labels.shape[0], rows):
        counts += np.bincount(labels[r : r + rows].ravel(), minlength=256)
    return counts


def _java_round(v: float) -> int:
    return math.floor(v + 0.5)


def tile_region(window: Window, slide_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x, y, w, h) in level-0 px of a grid window, rounded and clipped to the slide the way QuPath does."""
    d = window.downsample
    x0, y0 = _java_round(window.x * d), _java_round(window.y * d)
    x1 = min(_java_round((window.x + window.width) * d), slide_size[0])
    y1 = min(_java_round((window.y + window.height) * d), slide_size[1])
    return x0, y0, x1 - x0, y1 - y0


TILE_SUFFIX_MAX = " [d=1234.5678,x=1234567,y=1234567,w=12345,h=12345].png"
"""As long as the part :func:`tile_name` adds to an image's base name gets (for the name-length check)."""


def tile_name(base: str, window: Window, slide_size: tuple[int, int]) -> str:
    """QuPath TileExporter's file name for a tile: ``<base> [d=..,x=..,y=..,w=..,h=..].png``."""
    x, y, w, h = tile_region(window, slide_size)
    d = "" if window.downsample == 1.0 else f"d={format_downsample(window.downsample)},"
    return f"{base} [{d}x={x},y={y},w={w},h={h}].png"


_TILE_RE = re.compile(r"^(?P<base>.*) \[(?:d=(?P<d>[0-9.,]+),)?x=(?P<x>\d+),y=(?P<y>\d+),w=(?P<w>\d+),h=(?P<h>\d+)\]\.png$")


def parse_tile_name(name: str) -> tuple[str, float, tuple[int, int, int, int]] | None:
    """(base, downsample, (x, y, w, h) level-0) of a QuPath-style tile file name, or None."""
    m = _TILE_RE.match(name)
    if not m:
        return None
    d = float(m["d"].replace(",", "")) if m["d"] else 1.0
    return m["base"], d, (int(m["x"]), int(m["y"]), int(m["w"]), int(m["h"]))


@dataclass
class MaskExportStats:
    """What one image's export wrote and left out, for the user's summary."""

    image: str
    mpp: float
    downsample: float
    grid: tuple[int, int]
    pixels: dict[str, int] = field(default_factory=dict)
    ignored_pixels: int = 0
    files: list[Path] = field(default_factory=list)
    tiles_total: int = 0
    tiles_skipped: int = 0
    """Tiles not written because no annotation gives them a labelled pixel."""
    annotations_used: int = 0
    skipped_unknown: dict[str, int] = field(default_factory=dict)
    """Annotations left out because their class is not in the class map (``(unclassified)`` for none)."""
    skipped_no_area: int = 0
    stale_files: list[Path] = field(default_factory=list)
    """Tiles of this image in the output folder from an earlier export that this one did not rewrite."""
    overlay: Path | None = None

    def area_mm2(self) -> dict[str, float]:
        """Labelled area per class in mm² (pixels × mpp²)."""
        return {k: v * self.mpp * self.mpp / 1e6 for k, v in self.pixels.items()}

    def to_json(self) -> dict:
        return {
            "image": self.image,
            "mpp": self.mpp,
            "downsample": self.downsample,
            "grid": list(self.grid),
            "pixels": self.pixels,
            "area_mm2": self.area_mm2(),
            "ignored_pixels": self.ignored_pixels,
            "files": [str(p) for p in self.files],
            "tiles_total": self.tiles_total,
            "tiles_skipped": self.tiles_skipped,
            "annotations_used": self.annotations_used,
            "skipped_unknown": self.skipped_unknown,
            "skipped_no_area": self.skipped_no_area,
            "stale_files": [str(p) for p in self.stale_files],
            "overlay": str(self.overlay) if self.overlay else None,
        }


def export_image_masks(
    slide_size: tuple[int, int],
    slide_mpp: float,
    annotations: Sequence[Annotation] | AnnotationIndex,
    class_map: ClassMap,
    out_dir: str | Path,
    image_name: str,
    *,
    mpp: float,
    tile_size: int = 4096,
    on_tile: Callable[[int, int], None] | None = None,
    overlay_reader: Reader | None = None,
) -> MaskExportStats:
    """Write the label mask(s) of one image at ``mpp`` µm/px into ``out_dir``.

    One ``<image>.png`` when the grid fits in ``tile_size`` × ``tile_size``, else QuPath-named tiles, only
    for tiles with at least one labelled pixel. ``on_tile(done, total)`` reports progress.
    ``overlay_reader`` (e.g. ``slide.read``) adds ``overlays/<image>.png`` for checking by eye.
    """
    if not (slide_mpp > 0 and mpp > 0):
        raise PdsegError(f"{image_name}: pixel sizes must be positive (slide {slide_mpp}, output {mpp} µm/px)")
    if tile_size < 1:
        raise PdsegError(f"tile size must be positive, got {tile_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = annotations if isinstance(annotations, AnnotationIndex) else AnnotationIndex(annotations, class_map)
    d = mpp / slide_mpp
    gw, gh = grid_size(slide_size[0], slide_size[1], d)
    base = qupath_export_basename(image_name)
    stats = MaskExportStats(
        image=image_name, mpp=mpp, downsample=d, grid=(gw, gh), annotations_used=len(index),
        skipped_unknown=dict(index.skipped_unknown), skipped_no_area=index.skipped_no_area,
    )
    counts = np.zeros(256, dtype=np.int64)

    if gw <= tile_size and gh <= tile_size:
        labels = index.rasterize(Window(0, 0, gw, gh, d))
        counts += _count(labels)
        path = out / f"{base}.png"
        _atomic_save(Image.fromarray(labels), path)
        stats.files.append(path)
        stats.tiles_total = 1
        if on_tile:
            on_tile(1, 1)
    else:
        windows = list(iter_windows(gw, gh, tile_size, 0, d))
        stats.tiles_total = len(windows)
        for i, win in enumerate(windows):
            labels = index.rasterize(win) if len(index.query(win)) else None
            if labels is None or not (labels != IGNORE).any():
                stats.tiles_skipped += 1
            else:
                counts += _count(labels)
                path = out / tile_name(base, win, slide_size)
                _atomic_save(Image.fromarray(labels), path)
                stats.files.append(path)
            if on_tile:
                on_tile(i + 1, len(windows))

    stats.pixels = {c.name: int(counts[k]) for k, c in enumerate(class_map.classes)}
    stats.ignored_pixels = int(gw * gh - counts[: len(class_map)].sum())
    written = {p.name for p in stats.files}
    for p in out.glob(f"{glob_escape(base)}*.png"):
        parsed = parse_tile_name(p.name)
        if p.name not in written and (p.name == f"{base}.png" or (parsed and parsed[0] == base)):
            stats.stale_files.append(p)
    if overlay_reader is not None:
        stats.overlay = out / OVERLAY_DIR / f"{base}.png"
        _write_overlay(overlay_reader, slide_size, index, class_map, stats.overlay, f"{image_name} · masks at {mpp:g} µm/px")
    return stats


def glob_escape(s: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", s)


def _atomic_save(img: Image.Image, path: Path, **kw: object) -> None:
    """PNG written next to the target and renamed, so an interrupted export never leaves a truncated file."""
    atomic_write_with(path, lambda tmp: img.save(tmp, format="PNG", **kw))


def write_classes_json(out_dir: str | Path, class_map: ClassMap, mpp: float) -> Path:
    """``out_dir/classes.json``: the class map (index, name, colour, ignore value) and the masks' µm/px."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = class_map.to_json() | {"mpp": mpp}
    return write_json(out / "classes.json", data)


def _write_overlay(reader: Reader, slide_size: tuple[int, int], index: AnnotationIndex, class_map: ClassMap,
                   path: Path, title: str, max_size: int = 2048) -> None:
    """The masks over a downsampled image (at most ``max_size`` px a side), drawn as every overlay is."""
    d = max(1.0, max(slide_size) / max_size)
    gw, gh = grid_size(slide_size[0], slide_size[1], d)
    win = Window(0, 0, min(gw, max_size), min(gh, max_size), d)
    render_overlay(reader(win), index.rasterize(win), class_map, path, title=title)
