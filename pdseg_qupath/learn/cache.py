"""The training cache: LDM features of the training tiles, in RAM, bounded by a size in MB.

Two forms, filled by one extraction loop (:func:`extract_views`): :class:`PixelCache` keeps features
only at sampled labelled pixels (the ``pixel`` head), :class:`MapCache` keeps whole feature maps at
feature resolution with the tile's colours and labels (the ``context`` head, whose dilated blocks need
the neighbourhood of each pixel). What follows explains the pixel form, the default's fast path.

Why this and not whole feature maps or latents:

- A full feature map is C × 64 × 64 per 256-px tile: 17 MB in bf16 for the paper's 2112 channels, 1.5 MB
  for the ``small`` backbone's 192. Writing them all to disk does not scale, and most of those pixels
  are unannotated (label 255) under sparse QuPath annotations anyway.
- Caching latents would save only the VQ encoder: the UNet pass, which is almost all the cost, would run
  again every epoch.
- The head is a per-pixel network (:mod:`pdseg_qupath.learn.head`), so a pixel's feature vector, interpolated
  exactly as dense prediction will see it, is all that training needs. A few hundred pixels per tile,
  stratified by class so rare classes are seen, carry nearly all the information of the tile for the
  head, at a small fraction of the size. Each tile's backbone pass then runs once (per augmented view),
  and every epoch after the first costs only the head.

The budget (``cache_mb``) fixes how many pixels each tile view may contribute; the cache never grows
past it. Shards can be written to disk so an interrupted run resumes without re-extracting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pdseg_qupath.core.annotations import IGNORE
from pdseg_qupath.core.fileio import atomic_write_with
from pdseg_qupath.core.grid import Window
from pdseg_qupath.learn.augment import AugmentConfig, augment
from pdseg_qupath.learn.data import TrainingImage
from pdseg_qupath.learn.head import sample_features
from pdseg_qupath.learn.options import IOConfig
from pdseg_qupath.learn.runtime import BatchRunner
from pdseg_qupath.learn.sampling import Tile, stratified_pixels, uniform_pixels

SHARD_VIEWS = 64
"""Tile views per feature shard: the unit that is written to disk, and redone after an interruption."""

BYTES_PER_PIXEL_OVERHEAD = 3 + 1 + 4  # rgb (uint8 × 3), label (uint8), tile index (int32)


def bytes_per_pixel(channels: int) -> int:
    """Cache cost of one sampled pixel: fp16 features plus its colour, label and tile index."""
    return 2 * channels + BYTES_PER_PIXEL_OVERHEAD


def pixels_per_view(cache_mb: float, channels: int, n_views: int, cap: int) -> int:
    """How many pixels each tile view may keep so that ``n_views`` views fit in ``cache_mb``."""
    total = int(cache_mb * 2**20) // bytes_per_pixel(channels)
    return max(1, min(cap, total // max(1, n_views)))


_C = TypeVar("_C", bound="_Cache")


@dataclass
class _Cache:
    """What both cache forms hold (features, rgb, labels, tile index: lists of tensors, concatenated by
    ``tensors()``) and how a shard of either is merged, written and read back."""

    channels: int
    features: list[torch.Tensor] = field(default_factory=list)
    rgb: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    tile: list[torch.Tensor] = field(default_factory=list)

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def extend(self: _C, other: _C) -> None:
        self.features += other.features
        self.rgb += other.rgb
        self.labels += other.labels
        self.tile += other.tile

    def save(self, path: Path) -> None:
        """One shard, written atomically (resume after an interruption)."""
        tensors = self.tensors()
        atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata={"channels": str(self.channels)}))

    @classmethod
    def load(cls: type[_C], path: Path) -> _C:
        d = load_file(str(path))
        cache = cls(int(d["features"].shape[1]))
        cache.features, cache.rgb, cache.labels, cache.tile = [d["features"]], [d["rgb"]], [d["labels"]], [d["tile"]]
        return cache


@dataclass
class PixelCache(_Cache):
    """Sampled pixels: features (N, C) fp16, rgb (N, 3) uint8, labels (N,) uint8, tile (N,) int32."""

    def add_tile(
        self,
        features: torch.Tensor,
        rgb: np.ndarray,
        labels: np.ndarray,
        flat_idx: np.ndarray,
        stride: int,
        tile_id: int,
    ) -> int:
        """Keep the pixels ``flat_idx`` of one tile: features (C, h, w) interpolated as the head will."""
        if len(flat_idx) == 0:
            return 0
        w = labels.shape[1]
        idx = torch.from_numpy(flat_idx)
        ys, xs = idx // w, idx % w
        feats = sample_features(features.detach().float().cpu(), ys, xs, stride)
        self.features.append(feats.to(torch.float16))
        self.rgb.append(torch.from_numpy(np.ascontiguousarray(rgb.reshape(-1, 3)[flat_idx])))
        self.labels.append(torch.from_numpy(np.ascontiguousarray(labels.reshape(-1)[flat_idx])))
        self.tile.append(torch.full((len(flat_idx),), tile_id, dtype=torch.int32))
        return len(flat_idx)

    def __len__(self) -> int:
        return sum(len(t) for t in self.labels)

    @property
    def nbytes(self) -> int:
        return len(self) * bytes_per_pixel(self.channels)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything concatenated (what training iterates over)."""
        if not self.labels:
            return {
                "features": torch.zeros((0, self.channels), dtype=torch.float16),
                "rgb": torch.zeros((0, 3), dtype=torch.uint8),
                "labels": torch.zeros(0, dtype=torch.uint8),
                "tile": torch.zeros(0, dtype=torch.int32),
            }
        return {
            "features": torch.cat(self.features),
            "rgb": torch.cat(self.rgb),
            "labels": torch.cat(self.labels),
            "tile": torch.cat(self.tile),
        }


def bytes_per_map(channels: int, tile: int, stride: int) -> int:
    """Cache cost of one whole tile view: fp16 feature map, rgb and labels at pixel resolution, tile index."""
    return 2 * channels * (tile // stride) ** 2 + 4 * tile * tile + 4


@dataclass
class MapCache(_Cache):
    """Whole tile views: features (V, C, h, w) fp16, rgb (V, T, T, 3) uint8, labels (V, T, T) uint8, tile (V,).

    With ``capacity`` (the number of views it will hold), :meth:`extend` copies each shard into tensors
    allocated once, so the views are never held twice (concatenating them at the end would, for a moment).
    """

    capacity: int | None = None
    _filled: int = 0
    _full: dict[str, torch.Tensor] = field(default_factory=dict)

    def extend(self, other: _Cache) -> None:
        if self.capacity is None:
            super().extend(other)
            return
        part = other.tensors()
        n = int(part["tile"].shape[0])
        if n == 0:
            return
        if self._filled + n > self.capacity:
            raise ValueError(f"map cache holds {self.capacity} views; got {self._filled + n}")
        if not self._filled:  # torch.empty: pages are only committed as views are written
            self._full = {k: torch.empty((self.capacity, *v.shape[1:]), dtype=v.dtype) for k, v in part.items()}
        for k, v in part.items():
            self._full[k][self._filled : self._filled + n] = v
        self._filled += n
        f = self._filled
        self.features, self.rgb = [self._full["features"][:f]], [self._full["rgb"][:f]]
        self.labels, self.tile = [self._full["labels"][:f]], [self._full["tile"][:f]]

    def add_map(self, features: torch.Tensor, rgb: np.ndarray, labels: np.ndarray, tile_id: int) -> int:
        """Keep one tile view whole; returns its number of labelled pixels."""
        self.features.append(features.detach().cpu().to(torch.float16)[None])
        # Copies: the tile arrays may be read-only views, and the cache outlives them.
        self.rgb.append(torch.from_numpy(np.array(rgb, copy=True))[None])
        self.labels.append(torch.from_numpy(np.array(labels, copy=True))[None])
        self.tile.append(torch.tensor([tile_id], dtype=torch.int32))
        return int((labels != IGNORE).sum())

    @property
    def views(self) -> int:
        return sum(len(t) for t in self.tile)

    def __len__(self) -> int:
        """Labelled pixels over all views (0: nothing to learn from)."""
        return int(sum(int((lab != IGNORE).sum()) for lab in self.labels))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for part in (self.features, self.rgb, self.labels, self.tile)
                   for t in part)

    def tensors(self) -> dict[str, torch.Tensor]:
        if not self.tile:
            return {"features": torch.zeros((0, self.channels, 0, 0), dtype=torch.float16),
                    "rgb": torch.zeros((0, 0, 0, 3), dtype=torch.uint8),
                    "labels": torch.zeros((0, 0, 0), dtype=torch.uint8), "tile": torch.zeros(0, dtype=torch.int32)}
        if len(self.tile) > 1:  # concatenate once, in place: the views are not held twice
            self.features, self.rgb = [torch.cat(self.features)], [torch.cat(self.rgb)]
            self.labels, self.tile = [torch.cat(self.labels)], [torch.cat(self.tile)]
        return {"features": self.features[0], "rgb": self.rgb[0], "labels": self.labels[0], "tile": self.tile[0]}


class Rows:
    """Rows ``index`` of ``base`` (along its first dimension), read on demand.

    An ensemble member trains on the cached views off its held-out images: indexing the one shared cache
    instead of copying that part of it keeps ``train --ensemble K`` at one cache in memory. It offers what
    head training reads of a cached tensor: ``len``, ``shape``, ``ndim``, ``dtype``, and one row, a slice
    or a list of rows (which come back as tensors, as from ``base`` itself).
    """

    def __init__(self, base: torch.Tensor, index: torch.Tensor) -> None:
        self.base, self.index = base, index.to(torch.long)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.index), *self.base.shape[1:]))

    @property
    def ndim(self) -> int:
        return self.base.ndim

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def __getitem__(self, i: int | slice | Sequence[int]) -> torch.Tensor:
        if isinstance(i, (int, np.integer)):
            return self.base[int(self.index[i])]
        return self.base[self.index[i] if isinstance(i, slice) else self.index[torch.as_tensor(i, dtype=torch.long)]]


# ------------------------------------------------------------------------------------- extraction


def extract_views(
    name: str,
    tiles: Sequence[Tile],
    images: Sequence[TrainingImage],
    n_classes: int,
    extractor: Any,
    io: IOConfig,
    *,
    views: int | Sequence[int],
    n_pixels: int,
    stratified: bool,
    aug: AugmentConfig,
    seed: int,
    runner: BatchRunner,
    shard: Callable[[str, int], Path | None] = lambda name, i: None,
    on_views: Callable[[int], None] | None = None,
    dense: bool = False,
) -> PixelCache | MapCache:
    """Features of every (tile, view): view 0 is the tile, later views are augmented (``views`` of each
    tile, or a count per tile). Kept at sampled pixels (a :class:`PixelCache`), or with ``dense`` as whole
    maps (a :class:`MapCache`).

    Work goes in shards of 64 views; with ``shard(name, i)`` giving a path, each finished shard is
    written there and a shard already on disk is loaded instead of extracted (resume).
    """
    kind: Any = MapCache if dense else PixelCache
    counts = [views] * len(tiles) if isinstance(views, (int, np.integer)) else list(views)
    jobs = [(ti, v) for ti in range(len(tiles)) for v in range(counts[ti])]
    cache = MapCache(int(extractor.channels), capacity=len(jobs)) if dense else PixelCache(int(extractor.channels))
    for s, start in enumerate(range(0, len(jobs), SHARD_VIEWS)):
        chunk = jobs[start : start + SHARD_VIEWS]
        path = shard(name, s)
        if path is not None and path.is_file():
            try:
                cache.extend(kind.load(path))
                if on_views:
                    on_views(len(chunk))
                continue
            except Exception:  # a shard cut short by the interruption: extract it again
                path.unlink(missing_ok=True)
        part = kind(cache.channels)

        def run(batch: list[tuple[int, int]]) -> list[int]:
            rgbs, labs, origins = [], [], []
            for ti, v in batch:
                t = tiles[ti]
                im = images[t.image]
                win = Window(t.x, t.y, io.tile, io.tile, io.downsample(im.slide.mpp))
                rgb, lab = im.slide.read(win), im.index.rasterize(win)
                if v > 0:
                    rgb, lab = augment(rgb, lab, np.random.default_rng([seed, 1, ti, v]), aug)
                rgbs.append(rgb)
                labs.append(lab)
                origins.append((t.x, t.y))
            with torch.no_grad():
                feats = extractor.extract(np.stack(rgbs), origins=origins).float().cpu()
            counts = []
            for (ti, v), f, rgb, lab in zip(batch, feats, rgbs, labs):
                if dense:
                    counts.append(part.add_map(f, rgb, lab, ti))
                    continue
                rng = np.random.default_rng([seed, 2, ti, v])
                idx = (stratified_pixels(lab, n_pixels, n_classes, rng) if stratified
                       else uniform_pixels(lab, n_pixels, rng))
                counts.append(part.add_tile(f, rgb, lab, idx, io.stride, ti))
            if on_views:
                on_views(len(batch))
            return counts

        runner(run, chunk)
        if path is not None:
            part.save(path)
        cache.extend(part)
    return cache
