"""What training looks at: the image split, the tiles, and the labelled pixels kept of each tile.

Tiles are centred on random points inside the annotations, the same number for every class, so a class
drawn in two small polygons is seen as often as one drawn over half the slide. Pixels are drawn from
each tile view stratified by class (training) or uniformly (validation, for unbiased scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import shapely

from pdseg_qupath.core.annotations import IGNORE, ClassMap
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.grid import Window
from pdseg_qupath.core.names import given_names
from pdseg_qupath.learn.data import TrainingImage
from pdseg_qupath.learn.options import IOConfig


@dataclass(frozen=True)
class Tile:
    """A training tile: image index and top-left corner on that image's work grid."""

    image: int
    x: int
    y: int


def image_classes(image: TrainingImage) -> set[str]:
    """The classes drawn (with an area) on one image."""
    return {a.classification for a in image.annotations
            if a.classification and not a.is_ignore and a.geometry.area > 0}


def split_images(
    images: list[TrainingImage], val_images: Sequence[str] | None, fraction: float, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """Train and validation image indices: the user's choice, else ~``fraction`` of images (≥ 1) when
    at least 2 are annotated, else no image split.

    The automatic split is stratified by class: an image goes to validation only if every class on it
    stays on some training image, and the rarest classes (on the fewest images) are given a validation
    image first, so that validation sees each class that two or more images carry; the other validation
    images are those whose classes training has most of. With few images a plain random split can hold
    out most of a rare class and early-stop on a handful of its pixels. When no image can be held out
    without taking a class out of training, there is no image split (validation falls back to tiles)."""
    names = [im.record.name for im in images]
    val_images = given_names(val_images, names)  # "a,b" or a name with a comma, as --images
    if val_images:
        unknown = [v for v in val_images if v not in names]
        if unknown:
            raise PdsegError(f"--val-images {unknown}: not among the annotated images {names}")
        val = [i for i, n in enumerate(names) if n in set(val_images)]
        train = [i for i in range(len(images)) if i not in set(val)]
        if not train:
            raise PdsegError("--val-images names every annotated image; leave at least one for training")
        return train, val
    if len(images) < 2:
        return list(range(len(images))), []
    n_val = max(1, int(round(fraction * len(images))))
    order = [int(i) for i in rng.permutation(len(images))]
    classes = [image_classes(im) for im in images]
    held: list[int] = []

    def can_hold(i: int) -> bool:  # every class of image i stays on a training image
        return i not in held and all(any(c in classes[j] for j in order if j != i and j not in held)
                                     for c in classes[i])

    carriers = {c: [i for i in order if c in classes[i]] for c in set().union(*classes)}
    for c in sorted(carriers, key=lambda c: (len(carriers[c]), c)):  # rarest classes first
        if len(held) >= n_val or any(c in classes[i] for i in held):
            continue
        pick = next((i for i in carriers[c] if can_hold(i)), None)
        if pick is not None:
            held.append(pick)
    while len(held) < n_val:  # fill up, taking first the images whose classes training has most of
        def spare(i: int) -> int:
            return min((sum(1 for j in carriers[c] if j not in held) for c in classes[i]), default=0)

        candidates = [i for i in order if can_hold(i)]
        if not candidates:
            break
        held.append(max(candidates, key=spare))  # max keeps the first (random) of equals
    if not held:  # no image can be held out without taking a class out of training
        return list(range(len(images))), []
    val = sorted(held)
    return [i for i in range(len(images)) if i not in set(val)], val


def _point_in(geom, rng: np.random.Generator) -> tuple[float, float]:
    minx, miny, maxx, maxy = geom.bounds
    for _ in range(8):
        xs = rng.uniform(minx, maxx, 64)
        ys = rng.uniform(miny, maxy, 64)
        inside = np.flatnonzero(shapely.contains_xy(geom, xs, ys))
        if len(inside):
            return float(xs[inside[0]]), float(ys[inside[0]])
    p = geom.representative_point()
    return float(p.x), float(p.y)


def sample_tiles(images: list[TrainingImage], which: Sequence[int], cmap: ClassMap, io: IOConfig,
                 per_class: int, rng: np.random.Generator) -> list[Tile]:
    """``per_class`` tiles per class, centred on random points inside that class's annotations
    (annotations chosen in proportion to their area). Origins snap to the feature stride."""
    tiles: list[Tile] = []
    tile, stride = io.tile, io.stride
    for name in cmap.names:
        pool = [(i, a.geometry) for i in which for a in images[i].annotations if a.classification == name]
        pool = [(i, g) for i, g in pool if g.area > 0]
        if not pool:
            continue
        areas = np.array([g.area for _, g in pool], dtype=np.float64)
        picks = rng.choice(len(pool), size=per_class, p=areas / areas.sum())
        for j in picks:
            i, g = pool[int(j)]
            px, py = _point_in(g, rng)
            d = io.downsample(images[i].slide.mpp)
            x = int(round((px / d - tile / 2) / stride)) * stride
            y = int(round((py / d - tile / 2) / stride)) * stride
            tiles.append(Tile(i, x, y))
    return tiles


def grid_tiles(images: list[TrainingImage], which: Sequence[int], io: IOConfig, limit: int,
               rng: np.random.Generator) -> list[Tile]:
    """Non-overlapping tiles over the annotated areas of validation images (at most ``limit``)."""
    out: list[Tile] = []
    tile = io.tile
    for i in which:
        im = images[i]
        d = io.downsample(im.slide.mpp)
        minx, miny, maxx, maxy = shapely.total_bounds(np.array([a.geometry for a in im.annotations], dtype=object))
        x0, y0 = int(np.floor(minx / d)), int(np.floor(miny / d))
        x1, y1 = int(np.ceil(maxx / d)), int(np.ceil(maxy / d))
        for y in range(y0, max(y0 + 1, y1), tile):
            for x in range(x0, max(x0 + 1, x1), tile):
                if im.index.intersects(Window(x, y, tile, tile, d)):
                    out.append(Tile(i, io.snap(x), io.snap(y)))
    if len(out) > limit:
        keep = np.sort(rng.choice(len(out), size=limit, replace=False))
        out = [out[int(j)] for j in keep]
    return out


def split_tiles(tiles: list[Tile], fraction: float, rng: np.random.Generator) -> tuple[list[Tile], list[Tile]]:
    """Held-out tiles of the training images, for validation when only one image is annotated
    (none below 10 tiles)."""
    order = rng.permutation(len(tiles))
    n_val = int(round(fraction * len(tiles))) if len(tiles) >= 10 else 0
    val = [tiles[int(i)] for i in sorted(order[:n_val])]
    return [tiles[int(i)] for i in sorted(order[n_val:])], val


def annotated_prior(images: list[TrainingImage], which: Sequence[int], n_classes: int, mpp: float,
                    max_pixels: int = 4_000_000) -> np.ndarray:
    """Share of each class among the annotated pixels of the training images (paint order applied).

    Each image is rasterized once over its annotations' bounds, at the work resolution or coarser so
    that at most ``max_pixels`` pixels are needed.
    """
    counts = np.zeros(n_classes, dtype=np.float64)
    for i in which:
        im = images[i]
        if not len(im.index):
            continue
        minx, miny, maxx, maxy = shapely.total_bounds(im.index.geometries)
        d = mpp / im.slide.mpp
        w0, h0 = max(1.0, (maxx - minx) / d), max(1.0, (maxy - miny) / d)
        f = max(1.0, float(np.sqrt(w0 * h0 / max_pixels)))
        dd = d * f
        x0, y0 = int(np.floor(minx / dd)), int(np.floor(miny / dd))
        win = Window(x0, y0, int(np.ceil(maxx / dd)) - x0 + 1, int(np.ceil(maxy / dd)) - y0 + 1, dd)
        lab = im.index.rasterize(win)
        counts += np.bincount(lab[lab < n_classes].ravel(), minlength=n_classes)[:n_classes]
    total = counts.sum()
    return counts / total if total else np.full(n_classes, 1.0 / n_classes)


def stratified_pixels(labels: np.ndarray, n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of up to ``n`` labelled pixels, shared equally among the classes present.

    A class with fewer pixels than its share gives the rest to the others, so small structures are
    fully used and large ones fill the quota. Unlabelled (255) pixels are never chosen.
    """
    flat = labels.reshape(-1)
    pools = [np.flatnonzero(flat == k) for k in range(n_classes)]
    pools = [p for p in pools if len(p)]
    if not pools:
        return np.zeros(0, dtype=np.int64)
    quota = [0] * len(pools)
    remaining = n
    open_ = list(range(len(pools)))
    while remaining > 0 and open_:
        share = max(1, remaining // len(open_))
        for i in list(open_):
            take = min(share, len(pools[i]) - quota[i], remaining)
            quota[i] += take
            remaining -= take
            if quota[i] >= len(pools[i]):
                open_.remove(i)
            if remaining <= 0:
                break
    chosen = [rng.choice(p, size=q, replace=False) for p, q in zip(pools, quota) if q > 0]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def uniform_pixels(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` labelled pixels drawn uniformly: an unbiased sample for validation scores."""
    pool = np.flatnonzero(labels.reshape(-1) != IGNORE)
    if len(pool) <= n:
        return pool.astype(np.int64)
    return np.sort(rng.choice(pool, size=n, replace=False)).astype(np.int64)


