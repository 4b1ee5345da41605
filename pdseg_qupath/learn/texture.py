"""Multi-scale colour-texture maps of a tile: what a classic pixel classifier sees, for the context head.

A colour-texture pixel classifier (QuPath's, or ``benchmarks/baseline_pixel_classifier.py``) decides each
pixel from the colour of its neighbourhood at several scales. Where tissue classes differ mostly in such
statistics (pale necrosis against dense tumour on a low-magnification section) it can beat LDM features.
The context head can add these maps to its own (``HeadConfig.texture``), so that it has both.

For the tile's RGB (scaled to 0..1) and its H, E and DAB optical densities, and each scale σ in
:data:`SIGMAS` (pixels at the work resolution): the Gaussian blur G_σ, the difference of Gaussians
G_σ − G_2σ and the gradient magnitude of G_σ (per pixel); 6 + 6 × 3 × 4 = 78 channels on the feature grid.
The head adds them after its context blocks, and bilinear upsampling of such smooth maps loses little.

Each scale is filtered on a Gaussian-pyramid-like grid: the channels are first averaged over f × f blocks,
f the largest power of two ≤ min(σ, stride) that divides the stride, then blurred with σ / f (support ±3σ/f, replicate padding at
the tile's border), then averaged down to the feature grid. A blur of σ ≥ f barely differs from the same
blur at full resolution, and the work drops by f²: about 10 ms per 256-px tile on one CPU core. Fixed
filters: nothing here is learned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pdseg_qupath.core.stain import HED_FROM_RGB

SIGMAS = (2.0, 4.0, 8.0, 16.0)
CHANNELS = 6 + 6 * 3 * len(SIGMAS)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W): support ±3σ, replicate padding."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Central differences (one-sided at the border), as ``numpy.gradient``, per grid cell."""
    gx = torch.gradient(x, dim=3)[0] if x.shape[3] > 1 else torch.zeros_like(x)
    gy = torch.gradient(x, dim=2)[0] if x.shape[2] > 1 else torch.zeros_like(x)
    return torch.sqrt(gx * gx + gy * gy)


def _pool(x: torch.Tensor, f: int) -> torch.Tensor:
    return F.avg_pool2d(x, f) if f > 1 else x


def texture_maps(rgb: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, :data:`CHANNELS`, H/stride, W/stride) float32 maps of RGB tiles (B, 3, H, W), 0..255."""
    x = rgb.float()
    od = -torch.log((x + 1.0) / 256.0)
    hed = torch.einsum("bchw,cd->bdhw", od, torch.as_tensor(HED_FROM_RGB, dtype=torch.float32, device=x.device))
    levels = {1: torch.cat([x / 255.0, hed], dim=1)}
    blurred: dict[tuple[int, float], torch.Tensor] = {}  # σ's 2σ blur is often the next σ's own blur

    def blur(f: int, sigma: float) -> torch.Tensor:
        if f not in levels:
            levels[f] = _pool(levels[1], f)
        if (f, sigma) not in blurred:
            blurred[f, sigma] = _blur(levels[f], sigma / f)
        return blurred[f, sigma]

    out = [_pool(levels[1], stride)]
    for s in SIGMAS:
        f = 1
        while 2 * f <= min(s, stride) and stride % (2 * f) == 0:
            f *= 2
        g, g2 = blur(f, s), blur(f, 2 * s)
        rest = stride // f
        out += [_pool(g, rest), _pool(g - g2, rest), _pool(_gradient_magnitude(g) / f, rest)]
    return torch.cat(out, dim=1)
