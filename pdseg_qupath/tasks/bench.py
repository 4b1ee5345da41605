"""``bench predict``: end-to-end prediction tiles/s against features-only tiles/s on the same device.

The ratio says how well reading, decoding, the head, stitching and vectorizing hide behind the backbone
(the goal on a GPU is ≥ 0.85). The slide is a synthetic JPEG-tiled pyramidal TIFF covered with tissue
(so every tile is predicted), written at the model's µm/px (no resampling, as with a 20× slide at 0.5).
The head ignores the features and outlines the purple nuclei by colour (see :func:`_colour_weights`):
its cost is that of any head, and the object load is realistic, unlike the noise of a random head.
"""

from __future__ import annotations

import math
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def synthetic_tissue(path: Path, side: int, mpp: float = 0.5, seed: int = 0) -> Path:
    """A ``side`` × ``side`` JPEG-tiled TIFF of H&E-like texture (pink stroma, purple nuclei), 2 levels."""
    import tifffile

    rng = np.random.default_rng(seed)
    img = np.empty((side, side, 3), np.uint8)
    img[:] = (228, 170, 205)
    img += rng.integers(0, 12, (side, side, 1), dtype=np.uint8)
    n = side * side // 400
    for x, y, r in zip(rng.integers(0, side, n), rng.integers(0, side, n), rng.integers(3, 8, n)):
        img[max(0, y - r) : y + r, max(0, x - r) : x + r] = (120, 70, 160)
    half = img[: side - side % 2, : side - side % 2].reshape(side // 2, 2, side // 2, 2, 3).mean(axis=(1, 3))
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, lvl in enumerate((img, half.astype(np.uint8))):
            ppcm = 1e4 / (mpp * 2**k)
            tw.write(lvl, tile=(256, 256), photometric="rgb", compression="jpeg", subfiletype=1 if k else 0,
                     resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
    return path


def _colour_weights(head) -> None:
    """Class 1 where the pixel is purple (blue − green high), class 0 elsewhere; features weigh 0.

    A random head labels pixels like salt and pepper (hundreds of objects per tile), which makes
    vectorizing far costlier than any trained model; this head outlines the synthetic nuclei instead,
    a dense but realistic object load (nucleus segmentation), at the same compute cost.
    """
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.rgb.weight[0, :, 0, 0] = torch.tensor([0.0, -10.0, 10.0])  # on (rgb / 127.5 - 1)
        head.rgb.bias[0] = -5.0  # pink stroma: 10·(35/127.5) ≈ 2.7 < 5 < purple nuclei: 10·(90/127.5) ≈ 7
        head.mid.weight[0, 0, 0, 0] = 1.0
        head.out.weight[1, 0, 0, 0] = 1.0
        head.out.weight[0, 0, 0, 0] = -1.0


def bench_model(backbone: str, device: str, tile: int | None = None, overlap: int | None = None,
                n_classes: int = 3, mpp: float = 0.5, out: Path | None = None, colour_head: bool = True):
    """A saved model on ``backbone`` whose head thresholds colour (for timing only: see
    :func:`_colour_weights`); ``colour_head=False``: random head weights."""
    from pdseg_qupath.backbone.features import LDMFeatures
    from pdseg_qupath.backbone.model import describe
    from pdseg_qupath.backbone.spec import load_backbone
    from pdseg_qupath.core.annotations import ClassInfo, ClassMap
    from pdseg_qupath.learn.head import FCNHead, HeadConfig
    from pdseg_qupath.learn.modelio import SegModel, save_model
    from pdseg_qupath.learn.options import IOConfig

    bb = load_backbone(backbone, device="cpu")
    fx = LDMFeatures(bb, device="cpu")
    torch.manual_seed(0)
    colors = [(200, 0, 0), (0, 150, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200)]
    cmap = ClassMap(tuple(ClassInfo(f"class{i}", colors[i % 5]) for i in range(n_classes)))
    t = tile or bb.config.tile_size
    head = FCNHead(HeadConfig(fx.channels, n_classes, rgb_skip=colour_head)).eval()
    if colour_head:
        _colour_weights(head)
    model = SegModel(head, cmap, IOConfig(mpp, t, overlap if overlap is not None else t // 4, fx.out_stride),
                     backbone={"spec": backbone, "sha256": bb.sha256, "random_weights": bb.random_weights,
                               "label": describe(bb)},
                     features={"t": list(fx.t), "blocks": list(fx.blocks), "channels": fx.channels,
                               "out_stride": fx.out_stride, "seed": fx.seed})
    save_model(model, out or Path(tempfile.mkdtemp(prefix="pdseg-bench-")) / "model")
    return model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_predict(backbone: str = "small", device: str = "cpu", batch_size: int = 8, tiles: int = 64,
                  tile: int | None = None, slide: str | Path | None = None, io_threads: int = 2,
                  compare_inline: bool = True, mpp: float = 0.5) -> dict[str, Any]:
    """Time end-to-end prediction of about ``tiles`` tiles and the backbone alone on the same tiles."""
    from pdseg_qupath.core.grid import Window, grid_size
    from pdseg_qupath.core.slide import open_slide
    from pdseg_qupath.learn.inference import predict_image
    from pdseg_qupath.learn.options import PredictOptions
    from pdseg_qupath.learn.predictor import Predictor
    from pdseg_qupath.learn.runtime import resolve_device

    device = resolve_device(device)
    model = bench_model(backbone, device, tile=tile, mpp=mpp)
    predictor = Predictor(model, device, batch_size)
    t, step = model.io.tile, model.io.tile - model.io.overlap
    tmp = Path(tempfile.mkdtemp(prefix="pdseg-bench-"))
    side = int(math.ceil(math.sqrt(tiles))) * step + model.io.overlap
    path = Path(slide) if slide else synthetic_tissue(tmp / "synthetic.tif", side, mpp)
    result: dict[str, Any] = {"backbone": predictor.label, "device": device, "batch_size": batch_size,
                              "tile": t, "overlap": model.io.overlap, "io_threads": io_threads}
    with open_slide(path, fallback_mpp=mpp) as s:
        d = mpp / s.mpp
        gw, gh = grid_size(s.width, s.height, d)
        region = Window(0, 0, min(gw, side), min(gh, side), d)
        warm = np.stack([s.read(Window(i * t, 0, t, t, d)) for i in range(batch_size)])
        predictor.logits(warm, [(i * t, 0) for i in range(batch_size)])  # warm-up (cuDNN autotune, allocator)
        predictor.extractor.extract(warm)
        _sync(device)

        def e2e(threads: int):
            t0 = time.perf_counter()
            pred = predict_image(s, predictor, region=region, options=PredictOptions(
                tissue_only=False, batch_size=batch_size, io_threads=threads))
            return pred, time.perf_counter() - t0

        pred, sec = e2e(io_threads)
        n = pred.tiles
        result.update(tiles=n, region_px=[region.width, region.height], end_to_end_tiles_per_s=n / sec,
                      objects=len(pred.annotations))
        # busy ms per tile of each stage: with overlap, the slowest stage (per thread) sets the pace
        result["stage_ms_per_tile"] = {k: 1000 * v / max(1, n) for k, v in pred.stage_seconds.items()}
        result["device_idle_waiting_for_tiles"] = pred.stage_seconds.get("wait", 0.0) / sec
        if compare_inline and io_threads > 0:
            pred0, sec0 = e2e(0)
            result["inline_tiles_per_s"] = pred0.tiles / sec0
            result["inline_stage_ms_per_tile"] = {k: 1000 * v / max(1, pred0.tiles)
                                                  for k, v in pred0.stage_seconds.items()}
        decoded = np.stack([s.read(Window((i % 8) * step, (i // 8) * step, t, t, d)) for i in range(batch_size)])
    origins = [(i * step, 0) for i in range(batch_size)]
    reps = max(1, n // batch_size)
    x = torch.from_numpy(decoded).to(device)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        predictor.extractor.extract(x, origins=origins)
    _sync(device)
    result["features_only_tiles_per_s"] = reps * batch_size / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(reps):
        predictor.logits(decoded, origins)
    result["features_and_head_tiles_per_s"] = reps * batch_size / (time.perf_counter() - t0)
    result["end_to_end_over_features_only"] = result["end_to_end_tiles_per_s"] / result["features_only_tiles_per_s"]
    result["end_to_end_over_features_and_head"] = (result["end_to_end_tiles_per_s"]
                                                   / result["features_and_head_tiles_per_s"])
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    return {k: (round(v, 3) if isinstance(v, float) else {a: round(b, 2) for a, b in v.items()}
                if isinstance(v, dict) else v) for k, v in result.items()}
