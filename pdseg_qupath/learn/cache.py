"""The training cache: LDM features at sampled labelled pixels, in RAM, bounded by a size in MB.

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

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pdseg_qupath.core.annotations import IGNORE
from pdseg_qupath.learn.head import sample_features

BYTES_PER_PIXEL_OVERHEAD = 3 + 1 + 4  # rgb (uint8 × 3), label (uint8), tile index (int32)


def bytes_per_pixel(channels: int) -> int:
    """Cache cost of one sampled pixel: fp16 features plus its colour, label and tile index."""
    return 2 * channels + BYTES_PER_PIXEL_OVERHEAD


def pixels_per_view(cache_mb: float, channels: int, n_views: int, cap: int) -> int:
    """How many pixels each tile view may keep so that ``n_views`` views fit in ``cache_mb``."""
    total = int(cache_mb * 2**20) // bytes_per_pixel(channels)
    return max(1, min(cap, total // max(1, n_views)))


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


@dataclass
class PixelCache:
    """Sampled pixels: features (N, C) fp16, rgb (N, 3) uint8, labels (N,) uint8, tile (N,) int32."""

    channels: int
    features: list[torch.Tensor] = field(default_factory=list)
    rgb: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    tile: list[torch.Tensor] = field(default_factory=list)

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

    def extend(self, other: "PixelCache") -> None:
        self.features += other.features
        self.rgb += other.rgb
        self.labels += other.labels
        self.tile += other.tile

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

    def save(self, path: Path) -> None:
        """One shard, written atomically (resume after an interruption)."""
        tmp = path.with_name(path.name + ".tmp")
        save_file(self.tensors(), str(tmp), metadata={"channels": str(self.channels)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "PixelCache":
        d = load_file(str(path))
        cache = cls(int(d["features"].shape[1]))
        cache.features, cache.rgb, cache.labels, cache.tile = [d["features"]], [d["rgb"]], [d["labels"]], [d["tile"]]
        return cache

    def class_counts(self, n_classes: int) -> np.ndarray:
        t = self.tensors()["labels"].numpy()
        return np.bincount(t[t < n_classes], minlength=n_classes)


# ------------------------------------------------------------------------------------- extraction


def resolve_device(device: str | None) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; asking for a missing GPU is an error."""
    from pdseg_qupath.core.errors import PdsegError

    d = (device or "auto").lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise PdsegError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu (or auto)")
    if d != "cpu" and not d.startswith("cuda"):
        raise PdsegError(f"--device {device}: expected auto, cpu or cuda")
    return d


def is_oom(exc: BaseException) -> bool:
    """A GPU (or allocator) out-of-memory error, whatever torch version raised it."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


class BatchRunner:
    """Run ``fn`` over items in batches; on out-of-memory, halve the batch size and retry that batch.

    The smaller size is kept for the rest of the run. At batch size 1 the error becomes a
    :class:`~pdseg_qupath.core.errors.PdsegError` that says what to try. Nothing is lost: a batch either
    completes or is retried whole.
    """

    def __init__(self, batch_size: int, on_backoff=None) -> None:
        self.batch_size = max(1, int(batch_size))
        self.on_backoff = on_backoff
        self.backoffs = 0

    def __call__(self, fn, items: list):
        """``fn(batch) -> list`` of per-item results; returns the results of all items, in order."""
        from pdseg_qupath.core.errors import PdsegError

        out: list = []
        i = 0
        while i < len(items):
            batch = items[i : i + self.batch_size]
            try:
                out.extend(fn(batch))
            except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not is_oom(exc):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if self.batch_size == 1:
                    raise PdsegError(
                        "out of GPU memory even at batch size 1; close other GPU programs, use a smaller "
                        "backbone, or run with --device cpu"
                    ) from None
                self.batch_size = max(1, self.batch_size // 2)
                self.backoffs += 1
                if self.on_backoff is not None:
                    self.on_backoff(self.batch_size)
                continue
            i += len(batch)
        return out


def load_extractor(spec: str, device: str, t=None, blocks=None):
    """(backbone, LDMFeatures) for a ``--backbone`` spec, with the backbone's default t and blocks."""
    from pdseg_qupath.backbone.features import LDMFeatures
    from pdseg_qupath.backbone.model import load_backbone

    backbone = load_backbone(spec, device=device)
    kwargs = {}
    if t is not None:
        kwargs["t"] = t
    if blocks is not None:
        kwargs["blocks"] = tuple(blocks)
    return backbone, LDMFeatures(backbone, device=device, **kwargs)
