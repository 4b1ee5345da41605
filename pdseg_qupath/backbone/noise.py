"""Position-keyed Gaussian noise: the same latent pixel always gets the same noise.

Feature extraction noises each latent to timestep t. If the noise came from a per-tile RNG, two
overlapping tiles would see different noise over the same tissue and their features would disagree at
the seams. Instead the noise at absolute latent pixel (X, Y), channel c, timestep t is a pure function
of (X, Y, c, t, seed): a counter-based hash (no RNG state), mapped to N(0, 1) by Box-Muller. It is
bit-identical between runs and identical wherever tiles overlap.
"""

from __future__ import annotations

import math

import torch

_MASK = 0xFFFFFFFF
# Odd multipliers below 2**31, so that (32-bit value) * (multiplier) < 2**63 never overflows int64.
_M1 = 0x7FEB352D
_M2 = 0x68E31DA5
_M3 = 0x1B873593
_GOLDEN = 0x61C88647  # added between chained inputs so that (a, b) and (b, a) hash differently


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply rounds) on int64 tensors holding values < 2**32."""
    x = x & _MASK
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK
    x = x ^ (x >> 13)
    x = (x * _M3) & _MASK
    return x ^ (x >> 16)


def hash_coords(*keys: torch.Tensor | int) -> torch.Tensor:
    """Hash integer coordinates (broadcasting tensors and ints) to uniform 32-bit values."""
    h: torch.Tensor | None = None
    for k in keys:
        if isinstance(k, torch.Tensor):
            kt = k.to(torch.int64)
        else:
            kt = torch.tensor(int(k), dtype=torch.int64, device=None if h is None else h.device)
        kt = kt & _MASK
        if h is None:
            h = _mix(kt + _GOLDEN)
        else:
            h = _mix(_mix(h + _GOLDEN + kt) ^ ((kt * _M3) & _MASK))
    assert h is not None
    return h


def position_noise(origins: torch.Tensor, channels: int, height: int, width: int, t: int, seed: int = 0,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of shape (B, channels, height, width) keyed by absolute latent position.

    ``origins`` is (B, 2) integer (x, y) of each tile's top-left latent pixel.
    """
    origins = origins.to(device=device, dtype=torch.int64)
    ys = torch.arange(height, device=device, dtype=torch.int64)
    xs = torch.arange(width, device=device, dtype=torch.int64)
    cs = torch.arange(channels, device=device, dtype=torch.int64)
    X = origins[:, 0].view(-1, 1, 1, 1) + xs.view(1, 1, 1, -1)
    Y = origins[:, 1].view(-1, 1, 1, 1) + ys.view(1, 1, -1, 1)
    C = cs.view(1, -1, 1, 1)
    base = hash_coords(X, Y, C, int(t), int(seed))
    h1 = _mix(base ^ 0x5BD1E995)
    h2 = _mix(base ^ 0x27D4EB2F)
    # (h + 0.5) / 2**32 lies strictly inside (0, 1), so log() is finite. float64 keeps all 32 bits.
    u1 = (h1.to(torch.float64) + 0.5) / 4294967296.0
    u2 = (h2.to(torch.float64) + 0.5) / 4294967296.0
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.to(dtype)
