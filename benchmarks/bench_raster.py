"""Rasterize / vectorize throughput (Mpx/s) against plain rasterio doing the same work naively. Prints JSON.

Workload: a large grid with gbm40-like nucleus density (~125 nuclei per 512×512 px at 0.5 µm/px) plus a
few large tissue-region outlines with thousands of vertices, as pathologists draw them. Synthetic by
default; ``--gbm40 DIR`` instead tiles the real gbm40 GeoJSON files into a mosaic.

    python benchmarks/bench_raster.py [--size 8192] [--tile 2048] [--gbm40 DIR]

Rasterize: ours = :class:`AnnotationIndex` (STRtree, large outlines clipped) over tiles; naive = one
``rasterio.features.rasterize`` call per tile with every annotation, sorted large to small.
Vectorize: ours = :func:`vectorize`; naive = ``rasterio.features.shapes`` + ``shapely.geometry.shape`` +
``shapely.union_all`` per class.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import rasterio.features
import shapely
from shapely.geometry import Point, Polygon, shape

from pdseg_qupath.core.annotations import IGNORE, Annotation, ClassInfo, ClassMap
from pdseg_qupath.core.grid import Window, iter_windows
from pdseg_qupath.core.raster import AnnotationIndex, vectorize

NUCLEI_PER_PX = 4976 / 40 / 512**2


def _star(rng: np.random.Generator, cx: float, cy: float, r: float, n: int) -> Polygon:
    ang = np.sort(rng.uniform(0, 2 * math.pi, n))
    rad = r * rng.uniform(0.7, 1.0, n)
    return Polygon(np.c_[cx + rad * np.cos(ang), cy + rad * np.sin(ang)])


def synthetic(size: int, seed: int = 0) -> tuple[list[Annotation], ClassMap]:
    rng = np.random.default_rng(seed)
    anns: list[Annotation] = []
    for i in range(8):  # tissue regions: big, smooth, many vertices
        c = rng.uniform(0.2 * size, 0.8 * size, 2)
        r = rng.uniform(0.1 * size, 0.3 * size)
        region = Point(*c).buffer(r, quad_segs=max(64, int(r / 8)))
        anns.append(Annotation(region, ["Stroma", "Tumor"][i % 2]))
    for _ in range(3):
        c = rng.uniform(0, size, 2)
        anns.append(Annotation(Point(*c).buffer(rng.uniform(0.02, 0.05) * size, quad_segs=32), "Ignore*"))
    n = int(NUCLEI_PER_PX * size * size)
    xy = rng.uniform(0, size, (n, 2))
    for x, y in xy:
        anns.append(Annotation(_star(rng, x, y, rng.uniform(4, 9), int(rng.integers(12, 24))), "Nucleus"))
    cm = ClassMap((ClassInfo("Nucleus", (0, 0, 200)), ClassInfo("Stroma", (150, 200, 150)), ClassInfo("Tumor", (200, 0, 0))))
    return anns, cm


def gbm40_mosaic(folder: Path, cols: int = 8) -> tuple[list[Annotation], ClassMap, int]:
    files = sorted(folder.glob("*.geojson"))
    anns: list[Annotation] = []
    for i, f in enumerate(files):
        dx, dy = 512 * (i % cols), 512 * (i // cols)
        for feat in json.loads(f.read_text())["features"]:
            g = shapely.affinity.translate(shape(feat["geometry"]), dx, dy)
            anns.append(Annotation(g, feat["properties"]["classification"]["name"]))
    rows = math.ceil(len(files) / cols)
    cm = ClassMap((ClassInfo("Background", (200, 200, 200)), ClassInfo("Nucleus", (0, 0, 200))))
    return anns, cm, 512 * max(cols, rows)


def machine() -> str:
    """CPU model and core count, as the figures depend on both."""
    model = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def _timed(fn):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_rasterize(anns: list[Annotation], cm: ClassMap, size: int, tile: int) -> dict:
    windows = list(iter_windows(size, size, tile))
    mpx = size * size / 1e6

    def ours() -> np.ndarray:
        index = AnnotationIndex(anns, cm)
        out = np.empty((size, size), np.uint8)
        for w in windows:
            out[w.y : w.y + w.height, w.x : w.x + w.width] = index.rasterize(w)
        return out

    def naive() -> np.ndarray:
        shapes = sorted(((a.geometry, cm.index(a.classification)) for a in anns if cm.index(a.classification) is not None),
                        key=lambda s: -s[0].area)
        out = np.empty((size, size), np.uint8)
        for w in windows:
            out[w.y : w.y + w.height, w.x : w.x + w.width] = rasterio.features.rasterize(
                shapes, out_shape=w.shape, fill=IGNORE, transform=w.transform, dtype="uint8")
        return out

    def whole() -> np.ndarray:  # one call on the full grid: fast, but needs the whole mask in memory
        shapes = sorted(((a.geometry, cm.index(a.classification)) for a in anns if cm.index(a.classification) is not None),
                        key=lambda s: -s[0].area)
        return rasterio.features.rasterize(shapes, out_shape=(size, size), fill=IGNORE,
                                           transform=Window(0, 0, size, size).transform, dtype="uint8")

    a, t_ours = _timed(ours)
    b, t_naive = _timed(naive)
    c, t_whole = _timed(whole)
    return {
        "rasterio_whole_grid_s": round(t_whole, 3), "rasterio_whole_grid_mpx_s": round(mpx / t_whole, 2),
        "whole_grid_identical": bool((a == c).all()),
        "grid_px": [size, size], "tile": tile, "tiles": len(windows), "annotations": len(anns),
        "ours_s": round(t_ours, 3), "naive_s": round(t_naive, 3),
        "ours_mpx_s": round(mpx / t_ours, 2), "naive_mpx_s": round(mpx / t_naive, 2),
        "speedup": round(t_naive / t_ours, 2), "identical": bool((a == b).all()),
    }, a


def bench_vectorize(labels: np.ndarray, cm: ClassMap) -> dict:
    win = Window(0, 0, labels.shape[1], labels.shape[0])
    mpx = labels.size / 1e6

    def naive() -> dict:
        parts: dict[int, list] = {}
        for g, v in rasterio.features.shapes(labels, mask=labels < len(cm), connectivity=4, transform=win.transform):
            parts.setdefault(int(v), []).append(shape(g))
        return {cm.classes[k].name: shapely.union_all(p) for k, p in parts.items()}

    a, t_ours = _timed(lambda: vectorize(labels, cm, win))
    b, t_naive = _timed(naive)
    same = all(a[k].symmetric_difference(b[k]).area < 1e-6 for k in a) and set(a) == set(b)
    return {
        "grid_px": list(labels.shape[::-1]), "polygons": sum(len(shapely.get_parts(g)) for g in a.values()),
        "ours_s": round(t_ours, 3), "naive_s": round(t_naive, 3),
        "ours_mpx_s": round(mpx / t_ours, 2), "naive_mpx_s": round(mpx / t_naive, 2),
        "speedup": round(t_naive / t_ours, 2), "same_geometry": bool(same),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192, help="grid side in px (synthetic workload)")
    ap.add_argument("--tile", type=int, default=2048)
    ap.add_argument("--vector-size", type=int, default=4096, help="side of the label map vectorized")
    ap.add_argument("--gbm40", type=Path, help="folder of gbm40 NN.geojson files to mosaic instead")
    args = ap.parse_args()
    if args.gbm40:
        anns, cm, size = gbm40_mosaic(args.gbm40)
        workload = f"gbm40 mosaic ({args.gbm40})"
    else:
        size = args.size
        anns, cm = synthetic(size)
        workload = "synthetic gbm40-density nuclei + large regions"
    ras, labels = bench_rasterize(anns, cm, size, args.tile)
    v = min(args.vector_size, size)
    vec = bench_vectorize(np.ascontiguousarray(labels[:v, :v]), cm)
    print(json.dumps({"workload": workload, "machine": machine(),
                      "rasterize": ras, "vectorize": vec}, indent=2))


if __name__ == "__main__":
    main()
