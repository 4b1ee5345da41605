"""Review vs. random at tissue level: whole glioblastoma sections, where most of a section is easy.

``benchmarks/review_vs_random.py`` asks on gbm40 tiles, all of them tissue, whether corrections in the regions
``predict --review`` ranks first teach the model more than corrections in random regions. This asks the same on
whole sections (the IvyGAP set made by ``benchmarks/prepare_ivygap_gbm.py``: 8 anatomic regions, large areas of
cellular tumour and necrosis, small ones of microvascular proliferation or pseudopalisading cells), in the loop a
pathologist runs:

1. annotate a few images sparsely: the set's 8 training images (every class in at least two);
2. train (the ``train`` defaults but a smaller tile budget) and score on held-out sections with ``evaluate``
   (macro Dice over the 8 classes);
3. predict new sections (the *pool*: P densely labelled test sections, unlabelled at the start) with ``--review``;
   both arms choose among the same candidates, the regions ``predict`` ranks (those with predicted tissue on a
   quarter of their area): *review* corrects the K least certain not yet corrected, *random* K of them at random.
   A correction is the region's true labels, every class in it;
4. retrain from scratch on everything gathered so far; repeat.

A third arm, ``rare`` (``--arms rare,random``), ranks the same regions by the review score with each pixel's
uncertainty weighted by the rarity of its predicted class (sqrt of the largest annotated class share over its own).

Seeds are paired: the arms of a seed share the first model. ``--diagnose`` adds, per round, the current model's
error share inside the picked regions and over the pool, and the picked regions' share of rare classes (under 5 %
of the test pixels). The data set is research-only and never shipped; pass its folder on the command line.

    python benchmarks/review_vs_random_tissue.py /path/to/ivygap-gbm --out /tmp/rt --seeds 0 1 --diagnose \\
        --json /tmp/rt.json --png docs/img/review_vs_random_tissue.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from review_vs_random import _memoize_features, _pick, plot, report

METRIC = "macro_dice"
RARE_SHARE = 0.05


def _names(data: Path) -> dict:
    return json.loads((data / "classes.json").read_text())


def _truth(data: Path, image: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(data / "test" / "labels" / f"{image}_labels.png"))


def _link(files: list[Path], dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        link = dst / f.name
        if not link.exists():
            os.symlink(f.resolve(), link)
    return dst


def _region_features(truth: np.ndarray, x: int, y: int, side: int, classes: list[dict]) -> list[dict]:
    """The true labels inside one region as QuPath annotations: one (multi)polygon per class present."""
    import rasterio.features
    from rasterio.transform import Affine
    from shapely.geometry import mapping, shape
    from shapely.ops import unary_union

    crop = truth[y:y + side, x:x + side]
    out = []
    for v in np.unique(crop):
        mask = crop == v
        polys = [shape(g) for g, _ in rasterio.features.shapes(mask.astype(np.uint8), mask=mask,
                                                              transform=Affine.translation(x, y))]
        geom = unary_union(polys)
        if geom.is_empty:
            continue
        c = classes[int(v)]
        out.append({"type": "Feature", "geometry": mapping(geom),
                    "properties": {"objectType": "annotation",
                                   "classification": {"name": c["name"], "color": c["color"]}}})
    return out


def _write_labels(pool: Path, data: Path, chosen: dict, side: int, classes: list[dict], images: list[str]) -> None:
    for image in images:
        cells = chosen.get(image, [])
        path = pool / f"{image}.geojson"
        if not cells:
            path.unlink(missing_ok=True)
            continue
        truth = _truth(data, image)
        feats = [f for (x, y) in cells for f in _region_features(truth, x, y, side, classes)]
        path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def _rarity_weights(model) -> np.ndarray:
    """Per class, sqrt(largest annotated share / the class's share): a rare class's uncertainty counts more."""
    shares = np.array(list(model.training["prior"]["annotated_share"].values()), np.float64)
    w = np.ones(len(shares))
    w[shares > 0] = np.sqrt(shares.max() / shares[shares > 0])
    return w


def _predict_pool(model: Path, data: Path, images: list[str], cell_um: float, image_mpp: float,
                  rarity: bool = False) -> dict:
    """image → (review scores {(x, y): score} in level-0 px, predicted labels at level-0 resolution).
    ``rarity``: the scores of ``predict --review`` with each pixel's uncertainty weighted by the rarity of its
    predicted class (:func:`_rarity_weights`)."""
    from pdseg_qupath.core.slide import open_slide
    from pdseg_qupath.learn.inference import predict_image
    from pdseg_qupath.learn.modelio import load_model
    from pdseg_qupath.learn.options import PredictOptions
    from pdseg_qupath.learn.predictor import Predictor
    from pdseg_qupath.learn.review import UNCERTAINTY, ReviewGrid

    predictor = Predictor(load_model(model), "cpu", batch_size=8)
    names = predictor.model.class_map.names
    out = {}
    for image in images:
        strips: list = []
        with open_slide(data / "test" / f"{image}.png", fallback_mpp=image_mpp) as slide:
            review = 0 if rarity else 10**6  # the rarity arm scores the strips itself, below
            pred = predict_image(slide, predictor, options=PredictOptions(review=review, review_size_um=cell_um),
                                 strip_sink=lambda region, strip, acc=strips: acc.append(strip))
            size = (slide.height, slide.width)
        if rarity:
            grid = ReviewGrid(pred.region, max(4, round(cell_um / predictor.model.io.mpp)),
                              _rarity_weights(predictor.model))
            for st in strips:
                grid.add(st)
            pred.review = grid.objects(10**6, predictor.model.model_id, size[::-1])
        scores = {}
        for a in pred.review:
            if a.object_type == "annotation":
                x, y = a.geometry.bounds[:2]
                scores[(round(x), round(y))] = a.measurements[UNCERTAINTY]
        strips.sort(key=lambda st: st.y)
        work = np.concatenate([st.labels for st in strips])
        d = size[0] / work.shape[0]
        rows = np.minimum((np.arange(size[0]) / d).astype(int), work.shape[0] - 1)
        cols = np.minimum((np.arange(size[1]) / d).astype(int), work.shape[1] - 1)
        out[image] = (scores, work[rows][:, cols], names)
    return out


def _diagnose(picked: list, pool: dict, truths: dict, side: int, classes: list[dict], rare: set) -> dict:
    """The model's error share in the picked regions and over the pool's tissue; the picked rare-class share."""
    index = {c["name"]: c["index"] for c in classes}
    err = n = rare_px = 0.0
    pool_err = pool_n = 0.0
    for image, (_, pred, names) in pool.items():
        lut = np.array([index[nm] for nm in names] + [255] * (256 - len(names)), dtype=np.int32)
        as_truth = lut[pred]
        ok = pred != 255
        pool_err += float(((as_truth != truths[image]) & ok).sum())
        pool_n += float(ok.sum())
        for t, x, y in picked:
            if t != image:
                continue
            sl = (slice(y, y + side), slice(x, x + side))
            tr, pr, v = truths[image][sl], as_truth[sl], ok[sl]
            err += float(((pr != tr) & v).sum())
            n += float(v.sum())
            rare_px += float(np.isin(tr, list(rare)).sum())
    total = sum(min(side, truths[t].shape[0] - y) * min(side, truths[t].shape[1] - x) for t, x, y in picked)
    return {"picked_error": round(err / max(n, 1), 4), "picked_rare_share": round(rare_px / max(total, 1), 4),
            "pool_error": round(pool_err / max(pool_n, 1), 4)}


_ROUND0: dict = {}


def run_arm(arm: str, seed: int, args: argparse.Namespace, classes: list[dict], truths: dict, rare: set) -> list[dict]:
    from pdseg_qupath.learn.options import TrainOptions
    from pdseg_qupath.sources.inputs import open_source
    from pdseg_qupath.tasks.evaluate import evaluate
    from pdseg_qupath.tasks.train import train

    data, work = args.data, args.out / f"{arm}-{seed}"
    start = sorted((data / "train").glob("*.png")) + sorted((data / "train").glob("*.geojson"))
    pool = _link(start + [data / "test" / f"{t}.png" for t in args.pool], work / "pool")
    test = _link([data / "test" / f"{t}{e}" for t in args.test for e in (".png", ".geojson")], args.out / "test")
    side = round(args.cell_um / args.image_mpp)
    rng = np.random.default_rng(1000 + seed)
    labelled: list = []
    rows = []
    for rnd in range(args.rounds + 1):
        chosen: dict = {}
        for t, x, y in labelled:
            chosen.setdefault(t, []).append((x, y))
        _write_labels(pool, data, chosen, side, classes, args.pool)
        model = work / f"model-{rnd}"
        t0 = time.perf_counter()
        if rnd == 0 and seed in _ROUND0:  # both arms start from the same model
            model, m = _ROUND0[seed]
        else:
            train(open_source(pool), model, backbone=args.backbone, mpp=args.mpp, image_mpp=args.image_mpp,
                  device="cpu", seed=seed, options=TrainOptions(tiles_per_class=args.tiles_per_class, views=1,
                                                                keep_features=False))
            m = evaluate(open_source(test), model, work / f"report-{rnd}", image_mpp=args.image_mpp, device="cpu",
                         overlays=False)
            if rnd == 0:
                _ROUND0[seed] = (model, m)
        rows.append({"arm": arm, "seed": seed, "round": rnd, "regions": len(labelled),
                     "macro_dice": round(m["macro_dice"], 4), "miou": round(m["miou"], 4),
                     "per_class_dice": {k: round(v["dice"], 4) for k, v in m["per_class"].items()},
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
        if rnd == args.rounds:
            break
        predicted = _predict_pool(model, data, args.pool, args.cell_um, args.image_mpp, rarity=arm == "rare")
        taken = set(labelled)
        scores = {(t, x, y): s for t, (sc, _, _) in predicted.items() for (x, y), s in sc.items()}
        free = [c for c in sorted(scores) if c not in taken]
        if arm in ("review", "rare"):
            picked = _pick(free, scores, args.k, labelled, "top", side)
        else:
            picked = [free[int(i)] for i in rng.choice(len(free), size=min(args.k, len(free)), replace=False)]
        if args.diagnose:
            rows[-1].update(_diagnose(picked, predicted, truths, side, classes, rare))
            print(json.dumps(rows[-1]), flush=True)
        labelled += picked
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="the IvyGAP folder made by prepare_ivygap_gbm.py")
    ap.add_argument("--out", type=Path, default=Path("review-vs-random-tissue"))
    ap.add_argument("--backbone", default="small")
    ap.add_argument("--image-mpp", type=float, default=4.0)
    ap.add_argument("--mpp", type=float, default=8.0, help="work resolution (accuracy.py's IvyGAP protocol)")
    ap.add_argument("--pool-size", type=int, default=6, help="test sections in the pool (half from each patient)")
    ap.add_argument("--cell-um", type=float, default=512.0, help="side of a review region in µm")
    ap.add_argument("--k", type=int, default=8, help="regions corrected per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--arms", default="review,random")
    ap.add_argument("--tiles-per-class", type=int, default=12)
    ap.add_argument("--test-every", type=int, default=2,
                    help="score every n-th held-out section (1: all; the same sections for every arm and seed)")
    ap.add_argument("--diagnose", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--merge", type=Path, nargs="*", default=[], help="add the rows of earlier runs' --json files")
    args = ap.parse_args()
    meta = _names(args.data)
    classes = meta["classes"]
    by_patient: dict = {}
    for t in meta["test"]:
        by_patient.setdefault(t.split("-")[0], []).append(t)
    rng = np.random.default_rng(0)  # one pool for every seed, so every seed is scored on the same sections
    args.pool = sorted(t for ts in by_patient.values()
                       for t in rng.choice(ts, size=args.pool_size // len(by_patient), replace=False).tolist())
    args.test = [t for t in meta["test"] if t not in args.pool][::args.test_every]
    args.arms = args.arms.split(",")
    truths = {t: _truth(args.data, t) for t in args.pool}
    counts = np.bincount(np.concatenate([_truth(args.data, t).ravel() for t in args.test]), minlength=len(classes))
    rare = {i for i, c in enumerate(counts[:len(classes)]) if c / counts.sum() < RARE_SHARE}
    _memoize_features()
    rows: list[dict] = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        for arm in args.arms:
            rows += run_arm(arm, seed, args, classes, truths, rare)
    rows = report(args, rows, t0, METRIC, {"rare_classes": sorted(classes[i]["name"] for i in rare)})
    if args.png:
        plot(rows, args.png, METRIC, "macro Dice on held-out sections",
             f"{args.cell_um:g} µm squares", "IvyGAP sections: corrections where pdseg is unsure vs. at random")


if __name__ == "__main__":
    main()
