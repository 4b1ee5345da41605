"""H&E stain jitter in HED space (Tellez et al., 2018): the one implementation pdseg uses.

Labs differ mostly in how much haematoxylin and eosin they deposit, so perturbing each stain's optical
density (a scale and a small shift per stain, per image) mimics another lab's slide far better than
RGB colour jitter does. Pretraining and head training both call :func:`hed_jitter`.
"""

from __future__ import annotations

import numpy as np

#: Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB) in optical density RGB.
RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
RGB_FROM_HED /= np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> stain concentrations (..., 3) in natural-log optical density units."""
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    return od @ HED_FROM_RGB.astype(np.float32)


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hed`, rounded and clipped to uint8."""
    od = hed @ RGB_FROM_HED.astype(np.float32)
    rgb = 256.0 * np.exp(-od) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def hed_jitter(
    rgb: np.ndarray,
    rng: np.random.Generator,
    *,
    sigma: float = 0.05,
    bias: float = 0.02,
) -> np.ndarray:
    """Perturb each image's H, E and DAB densities: ``c' = c * U(1±sigma) + U(±bias)``.

    ``rgb`` is uint8 (H, W, 3) or a batch (N, H, W, 3); each image gets its own factors. The defaults are
    "mild": white background stays within about 2 % of white and nuclei stay recognisably blue.
    For one image it draws 3 scales, then 3 shifts from ``rng`` (the order ``augment.hed_jitter`` uses).
    """
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.shape[-1] != 3 or arr.ndim not in (3, 4):
        raise ValueError(f"hed_jitter expects uint8 (H, W, 3) or (N, H, W, 3), got {arr.dtype} {arr.shape}")
    batch = arr[None] if arr.ndim == 3 else arr
    n = batch.shape[0]
    alpha = rng.uniform(1.0 - sigma, 1.0 + sigma, size=(n, 1, 1, 3)).astype(np.float32)
    beta = rng.uniform(-bias, bias, size=(n, 1, 1, 3)).astype(np.float32)
    out = hed_to_rgb(rgb_to_hed(batch) * alpha + beta)
    return out[0] if arr.ndim == 3 else out
