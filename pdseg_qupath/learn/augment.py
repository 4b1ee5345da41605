"""Training augmentation: the 8 flips/rotations of a tile, and H&E stain jitter in HED space.

Stain jitter (Tellez et al. 2018; :mod:`pdseg_qupath.core.stain`, shared with pretraining) scales
and shifts each stain's optical density a little. It imitates another lab's staining protocol or scanner
without inventing colours that H&E cannot produce, so a head trained here survives slides from
elsewhere. Geometric transforms are applied to the tile and its labels together; stain jitter to the
tile only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pdseg_qupath.core.stain import hed_jitter

__all__ = ["AugmentConfig", "augment", "dihedral", "hed_jitter"]


def dihedral(image: np.ndarray, k: int) -> np.ndarray:
    """Element ``k`` (0..7) of the square's symmetry group: ``k % 4`` quarter turns, then a flip if k ≥ 4.

    Works on (H, W, ...) arrays, so the same call transforms an RGB tile and its label map.
    """
    out = np.rot90(image, k % 4, axes=(0, 1))
    if k >= 4:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


@dataclass(frozen=True)
class AugmentConfig:
    """What :func:`augment` may do. ``stain_sigma``/``stain_bias`` of 0 turn stain jitter off."""

    geometric: bool = True
    stain_sigma: float = 0.05
    stain_bias: float = 0.02


def augment(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, config: AugmentConfig = AugmentConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """One random view of a (H, W, 3) uint8 tile and its (H, W) labels, drawn from ``rng``."""
    if config.geometric:
        k = int(rng.integers(8))
        image, labels = dihedral(image, k), dihedral(labels, k)
    if config.stain_sigma > 0 or config.stain_bias > 0:
        image = hed_jitter(image, rng, sigma=config.stain_sigma, bias=config.stain_bias)
    return image, labels
