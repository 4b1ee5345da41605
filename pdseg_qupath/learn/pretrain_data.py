"""Unlabelled tissue tiles for pretraining: sources -> images -> a fixed, seeded pool of tissue tiles.

Pretraining needs many random views of tissue, not whole slides. Reading tiles from slides on every step
would make a long run I/O-bound and its result depend on file-system timing, so a fixed pool of tiles
is read once (seeded, hence the same on every run and after ``--resume``) and random crops, flips,
quarter turns and stain jitter are drawn from it in memory. A few whole grid cells are held out, never
overlapped by a training tile, to measure reconstruction honestly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.grid import Window, grid_size
from pdseg_qupath.core.slide import open_slide
from pdseg_qupath.core.stain import hed_jitter
from pdseg_qupath.core.tissue import TissueMap
from pdseg_qupath.sources.base import ImageRecord
from pdseg_qupath.sources.inputs import expand_inputs

MIN_TISSUE = 0.5
"""A tile counts as tissue when at least this fraction of it lies in the tissue mask."""


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


def collect_images(sources: Sequence[str | Path]) -> list[ImageRecord]:
    """The images of SOURCES (slides, image folders searched recursively, ``.qpproj`` projects read
    without QuPath); images a project cannot give (moved, remote) are left out."""
    records = expand_inputs(sources, recursive=True)
    usable = [r for r in records if r.error is None and r.path is not None]
    if not usable:
        raise PdsegError("no readable images to pretrain on; give slides, image folders or .qpproj files "
                         "(moved or missing files?)")
    return usable


@dataclass
class _Image:
    ref: ImageRecord
    width: int  # on the work grid
    height: int
    downsample: float
    tissue: TissueMap
    mpp: float
    tissue_mm2: float
    cells: list[tuple[int, int]] = field(default_factory=list)


def _survey(ref: ImageRecord, mpp: float, tile: int, image_mpp: float | None) -> _Image:
    with open_slide(ref.path, mpp=ref.mpp, fallback_mpp=image_mpp) as slide:
        d = mpp / slide.mpp
        w, h = grid_size(slide.width, slide.height, d)
        mask_mpp = min(8.0, max(slide.mpp, mpp * tile / 16))  # >= 16 mask px per tile side
        tissue = TissueMap.detect(slide, d, mask_mpp)
        area = tissue.area_px() * mpp**2 / 1e6
        img = _Image(ref, w, h, d, tissue, slide.mpp, area)
    for y in range(0, max(1, h - tile + 1), tile):
        for x in range(0, max(1, w - tile + 1), tile):
            if tissue.fraction_in(x, y, tile) >= MIN_TISSUE:
                img.cells.append((x, y))
    return img


def sample_pool(
    refs: Sequence[ImageRecord],
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
        if img.tissue.fraction_in(x, y, tile) >= MIN_TISSUE:
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
