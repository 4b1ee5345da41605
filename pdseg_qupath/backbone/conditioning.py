"""Conditioning embedders: turn SSL embeddings into the UNet's cross-attention context tokens.

Parameter names follow the original checkpoints (``cond_stage_model.<name>``), so converting one is an
identity mapping and any unexpected key is caught by ``load_state_dict(strict=True)``.

Feature extraction normally runs unconditionally; ``null_context`` gives exactly what each model saw
for "no conditioning" in training, which differs between the two families (see its docstrings).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pdseg_qupath.core.errors import PdsegError


class SSLEmbedder(nn.Module):
    """PathSegDiff / Large-Image-Diffusion: one linear projection per SSL embedding, one token each.

    BRCA 20x: a HIPT ViT-S patch embedding (384-d, 20x) and a region embedding (768-d, 5x), each
    L2-normalised and projected to 512, stacked as 2 tokens. Inputs (``keys``) default to the original
    batch keys ``feat_20x`` and ``feat_5x``; a missing one is zero, as in the original code.
    """

    kind = "ssl"

    def __init__(self, in_dims: tuple[int, ...] | list[int] = (384, 768), out_dim: int = 512,
                 normalize: bool = True, keys: tuple[str, ...] | list[str] | None = None) -> None:
        super().__init__()
        in_dims = tuple(int(d) for d in in_dims)
        if len(in_dims) not in (1, 2):
            raise ValueError("SSLEmbedder takes one (patch) or two (patch, region) embeddings")
        self.in_dims = in_dims
        self.out_dim = int(out_dim)
        self.normalize = bool(normalize)
        self.keys = tuple(keys) if keys else ("feat_20x", "feat_5x")[: len(in_dims)]
        self.patch_fc = nn.Linear(in_dims[0], out_dim)
        if len(in_dims) == 2:
            self.region_fc = nn.Linear(in_dims[1], out_dim)

    def config(self) -> dict[str, Any]:
        return {"type": self.kind, "in_dims": list(self.in_dims), "out_dim": self.out_dim,
                "normalize": self.normalize, "keys": list(self.keys)}

    @property
    def num_tokens(self) -> int:
        return len(self.in_dims)

    def forward(self, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        first = cond.get(self.keys[0])
        if first is None:
            raise PdsegError(f"conditioning needs the '{self.keys[0]}' embedding ({self.in_dims[0]}-d)")
        first = first.float()
        b = first.shape[0]
        embeds = [first]
        if len(self.in_dims) == 2:
            second = cond.get(self.keys[1])
            embeds.append(second.float() if second is not None
                          else first.new_zeros(b, self.in_dims[1]))
        tokens = []
        for e, fc, d in zip(embeds, self._fcs(), self.in_dims):
            if e.shape != (b, d):
                raise PdsegError(f"conditioning embedding has shape {tuple(e.shape)}, expected ({b}, {d})")
            if self.normalize:
                e = F.normalize(e, dim=-1)
            tokens.append(fc(e))
        return torch.stack(tokens, dim=1)

    def _fcs(self) -> list[nn.Linear]:
        return [self.patch_fc] + ([self.region_fc] if len(self.in_dims) == 2 else [])

    def null_context(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """Training dropped conditioning by zeroing the EMBEDDINGS (p=0.1), so the null context is
        the projection biases, not zeros."""
        zeros = {k: torch.zeros(batch, d, device=device) for k, d in zip(self.keys, self.in_dims)}
        return self.forward(zeros).to(dtype)


class _EncoderBlock(nn.Module):
    """Pre-norm ViT block with torchvision's parameter names (ln_1, self_attention, ln_2, mlp.0/3)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Identity(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.self_attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Encoder(nn.Module):
    def __init__(self, seq_length: int, layers: int, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.zeros(1, seq_length, dim))
        # Named encoder_layer_<i> as in torchvision, so original checkpoints load key for key.
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", _EncoderBlock(dim, heads, mlp_dim)) for i in range(layers)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(x + self.pos_embedding))


class ZoomLDMEmbedder(nn.Module):
    """ZoomLDM (``EmbeddingViT2_5``): a grid of UNI embeddings plus a magnification level, summarised
    by a 12-layer ViT into 1 + 64 context tokens of 512.

    Inputs: ``ssl_feat`` (B, 1024, h, w) with h, w <= 8 (larger grids are average-pooled to 8x8 by the
    original data loader) and ``mag`` (B,) integer level (0 = 20x, 1 = 10x, ... 4 = 1.25x).
    """

    kind = "zoomldm"

    def __init__(self, input_channels: int = 1024, hidden_channels: int = 512, output_channels: int = 512,
                 vit_mlp_dim: int = 2048, num_layers: int = 12, num_heads: int = 8, seq_length: int = 64,
                 mag_levels: int = 8) -> None:
        super().__init__()
        self.cfg = dict(input_channels=input_channels, hidden_channels=hidden_channels,
                        output_channels=output_channels, vit_mlp_dim=vit_mlp_dim, num_layers=num_layers,
                        num_heads=num_heads, seq_length=seq_length, mag_levels=mag_levels)
        self.seq_length = seq_length
        self.out_dim = output_channels
        self.mag_embedding = nn.Embedding(mag_levels, hidden_channels)
        self.dim_reduce = nn.Linear(input_channels, hidden_channels)
        self.pad_token = nn.Parameter(torch.zeros(1, 1, hidden_channels))
        self.encoder = _Encoder(seq_length + 1, num_layers, hidden_channels, num_heads, vit_mlp_dim)
        self.final_proj = nn.Linear(hidden_channels, output_channels)
        self.layer_norm = nn.LayerNorm(hidden_channels)

    def config(self) -> dict[str, Any]:
        return {"type": self.kind, **self.cfg}

    @property
    def num_tokens(self) -> int:
        return self.seq_length + 1

    def _tokens(self, feat: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) grid -> (B, 64, hidden): small grids sit centred in a field of pad tokens."""
        b, c, h, w = feat.shape
        n = h * w
        x = self.dim_reduce(feat.float().flatten(2).transpose(1, 2))
        if n == self.seq_length:
            return x
        if n > self.seq_length:
            raise PdsegError(f"ZoomLDM conditioning grid {h}x{w} has more than {self.seq_length} embeddings; "
                             "average-pool it to 8x8 first")
        pad = self.pad_token.expand(b, self.seq_length, -1).clone()
        start = self.seq_length // 2 - n // 2
        pad[:, start:start + n] = x
        return pad

    def forward(self, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "ssl_feat" not in cond or "mag" not in cond:
            raise PdsegError("ZoomLDM conditioning needs 'ssl_feat' (B, 1024, h, w) and 'mag' (B,)")
        feat = cond["ssl_feat"]
        if feat.dim() == 2:
            feat = feat[:, :, None, None]
        x = self._tokens(feat)
        mag = self.mag_embedding(cond["mag"].long()).unsqueeze(1)
        x = self.encoder(torch.cat([mag, x], dim=1))
        return self.layer_norm(self.final_proj(x))

    def null_context(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """ZoomLDM dropped conditioning by zeroing the OUTPUT tokens, so the null context is zeros."""
        return torch.zeros(batch, self.num_tokens, self.out_dim, device=device, dtype=dtype)


Conditioner = SSLEmbedder | ZoomLDMEmbedder

_KINDS = {"ssl": SSLEmbedder, "zoomldm": ZoomLDMEmbedder}


def build_conditioner(cfg: Mapping[str, Any] | None) -> Conditioner | None:
    """Build the embedder named by ``cfg['type']`` (default ``ssl``); None means unconditional."""
    if cfg is None:
        return None
    kwargs = dict(cfg)
    kind = kwargs.pop("type", "ssl")
    if kind not in _KINDS:
        raise PdsegError(f"unknown conditioner type {kind!r}; known: {', '.join(_KINDS)}")
    return _KINDS[kind](**kwargs)
