"""The segmentation heads on frozen LDM features: ``pixel`` (PathSegDiff's 1x1 FCN) and ``context``.

The ``pixel`` head's exact layers (C = feature channels, K = classes, s = feature stride, 4 for VQ-f4)::

    x  = (features - mean) / std                      per-channel standardisation (fixed buffers)
    h1 = Conv1x1(C -> hidden[0])(x)                    at feature resolution (H/s x W/s)
    h1 = bilinear upsample x s (align_corners=False)   to pixel resolution (H x W)
    h1 = h1 + Conv1x1(3 -> hidden[0])(rgb/127.5 - 1)   only with ``rgb_skip`` (off by default)
    h  = ReLU, Dropout(p)
    h2 = Conv1x1(hidden[0] -> hidden[1]), ReLU, Dropout(p)
    logits = Conv1x1(hidden[1] -> K)

Every layer is a 1x1 convolution, so the head is a per-pixel MLP slid over the image (like Baranchuk et
al.'s pixel classifiers), and the first layer commutes with bilinear upsampling: applying it before the
upsample is exactly the same as applying it to features upsampled to full resolution, but needs
hidden[0] instead of C channels at full resolution (64 vs 2112 for the paper's backbone). That identity
is what lets training use features *sampled at labelled pixels* (:meth:`FCNHead.forward_pixels`) while
prediction runs the head densely on whole tiles (:meth:`FCNHead.forward`) with the same weights.

The ``context`` head inserts residual dilated 3x3 convolutions at feature resolution, after ``proj``::

    h1 = Conv1x1(C -> hidden[0])(x)
    h1 = h1 + Conv3x3(dilation d)(ReLU(h1))            for d in dilations (default 1, 2, 4, 8)
    ... then upsample, RGB skip (always on), ReLU, Dropout, Conv1x1, ReLU, Dropout, Conv1x1 as above.

With ``texture`` (context head only), fixed multi-scale colour-texture maps of the tile (:mod:`.texture`,
on the feature grid, standardised like the features) are added after the context blocks::

    h1 = h1 + Conv1x1(78 -> hidden[0])((texture(rgb) - tmean) / tstd)

Tissue classes are decided by structure over hundreds of µm, not the colour of one pixel: with
dilations 1, 2, 4, 8 each output pixel sees 1 + 2·15 = 31 feature pixels (124 px at stride 4, 124 µm at
1 µm/px), while the RGB skip keeps the borders sharp. Everything after the upsample is still per
pixel, so training computes the context maps of whole cached tiles at feature resolution and the rest
only at sampled labelled pixels (:meth:`FCNHead.forward_at`), exactly as dense prediction would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pdseg_qupath.learn.texture import CHANNELS as TEXTURE_CHANNELS
from pdseg_qupath.learn.texture import texture_maps

HEADS = ("pixel", "context")
"""``pixel``: the 1x1 FCN (a per-pixel classifier). ``context``: dilated 3x3 blocks at feature resolution."""

CONTEXT_DILATIONS = (1, 2, 4, 8)
CONTEXT_HIDDEN = (32, 32)
"""The context head's widths: its four 3x3 blocks at 32 channels cost ~50 MFLOP per 64x64 feature map."""


@dataclass(frozen=True)
class HeadConfig:
    in_channels: int
    n_classes: int
    hidden: tuple[int, int] = (64, 32)
    dropout: float = 0.1
    stride: int = 4
    rgb_skip: bool = False
    kind: str = "pixel"
    dilations: tuple[int, ...] = ()
    """Dilations of the context blocks (empty for the pixel head)."""
    texture: bool = False
    """Add the tile's multi-scale colour-texture maps (:mod:`.texture`) after the context blocks."""

    def __post_init__(self) -> None:
        if self.kind not in HEADS:
            raise ValueError(f"head {self.kind!r}: use one of {', '.join(HEADS)}")
        if (self.kind == "context") != bool(self.dilations):
            raise ValueError("a context head needs dilations, a pixel head none")
        if self.texture and self.kind != "context":
            raise ValueError("texture maps need whole tiles: only the context head takes them")

    @classmethod
    def build(cls, kind: str, in_channels: int, n_classes: int, **kw) -> HeadConfig:
        """A config of head ``kind``: the context head gets its dilations and always fuses RGB."""
        if kind == "context":
            kw = {**kw, "rgb_skip": True, "dilations": tuple(kw.get("dilations") or CONTEXT_DILATIONS)}
        if kw.get("hidden") is None:
            kw["hidden"] = CONTEXT_HIDDEN if kind == "context" else (64, 32)
        return cls(in_channels, n_classes, kind=kind, **kw)

    @property
    def receptive_field(self) -> int:
        """Width in pixels of the window one output pixel depends on (the bilinear upsample adds ~1 stride)."""
        return self.stride * (1 + 2 * sum(self.dilations))

    def to_json(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        d["dilations"] = list(self.dilations)
        return d

    @classmethod
    def from_json(cls, d: dict) -> HeadConfig:
        d = dict(d)
        d["hidden"] = tuple(int(h) for h in d.get("hidden", (64, 32)))
        d["dilations"] = tuple(int(x) for x in d.get("dilations", ()))
        return cls(**d)


def head_config(opts: Any, channels: int, n_classes: int, stride: int) -> HeadConfig:
    """The head ``train`` (and its cross-validation) builds from its options (:class:`~.options.TrainOptions`)."""
    return HeadConfig.build(opts.head, int(channels), n_classes, dropout=opts.dropout,
                            hidden=tuple(opts.hidden) if opts.hidden else None, stride=stride, rgb_skip=opts.rgb_skip,
                            texture=opts.texture_maps)


class FCNHead(nn.Module):
    """The pixel or context head on LDM features; see the module docstring for its layers."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        c, (h1, h2), k = config.in_channels, config.hidden, config.n_classes
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("std", torch.ones(c))
        self.proj = nn.Conv2d(c, h1, 1)
        self.context = nn.ModuleList(nn.Conv2d(h1, h1, 3, padding=d, dilation=d) for d in config.dilations)
        self.rgb = nn.Conv2d(3, h1, 1) if config.rgb_skip else None
        if config.texture:
            self.register_buffer("tmean", torch.zeros(TEXTURE_CHANNELS))
            self.register_buffer("tstd", torch.ones(TEXTURE_CHANNELS))
            self.tex = nn.Conv2d(TEXTURE_CHANNELS, h1, 1)
        else:
            self.tex = None
        self.mid = nn.Conv2d(h1, h2, 1)
        self.out = nn.Conv2d(h2, k, 1)
        self.drop = nn.Dropout(config.dropout)

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fix the per-channel feature statistics (from the training cache); tiny stds are floored."""
        self.mean.copy_(mean.to(self.mean))
        self.std.copy_(std.to(self.std).clamp_min(1e-4))

    def set_texture_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fix the per-channel statistics of the texture maps (from the training tiles)."""
        self.tmean.copy_(mean.to(self.tmean))
        self.tstd.copy_(std.to(self.tstd).clamp_min(1e-4))

    def texture_of(self, rgb: torch.Tensor | None) -> torch.Tensor | None:
        """The texture maps this head adds, from RGB tiles (B, 3, H, W); None for a head without them."""
        if self.tex is None:
            return None
        if rgb is None:
            raise ValueError("this head was trained with texture maps and needs the RGB tile")
        return texture_maps(rgb, self.config.stride)

    def _add_texture(self, h: torch.Tensor, texture: torch.Tensor | None) -> torch.Tensor:
        if self.tex is None:
            return h
        if texture is None:
            raise ValueError("this head was trained with texture maps and needs them (texture_of the RGB tile)")
        t = (texture.to(h.dtype) - self.tmean[:, None, None]) / self.tstd[:, None, None]
        return h + self.tex(t)

    def _tail(self, h: torch.Tensor, rgb: torch.Tensor | None) -> torch.Tensor:
        if self.rgb is not None:
            if rgb is None:
                raise ValueError("this head was trained with rgb_skip and needs the RGB tile")
            h = h + self.rgb(rgb.to(h.dtype) / 127.5 - 1.0)
        h = self.drop(F.relu(h))
        h = self.drop(F.relu(self.mid(h)))
        return self.out(h)

    def feature_map(self, features: torch.Tensor) -> torch.Tensor:
        """(B, hidden[0], H/s, W/s): the first layer (and the context blocks) at feature resolution."""
        x = (features - self.mean[:, None, None]) / self.std[:, None, None]
        h = self.proj(x)
        for conv in self.context:
            h = h + conv(F.relu(h))
        return h

    def forward(self, features: torch.Tensor, rgb: torch.Tensor | None = None,
                texture: torch.Tensor | None = None) -> torch.Tensor:
        """Dense logits (B, K, H, W) at pixel resolution from features (B, C, H/s, W/s).

        ``rgb`` is the (B, 3, H, W) tile (0..255), used only by heads with ``rgb_skip`` or ``texture``;
        ``texture`` its maps if already computed (:meth:`texture_of`).
        """
        if texture is None:
            texture = self.texture_of(rgb)
        h = self._add_texture(self.feature_map(features), texture)
        s = self.config.stride
        if s != 1:
            h = F.interpolate(h, scale_factor=s, mode="bilinear", align_corners=False)
        return self._tail(h, rgb)

    def forward_at(self, features: torch.Tensor, ys: list[torch.Tensor], xs: list[torch.Tensor],
                   rgb: torch.Tensor | None = None, texture: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, K) at pixels (ys[b], xs[b]) of tiles with features (B, C, H/s, W/s), concatenated
        over b; ``rgb`` (N, 3) holds those pixels' colours, ``texture`` the tiles' maps (B, 78, H/s, W/s)
        for a head with them. Equal to ``forward`` indexed there."""
        h = self._add_texture(self.feature_map(features), texture)
        picked = torch.cat([sample_features(h[b], ys[b], xs[b], self.config.stride) for b in range(len(h))])
        rgb4 = rgb[:, :, None, None] if rgb is not None else None
        return self._tail(picked[:, :, None, None], rgb4)[:, :, 0, 0]

    def forward_pixels(self, features: torch.Tensor, rgb: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, K) for N single pixels: features (N, C) already interpolated at those pixels
        (pixel head only: the context head needs whole maps, see :meth:`forward_at`)."""
        if self.context:
            raise ValueError("the context head needs whole feature maps (forward_at), not single pixels")
        x = (features - self.mean) / self.std
        h = self.proj(x[:, :, None, None])
        rgb4 = rgb[:, :, None, None] if rgb is not None else None
        return self._tail(h, rgb4)[:, :, 0, 0]


class HeadEnsemble(nn.Module):
    """Several heads of the same config, trained on the same features with different validation images
    and seeds, predicting together: the logits are log of the members' mean class probabilities.

    With 8 annotated images one head's score moves by several hundredths of macro Dice with its seed:
    early stopping on two validation images picks a noisy epoch. Averaging the members' probabilities
    keeps what they agree on; ``softmax`` of the output is exactly that mean, so review and uncertainty
    (1 − margin) read the ensemble's confidence.
    """

    def __init__(self, members: list[FCNHead]) -> None:
        super().__init__()
        if len(members) < 2 or any(m.config != members[0].config for m in members):
            raise ValueError("an ensemble needs two or more heads of one config")
        self.members = nn.ModuleList(members)
        self.config = members[0].config

    def forward(self, features: torch.Tensor, rgb: torch.Tensor | None = None) -> torch.Tensor:
        texture = self.members[0].texture_of(rgb)  # the same fixed maps for every member: computed once
        logp = torch.stack([F.log_softmax(m(features, rgb, texture).float(), dim=1) for m in self.members])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))


def head_members(head: nn.Module) -> list[FCNHead]:
    """The heads a model predicts with: the members of an ensemble, else the head itself."""
    return list(head.members) if isinstance(head, HeadEnsemble) else [head]


def pixel_sample_coords(y: torch.Tensor, x: torch.Tensor, size: tuple[int, int], stride: int):
    """Neighbours and weights that bilinear upsampling (align_corners=False) uses for pixel (y, x).

    Returns (y0, y1, wy, x0, x1, wx): the feature-grid rows/cols and the weight of row y1 / col x1.
    Matches ``F.interpolate(scale_factor=stride, mode="bilinear")`` exactly, edge clamping included.
    """
    h, w = size

    def axis(p: torch.Tensor, n: int):
        src = ((p.to(torch.float64) + 0.5) / stride - 0.5).clamp_min(0.0)
        p0 = src.floor().long().clamp_max(n - 1)
        p1 = (p0 + 1).clamp_max(n - 1)
        return p0, p1, (src - p0).to(torch.float32)

    y0, y1, wy = axis(y, h)
    x0, x1, wx = axis(x, w)
    return y0, y1, wy, x0, x1, wx


def sample_features(features: torch.Tensor, y: torch.Tensor, x: torch.Tensor, stride: int) -> torch.Tensor:
    """Features (C, h, w) bilinearly interpolated at pixel coordinates (y, x) → (N, C).

    Equal to upsampling the whole map by ``stride`` and indexing, without the full-resolution array.
    """
    _, h, w = features.shape
    y0, y1, wy, x0, x1, wx = pixel_sample_coords(y, x, (h, w), stride)
    f = features.float()
    top = f[:, y0, x0] * (1 - wx) + f[:, y0, x1] * wx
    bot = f[:, y1, x0] * (1 - wx) + f[:, y1, x1] * wx
    return (top * (1 - wy) + bot * wy).T.contiguous()
