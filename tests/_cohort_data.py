"""Tiny pyramidal TIFF slides and a throwaway tiny-backbone model for the cohort tests.

The model's head has seeded random weights: the cohort machinery (queues, resume, outputs) does not
depend on what the head learned, and skipping training keeps these tests to seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

PINK = (236, 170, 200)
PURPLE = (90, 50, 140)


def slide_pixels(w: int, h: int, seed: int, glass_right: float = 0.0) -> np.ndarray:
    """Pink tissue with purple disks; the right ``glass_right`` fraction is white glass."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.float32)
    img[:] = PINK
    img += rng.normal(0, 6, img.shape)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(max(1, w * h // 900)):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(3, 7)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = PURPLE
    if glass_right:
        img[:, int(w * (1 - glass_right)):] = 243
    return img.clip(0, 255).astype(np.uint8)


def write_pyramid(path: Path, w: int = 96, h: int = 80, seed: int = 0, mpp: float = 0.5,
                  glass_right: float = 0.0) -> Path:
    """A 2-level tiled TIFF (level 1 = half size, subfiletype=1) that tiffslide opens with its µm/px."""
    base = slide_pixels(w, h, seed, glass_right)
    levels = [base, base[: h - h % 2, : w - w % 2].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tw:
        for k, lvl in enumerate(levels):
            px_per_cm = 1e4 / (mpp * 2**k)
            tw.write(lvl, tile=(32, 32), photometric="rgb", compression="zlib", subfiletype=0 if k == 0 else 1,
                     resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
    return path


def tiny_model(out: Path, seed: int = 0, tile: int = 32, overlap: int = 8) -> Path:
    """A saved model on the ``random:tiny`` backbone with a seeded random 2-class head."""
    import torch

    from pdseg_qupath.backbone.features import LDMFeatures
    from pdseg_qupath.backbone.model import describe
    from pdseg_qupath.backbone.spec import load_backbone
    from pdseg_qupath.core.annotations import ClassInfo, ClassMap
    from pdseg_qupath.learn.head import FCNHead, HeadConfig
    from pdseg_qupath.learn.modelio import SegModel, save_model
    from pdseg_qupath.learn.options import IOConfig

    spec = "random:tiny"
    bb = load_backbone(spec, device="cpu")
    fx = LDMFeatures(bb, device="cpu")
    torch.manual_seed(seed)
    head = FCNHead(HeadConfig(fx.channels, 2, hidden=(16, 8), rgb_skip=True))
    cmap = ClassMap((ClassInfo("Stroma", (200, 120, 160)), ClassInfo("Nucleus", (60, 30, 160))))
    model = SegModel(head.eval(), cmap, IOConfig(0.5, tile, overlap, fx.out_stride),
                     backbone={"spec": spec, "sha256": bb.sha256, "random_weights": bb.random_weights,
                               "label": describe(bb)},
                     features={"t": list(fx.t), "blocks": list(fx.blocks), "channels": fx.channels,
                               "out_stride": fx.out_stride, "seed": fx.seed})
    return save_model(model, out)
