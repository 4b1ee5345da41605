"""A zoomed-out second view of every tile: the surroundings a pathologist sees at lower power.

With ``IOConfig.context = f`` (> 1), a tile of T px at the work resolution comes with a view of the f·T px
around it, centred on it and averaged down f× to T px. The backbone runs on both. The view's features
under the tile (its central T/f px) are upsampled f× and appended to the tile's own, so the head sees
every pixel at two scales: the tile's detail and f× more context (a 256-px tile at 0.5 µm/px: 128 µm
of tile, 256 µm of view at f = 2).

A tile travels as one (T, T, 6) uint8 array, the tile's RGB then its view's, so every reader, batch,
augmentation and cache carries both without knowing. One reader (:func:`read_tile`) cuts both for
training and prediction, and one function (:func:`fuse`) lines the view's features up with the tile's.

Cost: one more backbone pass per tile (2× the features' time), f² more pixels read, and twice the
feature channels in the training cache.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pdseg_qupath.core.grid import Window

__all__ = ["ContextFeatures", "read_tile", "fuse", "view_margin"]


def view_margin(tile: int, factor: int) -> int:
    """Work pixels the view reaches past the tile on each side: (f − 1)·T / 2."""
    return (factor - 1) * tile // 2


def read_tile(slide: Any, x: int, y: int, tile: int, downsample: float, factor: int = 1) -> np.ndarray:
    """The tile at work-grid (x, y): (T, T, 3) uint8, or (T, T, 6) with its f× zoomed-out view.

    The view is read at the work resolution and averaged over f × f blocks, so it is centred on the
    tile to the pixel whatever the tile's origin (outside the image the slide's padding shows).
    """
    if factor == 1:
        return slide.read(Window(x, y, tile, tile, downsample))
    m = view_margin(tile, factor)
    big = slide.read(Window(x - m, y - m, factor * tile, factor * tile, downsample))
    view = big.reshape(tile, factor, tile, factor, 3).mean(axis=(1, 3), dtype=np.float32)
    return np.concatenate([big[m:m + tile, m:m + tile], np.rint(view).astype(np.uint8)], axis=-1)


def fuse(tile_features: torch.Tensor, view_features: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 2C, h, w): the tile's features, then the view's under the tile, upsampled ``factor``×.

    Geometry: the tile is the view's central h/f × w/f feature cells. Bilinear upsampling (half-pixel
    centres) of those cells, with one cell of margin so the edges interpolate between real neighbours,
    puts the view's value at each tile cell's centre exactly.
    """
    b, c, h, w = view_features.shape
    ch, cw = h // factor, w // factor
    y0, x0 = (h - ch) // 2 - 1, (w - cw) // 2 - 1
    crop = view_features[:, :, y0:y0 + ch + 2, x0:x0 + cw + 2].float()
    up = F.interpolate(crop, scale_factor=factor, mode="bilinear", align_corners=False)
    up = up[:, :, factor:factor + h, factor:factor + w].to(tile_features.dtype)
    return torch.cat([tile_features, up], dim=1)


class ContextFeatures:
    """An extractor for (B, T, T, 6) tiles: the wrapped one's features of the tile and of its view, fused.

    It stands in for :class:`~pdseg_qupath.backbone.features.LDMFeatures` (everything else is delegated):
    ``channels`` is twice the backbone's, ``extract`` runs tile and view in one batch.
    """

    def __init__(self, extractor: Any, factor: int) -> None:
        self.extractor, self.factor = extractor, int(factor)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.extractor, name)

    @property
    def channels(self) -> int:
        return 2 * int(self.extractor.channels)

    @torch.no_grad()
    def extract(self, tiles: np.ndarray | torch.Tensor, cond: Any = None,
                origins: np.ndarray | torch.Tensor | Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(tiles)) if isinstance(tiles, np.ndarray) else tiles
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.shape[-1] != 6:
            from pdseg_qupath.core.errors import PdsegError
            raise PdsegError(f"a model with a {self.factor}× context view needs each tile with its view "
                             f"(B, H, W, 6); got {tuple(x.shape)}")
        b, t = x.shape[0], x.shape[1]
        org = np.zeros((b, 2), np.int64) if origins is None else np.asarray(
            origins.cpu() if isinstance(origins, torch.Tensor) else origins, dtype=np.int64).reshape(b, 2)
        # The view's own origin on its f× coarser grid keys its noise (floor: negative near the image's edge).
        view_org = (org - view_margin(t, self.factor)) // self.factor
        both = torch.cat([x[..., :3], x[..., 3:]])
        feats = self.extractor.extract(both, cond=cond if cond is None else _twice(cond),
                                       origins=np.concatenate([org, view_org]))
        return fuse(feats[:b], feats[b:], self.factor)


def _twice(cond: Any) -> Any:
    """A per-tile conditioning for the tiles, repeated for their views."""
    if isinstance(cond, dict):
        return {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
    return torch.cat([cond, cond]) if isinstance(cond, torch.Tensor) else cond
