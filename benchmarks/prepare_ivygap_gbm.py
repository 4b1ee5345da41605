"""Prepare the IvyGAP glioblastoma tissue set (8 anatomic classes) from the public GBM_WSSM repository.

Not a test and not part of the package: it writes a benchmark data set OUTSIDE the repository, laid out
like ``shared/data/ebhi-seg`` (images with sidecar QuPath GeoJSON; sparse training annotations, dense test
annotations with their label maps):

    DEST/train/<name>.png + <name>.geojson        8 images, sparse: each class's area shrunk by --erode px,
                                                   parts under --min-area px dropped (borders unlabelled)
    DEST/test/<name>.png + <name>.geojson         40 images, dense: every pixel's class, vectorized exactly
    DEST/test/labels/<name>_labels.png            the label map (class index, no ignore value)
    DEST/classes.json, DEST/README.md             classes in label order; source, licence, citation

Source: github.com/amin20/GBM_WSSM (MIT licence), folders ``GBM_Test_Images`` (48 RGB images, 1024×1024,
whole IvyGAP H&E sections resized by the authors) and ``GBM_Test_Ground_Truth`` (the same 48 as colour
masks, ``Codes/Mask_Labels.txt``). The authors' training images are on OneDrive only, so the 48 published
test images are split here: 8 for training, chosen so that every class is annotated in at least two of
them, and the other 40 for testing. Both parts come from the same patients (W3, W30): the set measures
tissue-level segmentation from few labels, not cross-patient transfer.

    git clone https://github.com/amin20/GBM_WSSM   # or any checkout of it
    python benchmarks/prepare_ivygap_gbm.py GBM_WSSM /work/data/ivygap-gbm

Annotations are read back with the product's GeoJSON reader as a check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# Codes/Mask_Labels.txt of GBM_WSSM: RGB of each region in the masks, with QuPath-style class names.
CLASSES = (
    ("Background", (255, 255, 255), "Background_BC (white)"),
    ("Leading edge", (33, 143, 166), "Leading_Edge_LE"),
    ("Infiltrating tumor", (210, 5, 208), "Infiltrating_Tumor_IT"),
    ("Cellular tumor", (5, 208, 4), "Cellular_Tumor_CT"),
    ("Perinecrotic zone", (37, 209, 247), "Perinecrotic_Zone_CTpnz"),
    ("Pseudopalisading cells", (6, 208, 170), "Pseudopalisading_Cells_Around_Necrosis_CTpan"),
    ("Microvascular proliferation", (255, 102, 0), "Microvascular_Proliferation_CTmvp"),
    ("Necrosis", (5, 5, 5), "Necrosis_CTne"),
)
#: Display colours in QuPath (the masks' own colours; black and white swapped for visibility).
COLORS = {"Background": (230, 230, 230), "Necrosis": (60, 60, 60)}
MPP_ESTIMATE = 4.0
N_TRAIN = 8


def decode(mask_rgb: np.ndarray, path: Path) -> np.ndarray:
    """Colour mask → class indices; any colour not in the table is an error (the masks are exact)."""
    lab = np.full(mask_rgb.shape[:2], 255, np.uint8)
    for k, (_, rgb, _) in enumerate(CLASSES):
        lab[np.all(mask_rgb == np.array(rgb, np.uint8), axis=-1)] = k
    if (lab == 255).any():
        bad = np.unique(mask_rgb[lab == 255].reshape(-1, 3), axis=0)[:5].tolist()
        sys.exit(f"{path}: colours not in Mask_Labels.txt: {bad}")
    return lab


def choose_train(labels: dict[str, np.ndarray], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` images, greedily covering every class at least twice (fewest-covered class first), ties at random."""
    names = sorted(labels)
    present = {nm: {int(k) for k in np.unique(labels[nm]) if k < len(CLASSES)} for nm in names}
    chosen: list[str] = []
    cover = np.zeros(len(CLASSES), int)
    while len(chosen) < n:
        best, best_gain = None, -1.0
        for nm in rng.permutation(names):
            if nm in chosen:
                continue
            gain = sum(1.0 / (1 + cover[k]) for k in present[nm])
            if gain > best_gain:
                best, best_gain = str(nm), gain
        chosen.append(best)
        for k in present[best]:
            cover[k] += 1
    return sorted(chosen)


def sparse(lab: np.ndarray, erode: int, min_area: int) -> np.ndarray:
    """Each class's area shrunk by ``erode`` px (borders left unlabelled), parts < ``min_area`` px dropped."""
    from scipy import ndimage

    out = np.full_like(lab, 255)
    disk = np.hypot(*np.mgrid[-erode:erode + 1, -erode:erode + 1]) <= erode
    for k in np.unique(lab):
        m = ndimage.binary_erosion(lab == k, structure=disk, border_value=1)
        comp, n = ndimage.label(m)
        if n:
            sizes = np.bincount(comp.ravel())
            keep = np.flatnonzero(sizes >= min_area)
            keep = keep[keep > 0]
            out[np.isin(comp, keep)] = k
    return out


def write_annotations(lab: np.ndarray, path: Path) -> None:
    """The label map as QuPath GeoJSON (one classified annotation per class), through the product's writers."""
    from pdseg_qupath.core.annotations import Annotation, ClassInfo, ClassMap
    from pdseg_qupath.core.grid import Window
    from pdseg_qupath.core.raster import vectorize
    from pdseg_qupath.sources.qupath.geojson import write_geojson

    cmap = ClassMap(tuple(ClassInfo(n, COLORS.get(n, rgb)) for n, rgb, _ in CLASSES))
    geoms = vectorize(lab, cmap, Window(0, 0, lab.shape[1], lab.shape[0]))
    anns = [Annotation(g, name, tuple(COLORS.get(name, rgb))) for name, rgb, _ in CLASSES
            if (g := geoms.get(name)) is not None]
    write_geojson(path, anns)


def check(lab: np.ndarray, path: Path) -> float:
    """Agreement of the written GeoJSON, re-read and rasterized by the product, with the label map."""
    from pdseg_qupath.core.annotations import ClassInfo, ClassMap
    from pdseg_qupath.core.grid import Window
    from pdseg_qupath.core.raster import AnnotationIndex
    from pdseg_qupath.sources.qupath.geojson import read_geojson

    cmap = ClassMap(tuple(ClassInfo(n, rgb) for n, rgb, _ in CLASSES))
    anns, _ = read_geojson(path)
    r = AnnotationIndex(anns, cmap).rasterize(Window(0, 0, lab.shape[1], lab.shape[0]))
    return float((r == lab).mean())


README = """# IvyGAP glioblastoma tissue set (8 anatomic classes), prepared for pdseg benchmarks

Made by `benchmarks/prepare_ivygap_gbm.py` of pdseg-qupath from the public GitHub repository
[amin20/GBM_WSSM](https://github.com/amin20/GBM_WSSM) (commit {commit}), folders `GBM_Test_Images` and
`GBM_Test_Ground_Truth`: 48 H&E images of whole glioblastoma sections from the Ivy Glioblastoma Atlas
Project (IvyGAP), resized by the authors to 1024×1024 px, each with a dense colour mask of 8 regions.

- `train/`: {n_train} images with **sparse** QuPath GeoJSON sidecars: each class's area shrunk by {erode} px
  (borders between regions left unannotated), parts smaller than {min_area} px dropped. Chosen so that every
  class is annotated in at least two training images.
- `test/`: {n_test} images with **dense** GeoJSON sidecars (an exact pixel-edge vectorization of the mask)
  and the label maps in `test/labels/<image>_labels.png` (class index; no ignore value).
- `classes.json`: the classes in label order, with the mask colours of `Codes/Mask_Labels.txt`.
- Pixel size: not published; about **{mpp} µm/px**, estimated from nucleus size (pass `--image-mpp {mpp}`).
  The authors resized sections to a square, so the aspect ratio may be slightly distorted.
- Training and test images come from the same two patients (W3, W30): this measures tissue-level
  segmentation from a few sparsely annotated images, not transfer to new patients.

Class pixel shares (test, dense): {shares}

**Licence:** the repository is under the MIT licence (Copyright (c) 2020 amin20). The images originate
from the Ivy Glioblastoma Atlas Project (Allen Institute, glioblastoma.alleninstitute.org); its terms of
use apply to them. Research and benchmarking only; not shipped with pdseg-qupath, kept outside the repository.

**Cite:** GBM_WSSM: Zadeh Shirazi A, McDonnell MD, Fornaciari E, et al. "A deep convolutional neural network for segmentation of whole-slide pathology images identifies
novel tumour cell-perivascular niche interactions that are associated with poor survival in glioblastoma",
British Journal of Cancer 125, 337–350 (2021). IvyGAP: Puchalski RB, et al. "An anatomic transcriptional
atlas of human glioblastoma", Science 360, 660–663 (2018).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo", type=Path, help="a checkout (or export) of github.com/amin20/GBM_WSSM")
    ap.add_argument("dest", type=Path, help="output folder, outside the pdseg repository (e.g. /work/data/ivygap-gbm)")
    ap.add_argument("--erode", type=int, default=4, help="px removed along every region border in training")
    ap.add_argument("--min-area", type=int, default=64, help="smallest kept training part, px")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--commit", default="fed6f11", help="recorded in the README")
    args = ap.parse_args()
    img_dir, gt_dir = args.repo / "GBM_Test_Images", args.repo / "GBM_Test_Ground_Truth"
    if not img_dir.is_dir() or not gt_dir.is_dir():
        sys.exit(f"{args.repo}: expected GBM_Test_Images/ and GBM_Test_Ground_Truth/ (a GBM_WSSM checkout)")
    labels = {}
    for gt in sorted(gt_dir.glob("*_L.png")):
        name = gt.name[: -len("_L.png")]
        if (img_dir / f"{name}.png").is_file():
            labels[name] = decode(np.asarray(Image.open(gt).convert("RGB")), gt)
    sparse_labels = {n: sparse(lab, args.erode, args.min_area) for n, lab in labels.items()}
    train = choose_train(sparse_labels, N_TRAIN, np.random.default_rng(args.seed))
    test = [n for n in sorted(labels) if n not in train]
    counts = np.zeros(len(CLASSES), np.int64)
    for part, names in (("train", train), ("test", test)):
        (args.dest / part / "labels").mkdir(parents=True, exist_ok=True)
        for name in names:
            lab = labels[name] if part == "test" else sparse_labels[name]
            Image.open(img_dir / f"{name}.png").convert("RGB").save(args.dest / part / f"{name}.png")
            Image.fromarray(lab).save(args.dest / part / "labels" / f"{name}_labels.png")
            write_annotations(lab, args.dest / part / f"{name}.geojson")
            agree = check(lab, args.dest / part / f"{name}.geojson")
            if agree < 0.999:
                sys.exit(f"{name}: GeoJSON re-read agrees with the mask on only {agree:.4f} of pixels")
            if part == "test":
                counts += np.bincount(lab.ravel(), minlength=len(CLASSES))[: len(CLASSES)]
            print(part, name, "classes", sorted(int(k) for k in np.unique(lab) if k != 255), flush=True)
    shares = ", ".join(f"{n} {c / counts.sum():.1%}" for (n, _, _), c in zip(CLASSES, counts))
    classes = {"classes": [{"index": k, "name": n, "color": list(COLORS.get(n, rgb)), "mask_rgb": list(rgb),
                            "source_name": src} for k, (n, rgb, src) in enumerate(CLASSES)],
               "ignore": 255, "source": f"github:amin20/GBM_WSSM@{args.commit} GBM_Test_Images + GBM_Test_Ground_Truth",
               "licence": "MIT (repository); IvyGAP images", "mpp_estimate": MPP_ESTIMATE,
               "train": train, "test": test, "train_erode_px": args.erode, "train_min_area_px": args.min_area}
    (args.dest / "classes.json").write_text(json.dumps(classes, indent=1))
    (args.dest / "README.md").write_text(README.format(
        commit=args.commit, n_train=len(train), n_test=len(test), erode=args.erode, min_area=args.min_area,
        mpp=MPP_ESTIMATE, shares=shares))
    print(f"wrote {args.dest}: {len(train)} train, {len(test)} test")


if __name__ == "__main__":
    main()
