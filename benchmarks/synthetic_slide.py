"""Peak memory of mask export on a whole slide: a synthetic 50,000 × 50,000 px pyramidal JPEG TIFF.

    python benchmarks/synthetic_slide.py [--out /tmp/pdseg-synth] [--size 50000] [--mpp 0.5]

1. ``make``: writes ``synthetic.tif`` (tiled JPEG, 0.25 µm/px, reduced levels at 4, 16, 64 as pages with
   ``subfiletype=1``) and ``synthetic.geojson`` (a few thousand QuPath-style polygons). It is fast because
   every tile is one of 17 JPEG tiles encoded once and streamed to tifffile as bytes (reduced levels reuse
   the same texture: the pixels are plausible H&E-like texture, not a true reduction).
2. ``measure`` (run in a fresh subprocess): reads the GeoJSON with the product's reader, opens the slide,
   computes the tissue mask, reads training-sized windows, exports masks at ``--mpp`` with an overlay,
   and reports its own peak RSS (``getrusage`` ru_maxrss). Prints JSON; the budget is 1.5 GB.
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

TILE = 512
LEVELS = (1, 4, 16, 64)
SLIDE_MPP = 0.25
BUDGET_MB = 1536


def _pattern_tiles(seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """16 H&E-like tissue tiles (pink stroma, purple nuclei) and one glass tile."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    side = 4 * TILE
    base = np.empty((side, side, 3), np.float32)
    base[:] = (228, 170, 205)
    base += rng.normal(0, 6, (side, side, 1))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for x, y, r in zip(rng.uniform(0, side, 2500), rng.uniform(0, side, 2500), rng.uniform(5, 14, 2500)):
        e = rng.uniform(0.6, 1.0)
        draw.ellipse((x - r, y - r * e, x + r, y + r * e), fill=tuple(int(v) for v in rng.normal((120, 70, 160), 12)))
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.2)))
    tissue = [arr[i * TILE : (i + 1) * TILE, j * TILE : (j + 1) * TILE] for i in range(4) for j in range(4)]
    glass = np.clip(rng.normal(242, 2, (TILE, TILE, 1)).repeat(3, axis=2), 0, 255).astype(np.uint8)
    return tissue, glass


def _encode(tiles: list[np.ndarray], tmp: Path) -> list[bytes]:
    """JPEG tiles exactly as tifffile writes them (so the streamed bytes match the page's tags)."""
    import tifffile

    mosaic = np.concatenate(tiles, axis=1)
    path = tmp / "_pattern.tif"
    tifffile.imwrite(path, mosaic, tile=(TILE, TILE), photometric="rgb", compression="jpeg", compressionargs={"level": 85})
    out = []
    with tifffile.TiffFile(path) as tf, open(path, "rb") as fh:
        page = tf.pages[0]
        assert page.jpegtables is None
        for off, n in zip(page.dataoffsets, page.databytecounts):
            fh.seek(off)
            out.append(fh.read(n))
    path.unlink()
    return out


def _in_tissue(x: float, y: float, size: int) -> bool:
    """An ellipse of tissue covering about half the slide."""
    return ((x - size / 2) / (0.45 * size)) ** 2 + ((y - size / 2) / (0.35 * size)) ** 2 <= 1


def make(out: Path, size: int, n_small: int = 3000, seed: int = 0) -> tuple[Path, Path]:
    import tifffile

    out.mkdir(parents=True, exist_ok=True)
    tissue, glass = _pattern_tiles(seed)
    encoded = _encode(tissue + [glass], out)
    tiles_t, tile_g = encoded[:16], encoded[16]
    slide = out / "synthetic.tif"
    with tifffile.TiffWriter(slide, bigtiff=True) as tw:
        for k, ds in enumerate(LEVELS):
            w = h = math.ceil(size / ds)
            nx, ny = math.ceil(w / TILE), math.ceil(h / TILE)

            def gen(nx: int = nx, ny: int = ny, ds: int = ds):  # type: ignore[no-untyped-def]
                for j in range(ny):
                    for i in range(nx):
                        cx, cy = (i + 0.5) * TILE * ds, (j + 0.5) * TILE * ds
                        yield tiles_t[(i * 7 + j * 3) % 16] if _in_tissue(cx, cy, size) else tile_g

            px_per_cm = 1e4 / (SLIDE_MPP * ds)
            tw.write(gen(), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                     compression="jpeg", subfiletype=0 if k == 0 else 1,
                     resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
    geo = out / "synthetic.geojson"
    geo.write_text(json.dumps(_annotations(size, n_small, seed)))
    return slide, geo


def _annotations(size: int, n_small: int, seed: int) -> dict:
    """Sparse, QuPath-like labels: big tumour/stroma regions, a few Ignore* areas, many small objects."""
    import uuid

    from shapely.geometry import Point, mapping

    rng = np.random.default_rng(seed)
    colors = {"Tumor": [200, 0, 0], "Stroma": [150, 200, 150], "Immune cells": [160, 90, 160], "Ignore*": [180, 180, 180]}

    def feature(geom, cls):  # type: ignore[no-untyped-def]
        return {"type": "Feature", "id": str(uuid.UUID(bytes=rng.bytes(16), version=4)), "geometry": mapping(geom),
                "properties": {"objectType": "annotation", "classification": {"name": cls, "color": colors[cls]}}}

    def centre() -> tuple[float, float]:
        while True:
            x, y = rng.uniform(0, size, 2)
            if _in_tissue(x, y, size):
                return x, y

    feats = []
    for i in range(40):
        r = rng.uniform(0.02, 0.08) * size
        feats.append(feature(Point(*centre()).buffer(r, quad_segs=int(rng.integers(64, 256))), ["Tumor", "Stroma"][i % 2]))
    for _ in range(5):
        feats.append(feature(Point(*centre()).buffer(rng.uniform(0.005, 0.02) * size, quad_segs=16), "Ignore*"))
    for _ in range(n_small):
        feats.append(feature(Point(*centre()).buffer(rng.uniform(8, 40), quad_segs=4), "Immune cells"))
    return {"type": "FeatureCollection", "features": feats}


def measure(slide_path: Path, geo: Path, out: Path, mpp: float, tile_size: int) -> dict:
    """Runs in a fresh process: everything `pdseg-qupath masks` does for one image, then peak RSS."""
    t0 = time.perf_counter()
    from pdseg_qupath.core.annotations import ClassMap
    from pdseg_qupath.core.grid import Window
    from pdseg_qupath.core.slide import open_slide
    from pdseg_qupath.core.tissue import tissue_mask
    from pdseg_qupath.outputs.masks import export_image_masks, write_classes_json
    from pdseg_qupath.sources.qupath.geojson import read_geojson

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    anns, _ = read_geojson(geo)
    cm = ClassMap.from_annotations(anns)
    t_read = time.perf_counter()
    with open_slide(slide_path) as s:
        mask, _ = tissue_mask(s)
        rng = np.random.default_rng(1)
        d = mpp / s.mpp
        t_reads = time.perf_counter()
        for _ in range(20):  # training-sized reads at the work resolution
            x, y = rng.integers(0, int(s.width / d) - 1024, 2)
            s.read(Window(int(x), int(y), 1024, 1024, d))
        t_slide = time.perf_counter()
        read_mpx_s = 20 * 1024 * 1024 / 1e6 / (t_slide - t_reads)
        stats = export_image_masks((s.width, s.height), s.mpp, anns, cm, out, s.name, mpp=mpp,
                                   tile_size=tile_size, overlay_reader=s.read)
        write_classes_json(out, cm, mpp)
    t_end = time.perf_counter()
    from bench_raster import machine

    return {
        "machine": machine(),
        "annotations": len(anns), "tissue_fraction": round(float(mask.mean()), 3),
        "grid": list(stats.grid), "tiles_total": stats.tiles_total, "tiles_written": len(stats.files),
        "tiles_skipped": stats.tiles_skipped, "labelled_mm2": {k: round(v, 3) for k, v in stats.area_mm2().items()},
        "seconds": {"imports": round(t_read - t0, 2), "slide_reads": round(t_slide - t_read, 2),
                    "export": round(t_end - t_slide, 2), "total": round(t_end - t0, 2)},
        "read_1024px_at_mpp_mpx_s": round(read_mpx_s, 1),
        "peak_rss_mb_after_imports": round(rss_imports, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="?", default="all", choices=["all", "make", "measure"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/pdseg-synth"))
    ap.add_argument("--size", type=int, default=50_000)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--tile-size", type=int, default=4096)
    args = ap.parse_args()
    slide, geo = args.out / "synthetic.tif", args.out / "synthetic.geojson"
    if args.command in ("all", "make"):
        t = time.perf_counter()
        make(args.out, args.size)
        print(json.dumps({"made": str(slide), "bytes": slide.stat().st_size, "seconds": round(time.perf_counter() - t, 1)}),
              file=sys.stderr)
    if args.command == "measure":
        print(json.dumps(measure(slide, geo, args.out / "masks", args.mpp, args.tile_size)))
        return
    if args.command == "all":
        res = subprocess.run([sys.executable, __file__, "measure", "--out", str(args.out), "--mpp", str(args.mpp),
                              "--tile-size", str(args.tile_size)], capture_output=True, text=True, check=True)
        data = json.loads(res.stdout)
        data["child_max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
        data["budget_mb"] = BUDGET_MB
        data["within_budget"] = data["child_max_rss_mb"] < BUDGET_MB
        print(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
