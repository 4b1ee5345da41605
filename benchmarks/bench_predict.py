"""Prediction benchmarks (print JSON; figures go to docs/PERFORMANCE.md, "Cohort prediction").

    python benchmarks/bench_predict.py ratio   [--backbone small] [--device cpu] [--tile 128] [--tiles 100]
    python benchmarks/bench_predict.py rss     [--size 60000] [--out /tmp/pdseg-rss]
    python benchmarks/bench_predict.py scaling [--slides 4] [--side 1024]

- ``ratio``: end-to-end tiles/s over features-only tiles/s on the same device and tiles
  (:func:`pdseg_qupath.tasks.bench.bench_predict`, also ``pdseg-qupath bench predict``).
- ``rss``: peak RSS of a fresh process predicting a synthetic ``size`` × ``size`` px pyramidal JPEG
  TIFF at 0.25 µm/px (levels 1, 4, 16) through the cohort path (GeoJSON, class map, overlay,
  summary.csv), tiny backbone at 0.5 µm/px, tissue in twelve islands (about 1 % of the slide, so the
  CPU time stays sane; every tile row and the full 30,000-px work width are still crossed).
- ``scaling``: the same cohort of synthetic slides with 1 worker (in-process, all cores) and with 2
  worker processes (one core each), tiny backbone: the 1 → 2 worker speed-up.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ISLANDS = [(0.15 + 0.233 * i, 0.12 + 0.253 * j) for j in range(4) for i in range(3)]
ISLAND_R = 0.016


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        name = "unknown CPU"
    import os

    return f"{name}, {os.cpu_count()} cores (shared with other jobs)"


def make_islands_slide(out: Path, size: int) -> Path:
    """``size``² px at 0.25 µm/px, JPEG tiles, pyramid 1/4/16/64; tissue in :data:`ISLANDS` only."""
    import tifffile

    sys.path.insert(0, str(HERE))
    from synthetic_slide import TILE, _encode, _pattern_tiles

    out.mkdir(parents=True, exist_ok=True)
    tissue, glass = _pattern_tiles(0)
    enc = _encode(tissue + [glass], out)
    path = out / f"islands_{size}.tif"

    def in_tissue(x: float, y: float) -> bool:
        return any((x / size - cx) ** 2 + (y / size - cy) ** 2 <= ISLAND_R**2 for cx, cy in ISLANDS)

    levels = (1, 4, 16)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, ds in enumerate(levels):
            w = h = math.ceil(size / ds)
            ppcm = 1e4 / (0.25 * ds)
            kw = dict(photometric="rgb", compression="jpeg", subfiletype=0 if k == 0 else 1,
                      resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
            if ds == levels[-1]:  # the level the tissue mask reads: drawn pixel-exact, so that the mask
                yy, xx = np.mgrid[0:h, 0:w]  # matches the 512-px tiles of level 0 and not coarse blocks
                inside = np.zeros((h, w), bool)
                for cx, cy in ISLANDS:
                    inside |= ((xx + 0.5) * ds / size - cx) ** 2 + ((yy + 0.5) * ds / size - cy) ** 2 <= ISLAND_R**2
                img = np.where(inside[..., None], np.array([228, 170, 205], np.uint8), np.uint8(242))
                tw.write(img.astype(np.uint8), tile=(TILE, TILE), **kw)
                continue
            nx, ny = math.ceil(w / TILE), math.ceil(h / TILE)

            def gen(nx: int = nx, ny: int = ny, ds: int = ds):  # type: ignore[no-untyped-def]
                for j in range(ny):
                    for i in range(nx):
                        cx, cy = (i + 0.5) * TILE * ds, (j + 0.5) * TILE * ds
                        yield enc[(i * 7 + j * 3) % 16] if in_tissue(cx, cy) else enc[16]

            tw.write(gen(), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE), **kw)
    return path


def rss_child(slide: str, model: str, out: str, batch: int) -> None:
    """In a fresh process: predict the slide as `pdseg-qupath predict SLIDE --out DIR` would."""
    from pdseg_qupath.learn.options import PredictOptions
    from pdseg_qupath.tasks.cohort import predict_cohort

    t0 = time.perf_counter()
    res = predict_cohort([slide], model, out, devices="cpu", force=True,
                         options=PredictOptions(batch_size=batch, classmap=True, overlay=True))
    row = res.rows[0]
    print(json.dumps({"row": row, "seconds": round(time.perf_counter() - t0, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def cmd_rss(args: argparse.Namespace) -> dict:
    from pdseg_qupath.tasks.bench import bench_model

    out = Path(args.out)
    slide = out / f"islands_{args.size}.tif"
    if not slide.exists():
        t = time.perf_counter()
        make_islands_slide(out, args.size)
        print(f"made {slide} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    model = bench_model("random:tiny", "cpu", tile=args.tile, overlap=args.tile // 4, out=out / "model")
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from bench_predict import rss_child; "
            f"rss_child({str(slide)!r}, {str(model.path)!r}, {str(out / 'pred')!r}, {args.batch_size})")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    data = json.loads(res.stdout.strip().splitlines()[-1])
    geo = out / "pred" / f"{slide.name}.geojson"
    data.update(machine=machine(), slide=f"{args.size} x {args.size} px at 0.25 um/px, JPEG pyramid 1/4/16",
                work="tiny backbone (random weights), 0.5 um/px, tile %d, overlap %d" % (args.tile, args.tile // 4),
                work_grid_px=[math.ceil(args.size / 2)] * 2, tissue_fraction_design=round(len(ISLANDS) * math.pi * ISLAND_R**2, 3),
                geojson_mb=round(geo.stat().st_size / 2**20, 1), budget_mb=3072,
                child_max_rss_mb=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1))
    data["within_budget"] = data["child_max_rss_mb"] < 3072
    return data


def cmd_scaling(args: argparse.Namespace) -> dict:
    import torch

    from pdseg_qupath.learn.options import PredictOptions
    from pdseg_qupath.tasks.bench import bench_model, synthetic_tissue
    from pdseg_qupath.tasks.cohort import predict_cohort

    out = Path(args.out)
    slides = out / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    for i in range(args.slides):
        p = slides / f"s{i}.tif"
        if not p.exists():
            synthetic_tissue(p, args.side, 0.5, seed=i)
    model = bench_model("random:tiny", "cpu", tile=args.tile, overlap=args.tile // 4, out=out / "model")
    runs = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        res = predict_cohort([slides], model.path, out / f"pred{workers}", devices="cpu", workers=workers,
                             force=True, options=PredictOptions(batch_size=args.batch_size))
        sec = time.perf_counter() - t0
        assert res.count("ok") == args.slides, res.rows
        slide_sec = sum(float(r["seconds"]) for r in res.rows)
        runs[workers] = {"engine": res.engine, "tiles": res.tiles, "wall_s": round(sec, 1),
                         "tiles_per_s": round(res.tiles / sec, 2), "sum_slide_s": round(slide_sec, 1)}
    return {"machine": machine(), "torch_threads_1_worker": torch.get_num_threads(),
            "work": f"{args.slides} slides of {args.side}^2 px at 0.5 um/px, tiny backbone, tile {args.tile}",
            "runs": runs, "speedup_1_to_2": round(runs[2]["tiles_per_s"] / runs[1]["tiles_per_s"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["ratio", "rss", "scaling"])
    ap.add_argument("--backbone", default="random:tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--tiles", type=int, default=100)
    ap.add_argument("--io-threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=60_000)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--out", default="/tmp/pdseg-bench-predict")
    args = ap.parse_args()
    if args.mode == "ratio":
        from pdseg_qupath.tasks.bench import bench_predict

        data = bench_predict(args.backbone, args.device, args.batch_size, args.tiles,
                             tile=args.tile if args.backbone.endswith("tiny") else None, io_threads=args.io_threads)
        data["machine"] = machine() if args.device == "cpu" else data.get("gpu", args.device)
    elif args.mode == "rss":
        data = cmd_rss(args)
    else:
        data = cmd_scaling(args)
    print(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
