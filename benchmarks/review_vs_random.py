"""Do corrections in pdseg's review regions teach the model more than corrections in random regions? (gbm40)

A simulated pathologist: the ground truth of gbm40 (``NN.png`` + ``NN.geojson``, 512-px tiles at 0.5 µm/px)
stands in for what a pathologist would draw. Every round:

1. train a model on the labels gathered so far (pool tiles; a fixed, fully labelled validation tile);
2. score it on held-out test tiles (Nucleus Dice, with ``evaluate``);
3. the *review* arm predicts the pool with ``review`` on and "corrects" the K least certain regions not yet
   corrected (their ground truth, Nucleus and Background, becomes labels); the *random* arm corrects K
   regions of the same grid drawn at random.

Both arms start from the same K0 random regions for a seed. Prints JSON and, with ``--png``, draws the curve.
The data set is research-only and never shipped; pass its folder on the command line.

    python benchmarks/review_vs_random.py /path/to/gbm40 --out /tmp/review --seeds 0 1 --png docs/img/review_vs_random.png
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import box, mapping, shape

ARMS = {"review": "tab:orange", "review-diverse": "tab:red", "random": "tab:blue"}
DIVERSE = "review-diverse"
CLASSES = {"Nucleus": [160, 90, 160], "Background": [200, 200, 200]}


def _truth(gbm40: Path, tile: str) -> list:
    fc = json.loads((gbm40 / f"{tile}.geojson").read_text())
    return [shape(f["geometry"]) for f in fc["features"] if f["properties"]["classification"]["name"] == "Nucleus"]


def _region_labels(nuclei: list, cell: shapely.Polygon) -> list[dict]:
    """The ground truth inside one region, as QuPath annotations: nuclei, and background around them."""
    inside = [g.intersection(cell) for g in nuclei if g.intersects(cell)]
    inside = [g for g in inside if g.area > 0.5]
    feats = [(g, "Nucleus") for g in inside]
    bg = cell.difference(shapely.union_all(inside)) if inside else cell
    if bg.area > 0.5:
        feats.append((bg, "Background"))
    return [{"type": "Feature", "geometry": mapping(g),
             "properties": {"objectType": "annotation", "classification": {"name": c, "color": CLASSES[c]}}}
            for g, c in feats]


def _write_labels(pool: Path, gbm40: Path, chosen: dict[str, list[tuple[int, int]]], cell_px: int) -> int:
    n = 0
    for tile, cells in chosen.items():
        nuclei = _truth(gbm40, tile)
        feats = [f for (x, y) in cells for f in _region_labels(nuclei, box(x, y, x + cell_px, y + cell_px))]
        (pool / f"{tile}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
        n += len(cells)
    return n


def _link(src: Path, dst: Path, tiles: list[str], geojson: bool) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for t in tiles:
        for ext in (".png", ".geojson") if geojson else (".png",):
            link = dst / f"{t}{ext}"
            if not link.exists():
                os.symlink((src / f"{t}{ext}").resolve(), link)
    return dst


def _memoize_features(max_bytes: float = 1.5e9) -> None:
    """Remember the backbone's features per (tile pixels, origins): every round re-reads the same pool, validation
    and test tiles, and the features depend on nothing else (fixed t, blocks, noise seed), so the numbers are
    exactly those without the memo, only faster."""
    import hashlib

    from pdseg_qupath.backbone.features import LDMFeatures

    memo: dict = {}
    size = [0]
    orig = LDMFeatures._chunk

    def chunk(self, x, org, cond):
        if cond is not None:
            return orig(self, x, org, cond)
        key = (hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest(), tuple(x.shape), org.cpu().numpy().tobytes(),
               self.backbone.config.name, self.seed, self.t, self.blocks, str(self.dtype))
        if key not in memo:
            y = orig(self, x, org, cond)
            if size[0] + y.numel() * y.element_size() > max_bytes:
                return y
            memo[key] = y
            size[0] += y.numel() * y.element_size()
        return memo[key].clone()

    LDMFeatures._chunk = chunk


def _pick(free: list, scores: dict, k: int, labelled: list, select: str, cell_px: int) -> list:
    """The k least certain free regions; ``diverse``: none touching (8-neighbourhood) a region already corrected
    or picked, so the k regions are k different places rather than one cluster (filled up in score order)."""
    order = sorted(free, key=lambda c: -scores.get(c, -1.0))
    if select == "top":
        return order[:k]

    def near(c: tuple) -> set:
        t, x, y = c
        return {(t, x + dx * cell_px, y + dy * cell_px) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}

    blocked = set().union(*(near(c) for c in labelled)) if labelled else set()
    taken: list = []
    for c in order:
        if len(taken) < k and c not in blocked:
            taken.append(c)
            blocked |= near(c)
    return taken + [c for c in order if c not in taken][: k - len(taken)]


def _review_scores(model_dir: Path, pool_tiles: list[str], gbm40: Path, cell_um: float) -> dict:
    """(tile, x, y) → mean uncertainty of every review region of the pool, from pdseg's own predict."""
    from pdseg_qupath.core.slide import open_slide
    from pdseg_qupath.learn.inference import predict_image
    from pdseg_qupath.learn.modelio import load_model
    from pdseg_qupath.learn.options import PredictOptions
    from pdseg_qupath.learn.predictor import Predictor
    from pdseg_qupath.learn.review import UNCERTAINTY

    predictor = Predictor(load_model(model_dir), "cpu", batch_size=8)
    scores = {}
    for t in pool_tiles:
        with open_slide(gbm40 / f"{t}.png", fallback_mpp=0.5) as slide:
            pred = predict_image(slide, predictor, options=PredictOptions(tissue_only=False, review=10**6,
                                                                          review_size_um=cell_um))
        for a in pred.review:
            if a.object_type == "annotation":
                x, y = a.geometry.bounds[:2]
                scores[(t, int(round(x)), int(round(y)))] = a.measurements[UNCERTAINTY]
    return scores


_ROUND0: dict = {}


def run_arm(arm: str, seed: int, args: argparse.Namespace, initial: list, cells: list) -> list[dict]:
    from pdseg_qupath.learn.options import TrainOptions
    from pdseg_qupath.sources.inputs import open_source
    from pdseg_qupath.tasks.evaluate import evaluate
    from pdseg_qupath.tasks.train import train

    work = args.out / f"{arm}-{seed}"
    pool = _link(args.gbm40, work / "pool", args.pool, geojson=False)
    _link(args.gbm40, pool, [args.val], geojson=True)
    test = _link(args.gbm40, args.out / "test", args.test, geojson=True)
    rng = np.random.default_rng(1000 + seed)
    labelled = list(initial)
    rows = []
    cell_px = int(round(args.cell_um / 0.5))
    for rnd in range(args.rounds + 1):
        chosen: dict[str, list[tuple[int, int]]] = {}
        for t, x, y in labelled:
            chosen.setdefault(t, []).append((x, y))
        _write_labels(pool, args.gbm40, chosen, cell_px)
        model = work / f"model-{rnd}"
        t0 = time.perf_counter()
        if rnd == 0 and seed in _ROUND0:  # every arm starts from the same regions: train the first model once
            model, m = _ROUND0[seed]
        else:
            opts = TrainOptions(tiles_per_class=args.tiles_per_class, views=1, keep_features=False, head=args.head)
            train(open_source(pool), model, backbone=args.backbone, mpp=0.5, image_mpp=0.5, epochs=args.epochs,
                  device="cpu", seed=seed, val_images=[f"{args.val}.png"], options=opts)
            m = evaluate(open_source(test), model, work / f"report-{rnd}", image_mpp=0.5, device="cpu",
                         overlays=False)
            if rnd == 0:
                _ROUND0[seed] = (model, m)
        rows.append({"arm": arm, "seed": seed, "round": rnd, "regions": len(labelled),
                     "nucleus_dice": round(m["per_class"]["Nucleus"]["dice"], 4),
                     "macro_dice": round(m["macro_dice"], 4), "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
        if rnd == args.rounds:
            break
        free = [c for c in cells if c not in set(labelled)]
        if arm.startswith("review"):
            scores = _review_scores(model, args.pool, args.gbm40, args.cell_um)
            labelled += _pick(free, scores, args.k, labelled, "diverse" if arm == DIVERSE else "top", cell_px)
        else:
            pick = rng.choice(len(free), size=args.k, replace=False)
            labelled += [free[int(i)] for i in pick]
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for arm, color in ARMS.items():
        sub = [r for r in rows if r["arm"] == arm]
        if not sub:
            continue
        xs = sorted({r["regions"] for r in sub})
        per = [[r["nucleus_dice"] for r in sub if r["regions"] == x] for x in xs]
        mean = [float(np.mean(p)) for p in per]
        ax.plot(xs, mean, "-o", color=color, label=f"{arm} regions (mean of {len(per[0])} seeds)")
        for x, p in zip(xs, per):
            ax.scatter([x] * len(p), p, color=color, s=8, alpha=0.5)
    ax.set_xlabel("corrected regions (64 × 64 px, 32 µm)")
    ax.set_ylabel("Nucleus Dice on held-out tiles")
    ax.set_title("gbm40: corrections where pdseg is unsure vs. at random", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def summarize(rows: list[dict]) -> dict:
    """Mean Nucleus Dice per arm and budget; per review arm, its gain over random per seed (paired: same seed, same
    start), with the mean, the standard error of the mean and how many seeds it was ahead in."""
    means: dict = {}
    for r in rows:
        means.setdefault(r["arm"], {}).setdefault(r["regions"], []).append(r["nucleus_dice"])
    dice = {(r["arm"], r["seed"], r["regions"]): r["nucleus_dice"] for r in rows}
    gains: dict = {}
    for (arm, seed, n), v in sorted(dice.items()):
        if arm != "random" and ("random", seed, n) in dice:
            gains.setdefault(arm, {}).setdefault(n, []).append(round(v - dice[("random", seed, n)], 4))

    def stats(g: list) -> dict:
        se = float(np.std(g, ddof=1) / np.sqrt(len(g))) if len(g) > 1 else float("nan")
        return {"per_seed": g, "mean": round(float(np.mean(g)), 4), "se": round(se, 4),
                "mean_over_se": round(float(np.mean(g)) / se, 2) if se > 0 else None,
                "seeds_ahead": sum(x > 0 for x in g), "seeds": len(g)}

    return {"mean_nucleus_dice_by_regions": {a: {n: round(float(np.mean(v)), 4) for n, v in sorted(by.items())}
                                             for a, by in means.items()},
            "minus_random_by_regions": {a: {n: stats(g) for n, g in by.items()} for a, by in gains.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gbm40", type=Path)
    ap.add_argument("--out", type=Path, default=Path("review-vs-random"))
    ap.add_argument("--backbone", default="small")
    ap.add_argument("--pool", default="01,02,03,04,05,06", help="pool tiles (comma-separated)")
    ap.add_argument("--val", default="11", help="the fully labelled validation tile")
    ap.add_argument("--test", default="31,32,33,34,35", help="held-out test tiles")
    ap.add_argument("--cell-um", type=float, default=32.0, help="side of a review region in µm")
    ap.add_argument("--k0", type=int, default=4, help="random regions labelled before the first round")
    ap.add_argument("--k", type=int, default=4, help="regions corrected per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--head", default="pixel", help="pixel (what docs/REVIEW.md used) or context")
    ap.add_argument("--arms", default="review,random",
                    help="arms to run (comma-separated): review (the K least certain regions), review-diverse (the "
                         "least certain not touching a corrected or picked one), random")
    ap.add_argument("--tiles-per-class", type=int, default=12)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="add the rows of earlier runs' --json files (other seeds) to the summary and the curve")
    args = ap.parse_args()
    args.pool, args.test, args.arms = args.pool.split(","), args.test.split(","), args.arms.split(",")
    _memoize_features()
    cell_px = int(round(args.cell_um / 0.5))
    cells = [(t, x, y) for t in args.pool for y in range(0, 512, cell_px) for x in range(0, 512, cell_px)]
    rows: list[dict] = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        initial = [cells[int(i)] for i in rng.choice(len(cells), size=args.k0, replace=False)]
        for arm in args.arms:
            rows += run_arm(arm, seed, args, initial, cells)
    for earlier in args.merge:
        rows += json.loads(earlier.read_text())["rows"]
    result = {"args": {k: ([str(x) for x in v] if k == "merge" else str(v) if isinstance(v, Path) else v)
                       for k, v in vars(args).items()}, "rows": rows, **summarize(rows),
              "seconds": round(time.perf_counter() - t0)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
