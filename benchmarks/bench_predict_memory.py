"""Peak memory of ``predict`` on a large synthetic slide (prints JSON).

The backbone is replaced by a cheap stand-in (smooth logits from the absolute position, so the slide
gets a few hundred large objects) because this measures the loop around it: tile reading, blending
strips, tissue masking, band vectorization, object merging and the overlay. Memory must not grow with
the slide's height, and only the stitch buffer (one tile row) grows with its width.

    python benchmarks/bench_predict_memory.py --size 40000      # 40k × 40k px at 0.25 µm/px
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=40000, help="level-0 side in px (0.25 µm/px)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "pdseg-predict-mem")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import synthetic_slide

    from pdseg_qupath.core.annotations import ClassInfo, ClassMap
    from pdseg_qupath.core.slide import open_slide
    from pdseg_qupath.learn.head import FCNHead, HeadConfig
    from pdseg_qupath.learn.inference import predict_image
    from pdseg_qupath.learn.modelio import SegModel
    from pdseg_qupath.learn.options import IOConfig, PredictOptions

    args.out.mkdir(parents=True, exist_ok=True)
    slide_path = args.out / f"synthetic-{args.size}.tif"
    if not slide_path.exists():
        made, _ = synthetic_slide.make(args.out, args.size)
        made.rename(slide_path)
    cmap = ClassMap((ClassInfo("A", (200, 0, 0)), ClassInfo("B", (0, 150, 0)), ClassInfo("C", (0, 0, 200))))
    model = SegModel(FCNHead(HeadConfig(4, 3)), cmap, IOConfig(0.5, 256, 64), backbone={}, features={}, model_id="bench")

    class FakePredictor:
        """Smooth, position-keyed logits: what a backbone + head would return, at no cost."""

        def __init__(self) -> None:
            self.model = model
            self.device = "cpu"
            self.runner = type("R", (), {"batch_size": 16})()

        def logits(self, tiles: np.ndarray, origins) -> np.ndarray:
            out = np.empty((len(tiles), 3, 256, 256), np.float32)
            yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
            for i, (x, y) in enumerate(origins):
                X, Y = (xx + x) / 900.0, (yy + y) / 700.0
                out[i, 0] = np.sin(X) * np.cos(Y)
                out[i, 1] = np.cos(X * 1.3) * 0.8
                out[i, 2] = tiles[i].mean(-1) / 255.0 - 0.7
            return out

    slide = open_slide(slide_path)
    t0 = time.perf_counter()
    pred = predict_image(slide, FakePredictor(), options=PredictOptions(tissue_only=True, batch_size=16))
    dt = time.perf_counter() - t0
    print(json.dumps({
        "slide_px": [slide.width, slide.height],
        "slide_mpp": slide.mpp,
        "work_grid_px": [pred.region.width, pred.region.height],
        "tiles": pred.tiles,
        "objects": len(pred.annotations),
        "seconds": round(dt, 1),
        "tiles_per_s_without_backbone": round(pred.tiles / dt, 1),
        "stitch_buffer_mb": round(4 * 256 * pred.region.width * 4 / 2**20, 1),
        "full_float_logits_would_be_gb": round(3 * pred.region.width * pred.region.height * 4 / 2**30, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
