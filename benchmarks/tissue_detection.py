"""How much annotated tissue the tissue detector finds, and how much glass it takes for tissue.

`predict` writes nothing outside the detected tissue and `evaluate` scores only inside it, so tissue the
detector misses is tissue the user never gets a class for. This measures the product's detector
(`core.tissue`, exactly as `predict` and `evaluate` call it: default mask resolution, one pixel of
dilation) on data sets with dense labels laid out like ``shared/data/ebhi-seg`` (``test/<name>.png`` with
``test/labels/<name>_labels.png``, ``classes.json``):

    python benchmarks/tissue_detection.py DATA/ebhi-seg /work/data/ivygap-gbm --mpp 1.2 --mpp 4 \\
        --glass-class - --glass-class Background \\
        [--range 20 60 --smoothing 0] [--out J]

For each set: the share of each class's annotated pixels inside the detected tissue (``recall``) and,
where a class names the glass (``--glass-class``, one per set or one for all), the share of its bright
pixels (every channel above 200, i.e. glass rather than tissue the annotator called background) that the
detector calls tissue (``glass_kept``). ``--range`` and ``--smoothing`` override the detector's saturation
range and smoothing, to compare with an earlier setting on the same images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pdseg_qupath.core import tissue
from pdseg_qupath.core.slide import open_slide


def measure(root: Path, mpp: float, glass: str | None) -> dict:
    names = [c["name"] for c in json.loads((root / "classes.json").read_text())["classes"]]
    if glass is not None and glass not in names:
        raise SystemExit(f"{root}: no class {glass!r} (classes: {', '.join(names)})")
    inside = np.zeros(len(names), np.int64)
    total = np.zeros(len(names), np.int64)
    glass_in = glass_all = 0
    images = 0
    for png in sorted((root / "test").glob("*.png")):
        lab_path = root / "test" / "labels" / f"{png.stem}_labels.png"
        if not lab_path.exists():
            continue
        labels = np.asarray(Image.open(lab_path))
        with open_slide(png, mpp=mpp) as slide:
            tmap = tissue.TissueMap.detect(slide, 1.0, None, dilate=1)
            rgb = slide.thumbnail(mpp)  # the image itself, from the slide already open
        found = tmap.pixels(0, labels.shape[0], 0, labels.shape[1])
        for k in range(len(names)):
            sel = labels == k
            total[k] += int(sel.sum())
            inside[k] += int((sel & found).sum())
        if glass is not None:
            bright = (labels == names.index(glass)) & (rgb.min(axis=-1) > 200)
            glass_all += int(bright.sum())
            glass_in += int((bright & found).sum())
        images += 1
    tissue_classes = [k for k, n in enumerate(names) if n != glass]
    out = {
        "images": images,
        "mpp": mpp,
        "recall": {names[k]: round(float(inside[k] / total[k]), 4) for k in range(len(names)) if total[k]},
        "tissue_recall": round(float(inside[tissue_classes].sum() / max(total[tissue_classes].sum(), 1)), 4),
    }
    if glass is not None:
        out["glass_kept"] = round(glass_in / max(glass_all, 1), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sets", nargs="+", type=Path, help="data set folders (test/ with labels/ and classes.json)")
    ap.add_argument("--mpp", type=float, action="append", required=True, help="µm/px of each set, in order")
    ap.add_argument(
        "--glass-class",
        action="append",
        default=[],
        help="class that names the glass, per set ('-': none) or one for all",
    )
    ap.add_argument(
        "--range", type=int, nargs=2, metavar=("LO", "HI"), help="saturation range (0-255) instead of the product's"
    )
    ap.add_argument("--smoothing", type=float, help="Gaussian σ in mask px instead of the product's")
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    args = ap.parse_args()
    if len(args.mpp) not in (1, len(args.sets)):
        ap.error("give --mpp once, or once per set")
    mpps = args.mpp * len(args.sets) if len(args.mpp) == 1 else args.mpp
    glasses = args.glass_class or [None]
    if len(glasses) not in (1, len(args.sets)):
        ap.error("give --glass-class once, or once per set")
    glasses = glasses * len(args.sets) if len(glasses) == 1 else glasses
    glasses = [None if g in (None, "-") else g for g in glasses]
    if args.range:
        tissue.TISSUE_SATURATION_RANGE = tuple(args.range)
    if args.smoothing is not None:
        tissue.SATURATION_SMOOTHING = args.smoothing
    report = {
        "detector": {
            "saturation_range": list(tissue.TISSUE_SATURATION_RANGE),
            "smoothing": tissue.SATURATION_SMOOTHING,
        },
        "sets": {root.name: measure(root, mpp, g) for root, mpp, g in zip(args.sets, mpps, glasses)},
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
