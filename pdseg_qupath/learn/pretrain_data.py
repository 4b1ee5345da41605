"""Unlabelled tissue tiles for pretraining: sources -> images -> a fixed, seeded pool of tissue tiles.

Pretraining needs many random views of tissue, not whole slides. Reading tiles from slides on every step
would make a long run I/O-bound and its result depend on file-system timing, so a fixed pool of tiles
is read once (seeded, hence the same on every run and after ``--resume``) and random crops, flips,
quarter turns and stain jitter are drawn from it in memory. A few whole grid cells are held out, never
overlapped by a training tile, to measure reconstruction honestly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pdseg_qupath.learn.stain import hed_jitter
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.grid import Window, grid_size

IMAGE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff", ".png", ".jpg", ".jpeg",
                  ".bmp"}
MIN_TISSUE = 0.5
"""A tile counts as tissue when at least this fraction of it lies in the tissue mask."""


@dataclass(frozen=True)
class ImageRef:
    """One image to sample from; ``mpp`` is the project's calibration (None: the file's own)."""

    path: Path
    mpp: float | None = None


@dataclass
class TilePool:
    """Training tiles and held-out tiles (uint8, N x S x S x 3), plus what they were drawn from."""

    train: np.ndarray
    heldout: np.ndarray
    images: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        area = sum(i["tissue_mm2"] for i in self.images)
        return {"images": len(self.images), "tissue_mm2": round(area, 3), "train_tiles": len(self.train),
                "heldout_tiles": len(self.heldout), "tile_px": int(self.train.shape[1])}


def collect_images(sources: Sequence[str | Path]) -> list[ImageRef]:
    """Expand SOURCES (slides, image folders searched recursively, ``.qpproj`` projects) to images."""
    refs: list[ImageRef] = []
    for src in sources:
        p = Path(src).expanduser()
        if not p.exists():
            raise PdsegError(f"{p}: no such slide, image folder or QuPath project")
        if p.suffix == ".qpproj" or (p.is_dir() and (p / "project.qpproj").exists()):
            refs.extend(_project_images(p))
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise PdsegError(f"{p}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            refs.extend(ImageRef(f) for f in found)
        else:
            refs.append(ImageRef(p))
    if not refs:
        raise PdsegError("no images to pretrain on; give slides, image folders or .qpproj files")
    return refs


def _project_images(p: Path) -> list[ImageRef]:
    from pdseg_qupath.sources.base import open_source

    src = open_source(p)
    try:
        refs = [ImageRef(r.path, r.mpp) for r in src.images() if r.error is None and r.path is not None]
    finally:
        src.close()
    if not refs:
        raise PdsegError(f"{p}: no readable images in this QuPath project (moved or missing files?)")
    return refs


@dataclass
class _Image:
    ref: ImageRef
    width: int  # on the work grid
    height: int
    downsample: float
    integral: np.ndarray  # summed-area table of the tissue mask
    mask_scale: float  # work-grid px per mask px
    mpp: float
    tissue_mm2: float
    cells: list[tuple[int, int]] = field(default_factory=list)

    def tissue_fraction(self, x: int, y: int, size: int) -> float:
        s = self.mask_scale
        h, w = self.integral.shape[0] - 1, self.integral.shape[1] - 1
        x0, y0 = min(w, int(x / s)), min(h, int(y / s))
        x1, y1 = min(w, max(x0 + 1, math.ceil((x + size) / s))), min(h, max(y0 + 1, math.ceil((y + size) / s)))
        ii = self.integral
        inside = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
        return float(inside) / max(1, (x1 - x0) * (y1 - y0))


def _survey(ref: ImageRef, mpp: float, tile: int, image_mpp: float | None) -> _Image:
    from pdseg_qupath.core.slide import open_slide, tissue_mask

    with open_slide(ref.path, mpp=ref.mpp, fallback_mpp=image_mpp) as slide:
        d = mpp / slide.mpp
        w, h = grid_size(slide.width, slide.height, d)
        mask_mpp = min(8.0, max(slide.mpp, mpp * tile / 16))  # >= 16 mask px per tile side
        mask, md = tissue_mask(slide, mpp=mask_mpp)
        integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        area = float(mask.sum()) * (md * slide.mpp) ** 2 / 1e6
        img = _Image(ref, w, h, d, integral, md / d, slide.mpp, area)
    for y in range(0, max(1, h - tile + 1), tile):
        for x in range(0, max(1, w - tile + 1), tile):
            if img.tissue_fraction(x, y, tile) >= MIN_TISSUE:
                img.cells.append((x, y))
    return img


def sample_pool(
    refs: Sequence[ImageRef],
    *,
    mpp: float,
    tile: int,
    n_train: int,
    n_heldout: int,
    seed: int,
    image_mpp: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TilePool:
    """Read ``n_train`` random tissue tiles and ``n_heldout`` held-out grid cells at ``mpp``.

    Images are weighted by their number of tissue cells, so a large slide contributes more than a
    small image, and training tiles never overlap a held-out cell.
    """
    rng = np.random.default_rng([seed, 7321])
    images = []
    for i, ref in enumerate(refs):
        images.append(_survey(ref, mpp, tile, image_mpp))
        if progress:
            progress(i + 1, len(refs) * 2)
    all_cells = [(k, c) for k, img in enumerate(images) for c in img.cells]
    if not all_cells:
        raise PdsegError(f"no tissue found in {len(images)} image(s) at {mpp} µm/px; check the images, "
                         f"or that the tissue is at least {tile} px ({tile * mpp:.0f} µm) wide")
    n_held = min(n_heldout, len(all_cells) // 5)
    held_idx = rng.choice(len(all_cells), size=n_held, replace=False) if n_held else np.zeros(0, int)
    held: dict[int, list[tuple[int, int]]] = {}
    for j in sorted(held_idx.tolist()):
        k, c = all_cells[j]
        held.setdefault(k, []).append(c)
    weights = np.array([len(img.cells) - len(held.get(k, [])) for k, img in enumerate(images)], float)
    if weights.sum() <= 0:
        raise PdsegError("every tissue tile was held out; add more images")
    picks = rng.choice(len(images), size=n_train, p=weights / weights.sum())
    positions: dict[int, list[tuple[int, int]]] = {}
    for k in picks.tolist():
        positions.setdefault(k, []).append(_random_position(images[k], tile, held.get(k, []), rng))

    train = np.empty((n_train, tile, tile, 3), np.uint8)
    heldout = np.empty((n_held, tile, tile, 3), np.uint8)
    n_t = n_h = 0
    from pdseg_qupath.core.slide import open_slide

    for k, img in enumerate(images):
        todo, hold = positions.get(k, []), held.get(k, [])
        if todo or hold:
            with open_slide(img.ref.path, mpp=img.mpp) as slide:
                for x, y in todo:
                    train[n_t] = slide.read(Window(x, y, tile, tile, img.downsample))
                    n_t += 1
                for x, y in hold:
                    heldout[n_h] = slide.read(Window(x, y, tile, tile, img.downsample))
                    n_h += 1
        if progress:
            progress(len(refs) + k + 1, len(refs) * 2)
    info = [{"path": str(img.ref.path), "mpp": img.mpp, "width": img.width, "height": img.height,
             "tissue_mm2": round(img.tissue_mm2, 4), "tissue_cells": len(img.cells),
             "train_tiles": len(positions.get(k, [])), "heldout_tiles": len(held.get(k, []))}
            for k, img in enumerate(images)]
    # Shuffle so a batch of consecutive pool indices is not one image (only matters for inspection).
    train = train[rng.permutation(n_train)]
    return TilePool(train, heldout, info)


def _random_position(img: _Image, tile: int, held: list[tuple[int, int]], rng: np.random.Generator,
                     tries: int = 64) -> tuple[int, int]:
    """A uniform tissue position not overlapping a held-out cell; falls back to a free tissue cell."""
    mx, my = max(0, img.width - tile), max(0, img.height - tile)
    for _ in range(tries):
        x, y = int(rng.integers(mx + 1)), int(rng.integers(my + 1))
        if any(abs(x - hx) < tile and abs(y - hy) < tile for hx, hy in held):
            continue
        if img.tissue_fraction(x, y, tile) >= MIN_TISSUE:
            return x, y
    free = [c for c in img.cells if c not in held]
    return free[int(rng.integers(len(free)))]


def augment_batch(pool: np.ndarray, batch: int, crop: int, rng: np.random.Generator, *,
                  stain_sigma: float, stain_bias: float) -> np.ndarray:
    """A batch of random views: pool tile, random crop, one of the 8 flips/rotations, HED jitter."""
    n, s = pool.shape[0], pool.shape[1]
    out = np.empty((batch, crop, crop, 3), np.uint8)
    for i in range(batch):
        t = pool[int(rng.integers(n))]
        y, x = (int(v) for v in rng.integers(s - crop + 1, size=2))
        v = np.rot90(t[y:y + crop, x:x + crop], int(rng.integers(4)))
        out[i] = v[:, ::-1] if rng.integers(2) else v
    if stain_sigma > 0 or stain_bias > 0:
        out = hed_jitter(out, rng, sigma=stain_sigma, bias=stain_bias)
    return out
