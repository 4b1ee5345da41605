"""Check exported masks against an independent rasterization (PIL, 16× supersampled, pixel centres).

Usage: pdseg-qupath masks DATA --mpp 0.5 --image-mpp 0.5 --out MASKS
       python benchmarks/check_masks_iou.py DATA MASKS [--class Nucleus]
Only for images exported at their own resolution (downsample 1). Prints JSON with per-image IoU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from shapely.geometry import shape

S = 16


def reference(geojson: Path, size: tuple[int, int], names: list[str]) -> np.ndarray:
    feats = json.loads(geojson.read_text())["features"]
    feats.sort(key=lambda f: -shape(f["geometry"]).area)  # larger first, smaller on top
    im = Image.new("L", (size[0] * S, size[1] * S), 255)
    draw = ImageDraw.Draw(im)
    for f in feats:
        k = names.index(f["properties"]["classification"]["name"])
        g = f["geometry"]
        for poly in [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]:
            draw.polygon([(x * S, y * S) for x, y in poly[0]], fill=k)
            for hole in poly[1:]:
                draw.polygon([(x * S, y * S) for x, y in hole], fill=255)
    return np.array(im)[S // 2 :: S, S // 2 :: S]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path)
    ap.add_argument("masks", type=Path)
    ap.add_argument("--class", dest="cls", default="Nucleus")
    a = ap.parse_args()
    names = [c["name"] for c in json.loads((a.masks / "classes.json").read_text())["classes"]]
    k = names.index(a.cls)
    ious = {}
    for gj in sorted(a.data.glob("*.geojson")):
        ours = np.array(Image.open(a.masks / f"{gj.stem}.png"))
        ref = reference(gj, (ours.shape[1], ours.shape[0]), names)
        x, y = ref == k, ours == k
        ious[gj.stem] = float((x & y).sum() / max(1, (x | y).sum()))
    v = list(ious.values())
    print(json.dumps({"class": a.cls, "images": len(v), "iou_min": min(v), "iou_mean": float(np.mean(v)), "per_image": ious}, indent=1))


if __name__ == "__main__":
    main()
