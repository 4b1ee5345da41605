"""Do corrections in pdseg's review regions teach the model more than corrections in random regions? (gbm40)

A simulated pathologist: the ground truth of gbm40 (``NN.png`` + ``NN.geojson``, 512-px tiles at 0.5 µm/px)
stands in for what a pathologist would draw. Every round:

1. train a model on the labels gathered so far (pool tiles; a fixed, fully labelled validation tile);
2. score it on held-out test tiles (Nucleus Dice, with ``evaluate``);
3. the *review* arm predicts the pool with ``review`` on and "corrects" the K least certain regions not yet
   corrected (their ground truth, Nucleus and Background, becomes labels); the *random* arm corrects K
   regions of the same grid drawn at random. Other arms rank the regions by other scores (``--arms``): uncertainty
   away from predicted class edges (where annotators disagree anyway), entropy, the disagreement of a committee of
   heads trained with other seeds, or the predicted share of the class with the fewest labels so far.

``--diagnose`` records, per round, how wrong the current model is inside the regions an arm picks (error share,
errors away from true nucleus boundaries, true Nucleus share) beside its error share over the whole pool.
Every arm starts from the same K0 random regions for a seed. Prints JSON and, with ``--png``, draws the curve.
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

ARMS = {"review": "tab:orange", "review-diverse": "tab:red", "review-interior": "tab:green",
        "committee": "tab:purple", "entropy": "tab:olive", "balanced": "tab:brown", "rare": "tab:pink",
        "random": "tab:blue"}
DIVERSE = "review-diverse"
MAP_ARMS = ("review-interior", "committee", "entropy", "balanced")
"""Arms scored here from the pool's label and margin maps (``review`` and ``review-diverse`` use predict's own)."""
EDGE_PX = 3
"""review-interior: pixels within this many px (Chebyshev) of a predicted class edge do not count."""
MIN_INNER = 0.1
"""review-interior: a region with fewer pixels away from edges than this share is averaged as if it had this many
(its few interior pixels count for less)."""
COMMITTEE = 2
"""committee: heads trained beside the arm's model, same labels, other seeds (3 members in all)."""
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


def _write_labels(pool: Path, gbm40: Path, chosen: dict[str, list[tuple[int, int]]], cell_px: int,
                  tiles: list[str]) -> int:
    """The labels of the chosen regions; a pool tile without any loses a label file left from an earlier run."""
    for t in tiles:
        if t not in chosen:
            (pool / f"{t}.geojson").unlink(missing_ok=True)
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


def _pool_maps(model_dir: Path, pool_tiles: list[str], gbm40: Path) -> dict:
    """tile → (labels, margin): the model's predicted class and its margin (1 = certain) on every pool pixel."""
    from pdseg_qupath.core.slide import open_slide
    from pdseg_qupath.learn.inference import predict_image
    from pdseg_qupath.learn.modelio import load_model
    from pdseg_qupath.learn.options import PredictOptions
    from pdseg_qupath.learn.predictor import Predictor

    predictor = Predictor(load_model(model_dir), "cpu", batch_size=8)
    maps = {}
    for t in pool_tiles:
        strips = []
        with open_slide(gbm40 / f"{t}.png", fallback_mpp=0.5) as slide:
            predict_image(slide, predictor, options=PredictOptions(tissue_only=False), vectorize=False,
                          strip_sink=lambda region, strip, out=strips: out.append(strip))
        strips.sort(key=lambda st: st.y)
        maps[t] = (np.concatenate([st.labels for st in strips]), np.concatenate([st.margin for st in strips]))
    return maps


def _edges(labels: np.ndarray, r: int) -> np.ndarray:
    """Pixels with another class within r px (Chebyshev): the boundaries where annotators disagree anyway."""
    from scipy import ndimage

    size = 2 * r + 1
    return ndimage.maximum_filter(labels, size=size, mode="nearest") != ndimage.minimum_filter(
        labels, size=size, mode="nearest")


def _cell_means(values: np.ndarray, cell_px: int) -> np.ndarray:
    h, w = values.shape
    return values.reshape(h // cell_px, cell_px, w // cell_px, cell_px).mean(axis=(1, 3))


def _map_scores(arm: str, maps: dict, members: list[dict], minority: int, cell_px: int) -> dict:
    """(tile, x, y) → score of every pool region for the arms scored from the maps (higher = pick first)."""
    scores = {}
    for t, (labels, margin) in maps.items():
        u = 1.0 - margin.astype(np.float64)
        if arm == "review-interior":  # boundary-discounted: the mean over pixels away from predicted edges
            inner = ~_edges(labels, EDGE_PX)
            per_cell = _cell_means(u * inner, cell_px) / np.maximum(_cell_means(inner, cell_px), MIN_INNER)
            _put(scores, t, per_cell, cell_px)
            continue
        elif arm == "entropy":  # two classes: p = (1 + margin) / 2
            p = np.clip((1.0 + margin.astype(np.float64)) / 2, 1e-7, 1 - 1e-7)
            per_px = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
        elif arm == "committee":  # share of pixels where the members' classes are not unanimous
            per_px = np.zeros(labels.shape)
            for m in members:
                per_px = np.maximum(per_px, m[t][0] != labels)
        elif arm == "balanced":  # predicted share of the class with the fewest labels so far; ties by uncertainty
            per_px = (labels == minority) + 1e-3 * u
        else:
            raise ValueError(arm)
        _put(scores, t, _cell_means(per_px, cell_px), cell_px)
    return scores


def _put(scores: dict, tile: str, per_cell: np.ndarray, cell_px: int) -> None:
    for j, row in enumerate(per_cell):
        for i, v in enumerate(row):
            scores[(tile, i * cell_px, j * cell_px)] = float(v)


def _truth_mask(gbm40: Path, tile: str, nucleus: int, background: int) -> np.ndarray:
    import rasterio.features

    nuclei = _truth(gbm40, tile)
    if not nuclei:
        return np.full((512, 512), background, np.uint8)
    return rasterio.features.rasterize([(g, nucleus) for g in nuclei], out_shape=(512, 512), fill=background,
                                       dtype="uint8")


def _diagnose(picked: list, maps: dict, cell_px: int) -> dict:
    """How wrong the current model is inside the picked regions: its error share there, the share of errors more
    than EDGE_PX px from a true nucleus boundary ("learnable"), the true Nucleus share; and the pool's error share."""
    err = inner = nuc = n = 0.0
    for t, x, y in picked:
        sl = (slice(y, y + cell_px), slice(x, x + cell_px))
        wrong = maps[t][0][sl] != _TRUTH[t][sl]
        far = ~_edges(_TRUTH[t], EDGE_PX)[sl]
        err += wrong.sum()
        inner += (wrong & far).sum()
        nuc += (_TRUTH[t][sl] == _TRUTH["nucleus"]).sum()
        n += wrong.size
    pool = np.mean([np.mean(maps[t][0] != _TRUTH[t]) for t in maps])
    return {"picked_error": round(err / n, 4), "picked_error_far_from_edges": round(inner / n, 4),
            "picked_nucleus_share": round(nuc / n, 4), "pool_error": round(float(pool), 4)}


_TRUTH: dict = {}
"""tile → its true class index per pixel (the model's indices); "nucleus", "classes": the indices."""


def _load_truth(model: Path, args: argparse.Namespace) -> None:
    from pdseg_qupath.learn.modelio import load_model

    cmap = load_model(model).class_map
    nucleus, background = cmap.index("Nucleus"), cmap.index("Background")
    _TRUTH.update({t: _truth_mask(args.gbm40, t, nucleus, background) for t in args.pool})
    _TRUTH.update(nucleus=nucleus, classes=(nucleus, background))


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
        _write_labels(pool, args.gbm40, chosen, cell_px, args.pool)
        model = work / f"model-{rnd}"
        t0 = time.perf_counter()
        opts = TrainOptions(tiles_per_class=args.tiles_per_class, views=1, keep_features=False, head=args.head)
        if rnd == 0 and seed in _ROUND0:  # every arm starts from the same regions: train the first model once
            model, m = _ROUND0[seed]
        else:
            train(open_source(pool), model, backbone=args.backbone, mpp=0.5, image_mpp=0.5, epochs=args.epochs,
                  device="cpu", seed=seed, val_images=[f"{args.val}.png"], options=opts)
            m = evaluate(open_source(test), model, work / f"report-{rnd}", image_mpp=0.5, device="cpu",
                         overlays=False)
            if rnd == 0:
                _ROUND0[seed] = (model, m)
        if not _TRUTH:
            _load_truth(model, args)
        rows.append({"arm": arm, "seed": seed, "round": rnd, "regions": len(labelled),
                     "nucleus_dice": round(m["per_class"]["Nucleus"]["dice"], 4),
                     "macro_dice": round(m["macro_dice"], 4), "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
        if rnd == args.rounds:
            break
        free = [c for c in cells if c not in set(labelled)]
        maps = _pool_maps(model, args.pool, args.gbm40) if (arm in MAP_ARMS or args.diagnose) else None
        if arm in ("review", DIVERSE):
            scores = _review_scores(model, args.pool, args.gbm40, args.cell_um)
            picked = _pick(free, scores, args.k, labelled, "diverse" if arm == DIVERSE else "top", cell_px)
        elif arm in MAP_ARMS:
            members = []
            if arm == "committee":
                for j in range(1, COMMITTEE + 1):
                    member = work / f"model-{rnd}-member{j}"
                    train(open_source(pool), member, backbone=args.backbone, mpp=0.5, image_mpp=0.5,
                          epochs=args.epochs, device="cpu", seed=seed + 7919 * j, val_images=[f"{args.val}.png"],
                          options=opts)
                    members.append(_pool_maps(member, args.pool, args.gbm40))
            minority = _minority(labelled, cell_px)
            picked = _pick(free, _map_scores(arm, maps, members, minority, cell_px), args.k, labelled, "top",
                           cell_px)
        else:
            pick = rng.choice(len(free), size=args.k, replace=False)
            picked = [free[int(i)] for i in pick]
        if args.diagnose:
            rows[-1].update(_diagnose(picked, maps, cell_px))
            print(json.dumps(rows[-1]), flush=True)
        labelled += picked
    return rows


def _minority(labelled: list, cell_px: int) -> int:
    """The class index (Nucleus or Background) with the fewest labelled pixels in the regions so far."""
    counts = {v: 0 for v in _TRUTH["classes"]}
    for t, x, y in labelled:
        sub = _TRUTH[t][y:y + cell_px, x:x + cell_px]
        for v in counts:
            counts[v] += int((sub == v).sum())
    return min(counts, key=counts.get)


def plot(rows: list[dict], path: Path, metric: str = "nucleus_dice", label: str = "Nucleus Dice on held-out tiles",
         region: str = "64 × 64 px, 32 µm", title: str = "gbm40: corrections where pdseg is unsure vs. at random"
         ) -> None:
    """Left: mean ``metric`` per arm (dots: seeds). Right: each arm minus random on the same seed, mean ± SE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    gains = summarize(rows, metric)["minus_random_by_regions"]
    for arm, color in ARMS.items():
        sub = [r for r in rows if r["arm"] == arm]
        if not sub:
            continue
        xs = sorted({r["regions"] for r in sub})
        per = [[r[metric] for r in sub if r["regions"] == x] for x in xs]
        mean = [float(np.mean(p)) for p in per]
        ax.plot(xs, mean, "-o", color=color, label=f"{arm} regions (mean of {len(per[0])} seeds)")
        for x, p in zip(xs, per):
            ax.scatter([x] * len(p), p, color=color, s=8, alpha=0.5)
        if arm in gains:
            g = gains[arm]
            gx = sorted(g, key=int)
            bx.errorbar([int(x) for x in gx], [g[x]["mean"] for x in gx], yerr=[g[x]["se"] for x in gx], fmt="-o",
                        color=color, capsize=3, label=f"{arm} − random ({g[gx[-1]]['seeds']} seeds)")
    bx.axhline(0, color="tab:blue", lw=1)
    for a in (ax, bx):
        a.set_xlabel(f"corrected regions ({region})")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax.set_ylabel(label)
    bx.set_ylabel(f"gain in {label.split(' on ')[0]}, mean ± SE")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def summarize(rows: list[dict], metric: str = "nucleus_dice") -> dict:
    """Mean ``metric`` per arm and budget; per review arm, its gain over random per seed (paired: same seed, same
    start), with the mean, the standard error of the mean and how many seeds it was ahead in."""
    means: dict = {}
    for r in rows:
        means.setdefault(r["arm"], {}).setdefault(r["regions"], []).append(r[metric])
    dice = {(r["arm"], r["seed"], r["regions"]): r[metric] for r in rows}
    gains: dict = {}
    for (arm, seed, n), v in sorted(dice.items()):
        if arm != "random" and ("random", seed, n) in dice:
            gains.setdefault(arm, {}).setdefault(n, []).append(round(v - dice[("random", seed, n)], 4))

    def stats(g: list) -> dict:
        se = float(np.std(g, ddof=1) / np.sqrt(len(g))) if len(g) > 1 else float("nan")
        return {"per_seed": g, "mean": round(float(np.mean(g)), 4), "se": round(se, 4),
                "mean_over_se": round(float(np.mean(g)) / se, 2) if se > 0 else None,
                "seeds_ahead": sum(x > 0 for x in g), "seeds": len(g)}

    picked: dict = {}
    for r in rows:
        if "picked_error" in r:
            for key in (k for k in r if k.startswith(("picked_", "pool_"))):
                picked.setdefault(r["arm"], {}).setdefault(r["regions"], {}).setdefault(key, []).append(r[key])
    return {f"mean_{metric}_by_regions": {a: {n: round(float(np.mean(v)), 4) for n, v in sorted(by.items())}
                                             for a, by in means.items()},
            "minus_random_by_regions": {a: {n: stats(g) for n, g in by.items()} for a, by in gains.items()},
            "minus_random_mean_over_rounds": {a: stats(per_seed) for a, per_seed in _over_rounds(dice).items()},
            "picked_regions_mean_by_regions": {a: {n: {k: round(float(np.mean(v)), 4) for k, v in d.items()}
                                                   | {"seeds": len(d["picked_error"])}
                                                   for n, d in sorted(by.items())} for a, by in picked.items()}}


def _over_rounds(dice: dict) -> dict:
    """Per arm, per seed: its gain over random averaged over every round after the start (one number a seed, so
    the rounds' noise partly cancels); only seeds with every round of both arms."""
    out: dict = {}
    for arm, seed in sorted({(a, s) for a, s, _ in dice if a != "random"}):
        ns = sorted(n for a, s, n in dice if a == arm and s == seed)[1:]
        if ns and all(("random", seed, n) in dice for n in ns):
            out.setdefault(arm, []).append(round(float(np.mean([dice[(arm, seed, n)] - dice[("random", seed, n)]
                                                                 for n in ns])), 4))
    return out


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
    ap.add_argument("--head", default="context",
                    help="context (the product's default) or pixel (what docs/REVIEW.md's first runs used)")
    ap.add_argument("--arms", default="review,random",
                    help="arms to run (comma-separated): review (the K least certain regions, as predict --review "
                         "ranks them), review-diverse (the least certain not touching a corrected or picked one), "
                         "review-interior (mean 1 - margin over pixels more than EDGE_PX px from a predicted class "
                         "edge), entropy (mean entropy), committee (share of pixels where 3 heads trained with other "
                         "seeds disagree), balanced (most predicted pixels of the class with the fewest labels), "
                         "random")
    ap.add_argument("--diagnose", action="store_true",
                    help="record how wrong the current model is inside each round's picked regions")
    ap.add_argument("--no-memo", action="store_true", help="recompute the backbone's features every time")
    ap.add_argument("--tiles-per-class", type=int, default=12)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="add the rows of earlier runs' --json files (other seeds) to the summary and the curve")
    args = ap.parse_args()
    args.pool, args.test, args.arms = args.pool.split(","), args.test.split(","), args.arms.split(",")
    if not args.no_memo:
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
    rows = report(args, rows, t0)
    if args.png:
        plot(rows, args.png)


def report(args: argparse.Namespace, rows: list[dict], t0: float, metric: str = "nucleus_dice",
           extra: dict | None = None) -> list[dict]:
    """Add the rows of ``--merge`` files, print the summary as JSON and write it to ``--json``; returns all rows."""
    for earlier in args.merge:
        rows = rows + json.loads(earlier.read_text())["rows"]
    result = {"args": {k: ([str(x) for x in v] if k == "merge" else str(v) if isinstance(v, Path) else v)
                       for k, v in vars(args).items()}, **(extra or {}), "rows": rows, **summarize(rows, metric),
              "seconds": round(time.perf_counter() - t0)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    return rows


if __name__ == "__main__":
    main()
