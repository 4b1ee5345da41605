"""The colour-texture baseline: a QuPath-style pixel classifier, run on pdseg's own data path.

Not part of the package. What a pathologist gets from QuPath's built-in pixel classifier, measured
through the SAME images, sparse labels and scores as the LDM head, so that the two can be compared:

- **Images and labels**: the source is opened with the product's ``open_source``, annotations are read
  and rasterized by the product (``learn.data``, ``core.raster``); training tiles are the product's own
  (``tasks.train.plan_tiles`` with the default ``TrainOptions`` and the same seed, so the same tiles that
  ``train`` would draw), and the labelled pixels of each tile are drawn with the product's
  ``stratified_pixels`` (``pixels_per_tile``, 512 by default). Validation tiles are used for training
  too: a tree ensemble needs no early stopping.
- **Features** (per pixel, at the work resolution ``--mpp``): RGB and HED (the product's
  ``core.stain.rgb_to_hed``), each channel as is and, at σ = 1, 2, 4, 8, 16 px, Gaussian smoothing,
  difference of Gaussians (G(σ) − G(2σ)) and gradient magnitude of G(σ): 6 + 6 × 3 × 5 = 96 features,
  computed on the whole image (reflected at its borders).
- **Classifier**: scikit-learn's ``HistGradientBoostingClassifier`` (100 iterations, depth-limited by
  31 leaves, learning rate 0.1), then the product's class-prior correction (``learn.fit.logit_adjustment``
  with ``learn.sampling.annotated_prior``) at the options' strength (``train``'s default unless given).
- **Scores**: ``core.metrics`` on annotated pixels only, over the annotated region of each test image
  on the work grid, inside the tissue ``predict`` detects (as ``evaluate`` does; pixels annotated on glass
  are scored separately, ``all_annotated``): per-class Dice/IoU, macro Dice, mIoU, accuracy.

Benchmark-only dependencies (not package dependencies): ``pip install scikit-learn scipy``.

    python benchmarks/baseline_pixel_classifier.py TRAIN_DIR TEST_DIR --image-mpp 1.2 --mpp 1.2
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)


def pixel_features(rgb: np.ndarray, sigmas: Sequence[float] = SIGMAS) -> np.ndarray:
    """(H, W, 6 + 18 × len(sigmas)) float32 colour-texture features of a uint8 RGB image."""
    from scipy import ndimage

    from pdseg_qupath.core.stain import rgb_to_hed

    chans = np.concatenate([rgb.astype(np.float32) / 255.0, rgb_to_hed(rgb)], axis=-1)
    out = [chans]
    for s in sigmas:
        g = np.stack([ndimage.gaussian_filter(chans[..., c], s, mode="reflect") for c in range(6)], -1)
        g2 = np.stack([ndimage.gaussian_filter(chans[..., c], 2 * s, mode="reflect") for c in range(6)], -1)
        gy, gx = np.gradient(g, axis=(0, 1))
        out += [g, g - g2, np.hypot(gx, gy)]
    return np.concatenate(out, axis=-1).astype(np.float32)


def _work_image(slide, d: float):
    """The whole image on the work grid (downsample ``d``) and its window."""
    from pdseg_qupath.core.grid import Window, grid_size

    gw, gh = grid_size(slide.width, slide.height, d)
    win = Window(0, 0, gw, gh, d)
    return slide.read(win), win


def _training_pixels(imgs, cmap, io, opts, seed: int):
    """Features and labels of the labelled pixels ``train`` would sample, plus the sampled class counts."""
    from pdseg_qupath.core.grid import Window
    from pdseg_qupath.learn.sampling import stratified_pixels
    from pdseg_qupath.tasks.train import plan_tiles

    rng = np.random.default_rng(seed)
    plan = plan_tiles(imgs, cmap, io, opts, None, rng, [])
    tiles = list(plan.tiles) + list(plan.val_tiles)
    pix_rng = np.random.default_rng([seed, 1])
    xs, ys = [], []
    for i in sorted({t.image for t in tiles}):
        im = imgs[i]
        d = io.downsample(im.slide.mpp)
        rgb, _win = _work_image(im.slide, d)
        feats = pixel_features(rgb)
        h, w = rgb.shape[:2]
        for t in (t for t in tiles if t.image == i):
            x0, y0 = max(0, t.x), max(0, t.y)
            x1, y1 = min(w, t.x + io.tile), min(h, t.y + io.tile)
            if x1 <= x0 or y1 <= y0:
                continue
            lab = im.index.rasterize(Window(x0, y0, x1 - x0, y1 - y0, d))
            pick = stratified_pixels(lab, opts.pixels_per_tile, len(cmap), pix_rng)
            if len(pick):
                xs.append(feats[y0:y1, x0:x1].reshape(-1, feats.shape[-1])[pick])
                ys.append(lab.reshape(-1)[pick])
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64), plan


def fit_baseline(train_dir: Path, *, image_mpp: float | None, mpp: float, seed: int = 0,
                 images: Sequence[str] | None = None, classes: Sequence[str] | None = None,
                 options=None, max_iter: int = 100):
    """Train the classifier on a folder/project's annotations; returns (model, class map, io, info).

    ``options``: the ``TrainOptions`` whose tile plan is used (default: ``train``'s defaults)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from pdseg_qupath.learn.data import close_images, load_training_images
    from pdseg_qupath.learn.fit import logit_adjustment
    from pdseg_qupath.learn.options import TrainOptions
    from pdseg_qupath.learn.sampling import annotated_prior
    from pdseg_qupath.sources.inputs import open_source

    t0 = time.perf_counter()
    opts = options or TrainOptions()
    io = opts.io(mpp, 256, 4)
    src = open_source(train_dir)
    imgs, cmap = load_training_images(src, image_mpp=image_mpp, classes=classes, messages=[], names=images)
    try:
        x, y, plan = _training_pixels(imgs, cmap, io, opts, seed)
        prior = annotated_prior(imgs, list(range(len(imgs))), len(cmap), mpp)
    finally:
        close_images(imgs)
    clf = HistGradientBoostingClassifier(max_iter=max_iter, learning_rate=0.1, max_leaf_nodes=31,
                                         early_stopping=False, random_state=seed)
    clf.fit(x, y)
    counts = np.bincount(y, minlength=len(cmap)).astype(np.float64)
    adjust = logit_adjustment(prior, counts, opts.prior_correction)
    adjust = adjust.numpy() if adjust is not None else np.zeros(len(cmap))
    info = {"train_pixels": len(y), "features": int(x.shape[1]), "tiles": len(plan.tiles) + len(plan.val_tiles),
            "images": [im.record.name for im in imgs], "fit_s": round(time.perf_counter() - t0, 1)}
    return (clf, adjust), cmap, io, info


def predict_labels(model, rgb: np.ndarray, n_classes: int, chunk: int = 200_000) -> np.ndarray:
    """Class index per pixel of a work-resolution RGB image."""
    clf, adjust = model
    f = pixel_features(rgb).reshape(-1, 6 + 18 * len(SIGMAS))
    out = np.empty(len(f), np.uint8)
    for i in range(0, len(f), chunk):
        p = np.full((min(chunk, len(f) - i), n_classes), -np.inf)  # classes absent from training: never
        p[:, clf.classes_] = np.log(np.clip(clf.predict_proba(f[i:i + chunk]), 1e-12, None))
        out[i:i + chunk] = np.argmax(p + adjust, axis=1)
    return out.reshape(rgb.shape[:2])


def evaluate_baseline(model, cmap, io, test_dir: Path, *, image_mpp: float | None,
                      images: Sequence[str] | None = None) -> dict:
    """Score on the annotated pixels of each test image as ``evaluate`` does (one pooled confusion matrix): the
    main scores inside the tissue ``predict`` detects, ``all_annotated`` on every annotated pixel."""
    import shapely

    from pdseg_qupath.core.grid import Window
    from pdseg_qupath.core.metrics import Confusion, scores
    from pdseg_qupath.core.raster import AnnotationIndex
    from pdseg_qupath.core.slide import open_slide
    from pdseg_qupath.core.tissue import TissueMap
    from pdseg_qupath.learn.options import PredictOptions
    from pdseg_qupath.sources.base import select_images
    from pdseg_qupath.sources.inputs import open_source

    t0 = time.perf_counter()
    src = open_source(test_dir)
    total, everywhere = Confusion(len(cmap)), Confusion(len(cmap))
    per_image = {}
    for rec in select_images(src.images(), images):
        anns, _ = src.read_annotations(rec)
        index = AnnotationIndex([a for a in anns if a.object_type == "annotation" and a.classification], cmap)
        if not len(index):
            continue
        with open_slide(rec.path, mpp=rec.mpp, fallback_mpp=image_mpp) as slide:
            d = io.downsample(slide.mpp)
            rgb, win = _work_image(slide, d)
            tissue = TissueMap.detect(slide, d, PredictOptions().tissue_mpp, dilate=1)  # evaluate's own mask
        pred = predict_labels(model, rgb, len(cmap))
        minx, miny, maxx, maxy = shapely.total_bounds(index.geometries)
        x0, y0 = max(0, int(np.floor(minx / d))), max(0, int(np.floor(miny / d)))
        x1, y1 = min(win.width, int(np.ceil(maxx / d))), min(win.height, int(np.ceil(maxy / d)))
        truth = index.rasterize(Window(x0, y0, x1 - x0, y1 - y0, d))
        everywhere.update(truth, pred[y0:y1, x0:x1])
        truth = np.where(tissue.pixels(y0, y1 - y0, x0, x1 - x0), truth, 255)
        conf = Confusion(len(cmap))
        conf.update(truth, pred[y0:y1, x0:x1])
        total.merge(conf)
        per_image[rec.name] = scores(conf, cmap.names)["macro_dice"]
    m = scores(total, cmap.names)
    m["scored_within"] = "detected tissue, as predict"
    m["all_annotated"] = {k: v for k, v in scores(everywhere, cmap.names).items() if k != "confusion"}
    m["per_image_macro_dice"] = per_image
    m["seconds"] = round(time.perf_counter() - t0, 1)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train", type=Path, help="folder of images + QuPath GeoJSON (or a .qpproj) to train on")
    ap.add_argument("test", type=Path, help="folder (or project) with annotations to score on")
    ap.add_argument("--image-mpp", type=float, default=None, help="µm/px of images that record none")
    ap.add_argument("--mpp", type=float, default=0.5, help="work resolution, µm/px (as train --mpp)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", nargs="*", default=None, help="train on these images only")
    ap.add_argument("--out", type=Path, default=None, help="write metrics.json here")
    args = ap.parse_args()
    model, cmap, io, info = fit_baseline(args.train, image_mpp=args.image_mpp, mpp=args.mpp, seed=args.seed,
                                         images=args.images)
    m = evaluate_baseline(model, cmap, io, args.test, image_mpp=args.image_mpp)
    m["train"] = info
    print(json.dumps({k: m[k] for k in ("macro_dice", "miou", "accuracy")} | {
        "per_class_dice": {k: v["dice"] for k, v in m["per_class"].items()}, "train": info}, indent=1))
    if args.out:
        from pdseg_qupath.core.fileio import write_json

        write_json(args.out, m)


if __name__ == "__main__":
    main()
