"""End-to-end predict throughput vs features-only throughput, and peak RSS (prints JSON).

End-to-end = read tiles from the slide + backbone features + head + blending + strips + vectorizing
objects; features-only = ``LDMFeatures.extract`` on the same tiles already in memory, same batch size.
Their ratio says how much the loop around the backbone costs. The head's weights are random (speed
does not depend on them); the backbone is whatever ``--backbone`` resolves to.

    python benchmarks/bench_predict.py --backbone small --slide examples/CMU-1-Small-Region.svs
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="small")
    ap.add_argument("--slide", type=Path, default=Path("examples/CMU-1-Small-Region.svs"))
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tissue-only", action="store_true")
    ap.add_argument("--max-tiles", type=int, default=0, help="crop the region to about this many tiles (0 = all)")
    args = ap.parse_args()

    from pdseg_qupath.annotations import ClassInfo, ClassMap
    from pdseg_qupath.backbone.features import LDMFeatures
    from pdseg_qupath.backbone.model import describe, load_backbone
    from pdseg_qupath.grid import Window, grid_size
    from pdseg_qupath.head import FCNHead, HeadConfig
    from pdseg_qupath.modelio import SegModel, save_model
    from pdseg_qupath.predict import PredictOptions, Predictor, predict_image
    from pdseg_qupath.slide import open_slide

    bb = load_backbone(args.backbone, device=args.device)
    fx = LDMFeatures(bb, device=args.device)
    torch.manual_seed(0)
    cmap = ClassMap(tuple(ClassInfo(n, c) for n, c in (("A", (200, 0, 0)), ("B", (0, 150, 0)), ("C", (0, 0, 200)))))
    head = FCNHead(HeadConfig(fx.channels, 3))
    tmp = Path(tempfile.mkdtemp())
    model = SegModel(head, cmap, args.mpp, bb.config.tile_size, 64,
                     backbone={"spec": args.backbone, "sha256": bb.sha256, "random_weights": bb.random_weights,
                               "label": describe(bb)},
                     features={"t": list(fx.t), "blocks": list(fx.blocks), "channels": fx.channels,
                               "out_stride": fx.out_stride, "seed": fx.seed})
    save_model(model, tmp / "model")
    predictor = Predictor(model, args.device, args.batch_size)

    slide = open_slide(args.slide, fallback_mpp=0.5)
    d = args.mpp / slide.mpp
    gw, gh = grid_size(slide.width, slide.height, d)
    region = Window(0, 0, gw, gh, d)
    if args.max_tiles:
        step = model.tile_size - model.overlap
        side = int(np.sqrt(args.max_tiles)) * step + model.overlap
        region = Window(0, 0, min(gw, side), min(gh, side), d)
    predictor.logits(np.zeros((1, model.tile_size, model.tile_size, 3), np.uint8), [(0, 0)])  # warm-up
    t0 = time.perf_counter()
    pred = predict_image(slide, predictor, region=region,
                         options=PredictOptions(tissue_only=args.tissue_only, batch_size=args.batch_size))
    e2e = time.perf_counter() - t0
    n = pred.tiles

    # features only: the same number of tiles, already decoded, same batch size
    tiles = np.stack([slide.read(Window(x, 0, model.tile_size, model.tile_size, d))
                      for x in range(0, args.batch_size * 64, 64)])
    reps = max(1, n // args.batch_size)
    t1 = time.perf_counter()
    with torch.no_grad():
        for r in range(reps):
            fx.extract(tiles, origins=[(64 * i, 64 * r) for i in range(len(tiles))])
    feat_s = time.perf_counter() - t1
    feat_tps = reps * len(tiles) / feat_s
    print(json.dumps({
        "machine": f"{_cpu_name()}, {torch.get_num_threads()} torch threads" if args.device == "cpu" else args.device,
        "backbone": describe(bb),
        "slide": args.slide.name,
        "region_px": [region.width, region.height],
        "tiles": n,
        "objects": len(pred.annotations),
        "end_to_end_tiles_per_s": round(n / e2e, 3),
        "features_only_tiles_per_s": round(feat_tps, 3),
        "end_to_end_over_features_only": round((n / e2e) / feat_tps, 3),
        "seconds_end_to_end": round(e2e, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "stitch_buffer_mb_for_this_width": round((len(cmap) + 1) * model.tile_size * region.width * 4 / 2**20, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
