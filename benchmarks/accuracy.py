"""The accuracy table, in one command: pdseg's heads against a colour-texture pixel classifier.

Writes ``docs/ACCURACY.md`` and ``docs/accuracy.json`` (not a test). Rows:

- ``baseline``: the colour-texture classifier (``benchmarks/baseline_pixel_classifier.py``);
- ``small``: ``train --backbone small --head pixel`` (the 1×1 head, the default until it switched);
- ``small-context``: ``train --head context`` (the default now);
- ``small-auto``: ``train --head context --t auto --blocks auto`` (t and blocks chosen by image-wise
  cross-validation on the training images, ``pdseg_qupath/learn/autotune.py``);
- ``small-rgb``: ``train --head pixel --rgb-skip``;
- ``raw``: raw pixels. The CLI has no RGB-only head, so this is ``--backbone random:small --rgb-skip``:
  the pixel head gets the RGB tile beside features of the untrained backbone;
- ``random``: ``--backbone random:small --head pixel`` (the same architecture, random weights);
- ``--backbone-row NAME=DIR`` adds a row ``NAME``: ``train --backbone DIR`` with the default (context) head, e.g.
  a backbone fine-tuned by ``pdseg-qupath pretrain --from small`` (compare it with ``small-context``).

Columns (each a train → test protocol, scored by ``evaluate`` on annotated pixels only):

- ``gbm40``: nuclei, tiles 01–30 → 31–40 at 0.5 µm/px, Nucleus Dice;
- ``ebhi``: EBHI-Seg colon biopsies, Gland vs Other, 8 → 120 at 1.2 µm/px, macro Dice;
- ``ivygap``: IvyGAP glioblastoma, 8 anatomic regions (``benchmarks/prepare_ivygap_gbm.py``), 8 sparse →
  40 dense images at about 4 µm/px, worked at 8 µm/px, macro Dice and mIoU;
- label efficiency on EBHI-Seg: 1 and 3 of the 8 training images (several different random subsets; `--subsets 8` at 1 image is every image once) and all 8.

pdseg rows go through the product's Python API (``train`` then ``evaluate``, as the CLI runs them). Only
the backbone pass is shared between runs (``benchmarks/heads.py``'s on-disk feature cache, keyed by
tile pixels, origin, backbone, t and seed; kept in fp16), so a test set is encoded once per backbone and
the training tiles of a seed once for every head. Each finished run is kept as JSON under ``--work``: a
rerun (or a run after an interruption) only computes what is missing, and the table is rewritten after
every run.

Hand-written sections of ``docs/ACCURACY.md`` from the line ``KEEP_MARKER`` on are kept when it is rewritten.

``--quick`` uses 2 seeds, 2 subsets, fewer test images and fewer training tiles (8 per class, 1 view,
≤ 8 validation tiles, one head instead of the default ensemble of 3), and says so in the output; the full run uses the product's defaults.
Benchmark-only dependencies: ``pip install scikit-learn scipy``.

    nice -n 10 python benchmarks/accuracy.py --quick      # data in the default places, see --help
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    image_mpp: float
    mpp: float
    score_class: str | None  # None: macro Dice
    baseline_mpp: float | None = None  # the colour-texture classifier's work resolution (None: ``mpp``)

    def work_mpp(self, row: Row) -> float:
        return self.baseline_mpp if row.backbone is None and self.baseline_mpp else self.mpp


CASES = {
    # pdseg rows at the product's default work resolution (0.5 µm/px, the backbone's own: the 224-px crops are
    # upsampled); the colour-texture classifier at the crops' own 1.2 µm/px, where it scores best (0.774 there,
    # 0.758 at 0.6 µm/px; docs/ACCURACY.md "Work resolution")
    "ebhi": Case("ebhi", "EBHI-Seg glands, 8 → 120 (macro Dice)", 1.2, 0.5, None, baseline_mpp=1.2),
    "ivygap": Case("ivygap", "IvyGAP GBM, 8 classes, 8 → 40 (macro Dice / mIoU)", 4.0, 8.0, None),
    "gbm40": Case("gbm40", "gbm40 nuclei, 01–30 → 31–40 (Nucleus Dice)", 0.5, 0.5, "Nucleus"),
}
#: --quick works the IvyGAP sections at 16 µm/px (one 256-px tile per image) instead of 8, and EBHI-Seg at the
#: crops' own 1.2 µm/px (one tile per crop instead of four) for every row.
QUICK_MPP = {"ivygap": 16.0, "ebhi": 1.2}
QUICK_BUDGET = {"tiles_per_class": 8, "views": 1, "max_val_tiles": 8, "ensemble": 1}
"""Quick mode's training options (a row's own options win)."""


@dataclass(frozen=True)
class Row:
    key: str
    title: str
    backbone: str | None  # None: the colour-texture baseline
    options: dict = field(default_factory=dict)


ROWS: dict[str, Row] = {  # every head named explicitly: the default switched from pixel to context (see docs/STATUS.md)
    "baseline": Row("baseline", "colour-texture classifier (HistGradientBoosting)", None),
    "small": Row("small", "`small --head pixel` (1×1 head, the default until the switch)", "small", {"head": "pixel"}),
    "small-context": Row("small-context", "`small --head context` (the default now: 3 heads)", "small", {"head": "context"}),
    "small-auto": Row("small-auto", "`small --t auto --blocks auto` (context head)", "small",
                      {"head": "context", "t": "auto", "blocks": "auto"}),
    "small-rgb": Row("small-rgb", "`small --head pixel --rgb-skip`", "small", {"head": "pixel", "rgb_skip": True}),
    "raw": Row("raw", "raw pixels (`random:small --head pixel --rgb-skip`)", "random:small",
               {"head": "pixel", "rgb_skip": True}),
    "random": Row("random", "`random:small --head pixel`", "random:small", {"head": "pixel"}),
    "small-context-012": Row("small-context-012", "`small --head context --blocks 0,1,2 --ensemble 1` (the context "
                             "head's default blocks until 2026-12-07)", "small",
                             {"head": "context", "blocks": [0, 1, 2], "ensemble": 1}),
    # raw pixels for the context head: its colour skip is all the untrained backbone adds that carries signal
    "raw-context": Row("raw-context", "raw pixels, context head (`random:small --head context`)", "random:small",
                       {"head": "context"}),
    # one head instead of the default ensemble of 3 (the default until 2026-12-07)
    "small-context-1": Row("small-context-1", "`small --head context --ensemble 1` (one head: the default until "
                           "2026-12-07)", "small", {"head": "context", "ensemble": 1}),
    "raw-context-1": Row("raw-context-1", "raw pixels, one context head (`random:small --ensemble 1`)", "random:small",
                         {"head": "context", "ensemble": 1}),
}


def heads_of(row: Row, quick: bool) -> int | None:
    """How many heads a pdseg row trains: the row's own setting, else one in quick mode (part of its smaller
    budget) and the product's default ensemble otherwise; None for the baseline."""
    from pdseg_qupath.learn.options import TrainOptions

    if row.backbone is None:
        return None
    return int({**(QUICK_BUDGET if quick else {}), **row.options}.get("ensemble", TrainOptions().ensemble))


KEEP_MARKER = "<!-- accuracy.py keeps everything below this line when it rewrites this file -->"


def backbone_row(text: str) -> Row:
    """``NAME=DIR`` → a row training ``--backbone DIR`` with the default (context) head."""
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder or name in ROWS:
        raise argparse.ArgumentTypeError(f"--backbone-row {text!r}: expected NAME=DIR with a new row name "
                                         f"(not one of {', '.join(ROWS)})")
    if not Path(folder).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"--backbone-row {text!r}: {folder} is not a backbone folder")
    path = str(Path(folder).expanduser().resolve())
    return Row(name, f"`--backbone {Path(path).name}` (`{path}`, context head)", path, {"head": "context"})

DEFAULT_ROWS = tuple(ROWS)


def has_context_head() -> bool:
    from dataclasses import fields

    from pdseg_qupath.learn.options import TrainOptions

    return any(f.name == "head" for f in fields(TrainOptions))


# ------------------------------------------------------------------------------------------ the data
def splits(args, quick: bool) -> dict[str, tuple[Path, Path, list[str] | None]]:
    """case → (train folder, test folder, test image names or None for all)."""
    from heads import link_split

    out: dict[str, tuple[Path, Path, list[str] | None]] = {}
    if args.gbm40 and args.gbm40.is_dir():
        d = args.work / "gbm40-split"
        tr = link_split(args.gbm40, d / "train", [f"{i:02d}" for i in range(1, 31)])
        te = link_split(args.gbm40, d / "test", [f"{i:02d}" for i in range(31, 41)])
        out["gbm40"] = (tr, te, [f"{i:02d}.png" for i in range(31, 36)] if quick else None)
    if args.ebhi and args.ebhi.is_dir():  # quick: 24 test images
        names = sorted(p.name for p in (args.ebhi / "test").glob("*.png"))
        # quick: the first 4 of each of the 6 categories
        by_cat: dict[str, list[str]] = {}
        for n in names:
            by_cat.setdefault(n.split("_")[0], []).append(n)
        pick = [n for c in sorted(by_cat) for n in by_cat[c][:4]]
        out["ebhi"] = (args.ebhi / "train", args.ebhi / "test", pick if quick else None)
    if args.ivygap and args.ivygap.is_dir():
        names = sorted(p.name for p in (args.ivygap / "test").glob("*.png"))
        out["ivygap"] = (args.ivygap / "train", args.ivygap / "test", names[::5] if quick else None)  # quick: 8
    return out


def distinct_subsets(names: list[str], n: int, count: int) -> list[list[str]]:
    """``count`` different random subsets of ``n`` names (all of them if fewer exist): draw j is seeded with
    (n, j), and a draw that repeats an earlier subset is skipped, so that more subsets only add new ones."""
    total = math.comb(len(names), n)
    picks: list[list[str]] = []
    j = 0
    while len(picks) < min(count, total):
        pick = sorted(np.random.default_rng([n, j]).choice(names, size=n, replace=False).tolist())
        if pick not in picks:
            picks.append(pick)
        j += 1
    return picks


def train_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


# --------------------------------------------------------------------------------------- one run
def run_cell(row: Row, case: Case, train_dir: Path, test_dir: Path, test_names, seed: int,
             images: list[str] | None, quick: bool, run: Path) -> dict:
    """Train and score one (row, case, seed, training subset); returns the run's record."""
    from pdseg_qupath.learn.options import TrainOptions

    extra = QUICK_BUDGET if quick else {}
    if quick and case.key in QUICK_MPP:
        case = Case(case.key, case.title, case.image_mpp, QUICK_MPP[case.key], case.score_class, QUICK_MPP[case.key])
    t0 = time.perf_counter()
    if row.backbone is None:
        from baseline_pixel_classifier import evaluate_baseline, fit_baseline

        model, cmap, io, info = fit_baseline(train_dir, image_mpp=case.image_mpp, mpp=case.work_mpp(row), seed=seed,
                                             images=images, options=TrainOptions(**extra))
        t1 = time.perf_counter()
        m = evaluate_baseline(model, cmap, io, test_dir, image_mpp=case.image_mpp, images=test_names)
        rec = {"train_info": info}
    else:
        from pdseg_qupath.sources.inputs import open_source
        from pdseg_qupath.tasks.evaluate import evaluate
        from pdseg_qupath.tasks.train import train

        opts = TrainOptions(**{**extra, **row.options})
        res = train(open_source(train_dir), run / "model", backbone=row.backbone, mpp=case.mpp,
                    image_mpp=case.image_mpp, device="cpu", seed=seed, options=opts, images=images)
        t1 = time.perf_counter()
        m = evaluate(open_source(test_dir), run / "model", run / "report", images=test_names,
                     image_mpp=case.image_mpp, device="cpu", overlays=False)
        rec = {"train_images": res.train_images, "val_images": res.val_images, "val_mode": res.val_mode,
               "best_epoch": res.best_epoch, "val_miou": res.best.get("miou"),
               "t": res.model.features.get("t"), "blocks": res.model.features.get("blocks"),
               "head": getattr(res.model.head.config, "kind", "pixel"), "heads": opts.ensemble}
        auto = res.model.training.get("auto")
        if auto:
            rec["auto"] = {k: auto[k] for k in ("choice", "estimate", "seconds", "candidates", "fallback")}
    per_class = {k: v["dice"] for k, v in m["per_class"].items()}
    rec["all_annotated_macro_dice"] = (m.get("all_annotated") or {}).get("macro_dice")  # glass included
    rec.update({
        "row": row.key, "case": case.key, "seed": seed, "mpp": case.work_mpp(row), "n_train": len(images) if images else "all",
        "images": images, "macro_dice": m["macro_dice"], "miou": m["miou"], "accuracy": m["accuracy"],
        "per_class_dice": per_class,
        "score": per_class[case.score_class] if case.score_class else m["macro_dice"],
        "train_s": round(t1 - t0, 1), "evaluate_s": round(time.perf_counter() - t1, 1),
    })
    return rec


def _same_protocol(rec: dict, row: str, case: str, quick: bool) -> bool:
    """A finished run counts only if it ran at the work resolution this protocol asks for (it changed once) and
    with as many heads as the row trains today (runs from before ``--ensemble`` trained one)."""
    c = CASES[case]
    heads = heads_of(ROWS[row], quick)
    if heads is not None and rec.get("heads", 1) != heads:
        return False
    if quick and case in QUICK_MPP:
        return rec.get("mpp") == QUICK_MPP[case]
    return rec.get("mpp") == c.work_mpp(ROWS[row])


# ------------------------------------------------------------------------------------------ the table
def _stats(v: list[float]) -> dict:
    a = np.array([x for x in v if x is not None], float)
    if not len(a):
        return {"mean": None, "min": None, "max": None, "sd": None, "n": 0}
    return {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()),
            "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}


def _fmt(s: dict, key: str = "mean") -> str:
    if not s or s["n"] == 0:
        return "—"
    if s["n"] == 1:
        return f"{s[key]:.3f}"
    return f"{s['mean']:.3f} ({s['min']:.3f}–{s['max']:.3f})"


def summarize(runs: list[dict], rows: list[str], cases: list[str]) -> dict:
    table: dict = {}
    for r in rows:
        table[r] = {}
        for c in cases:
            main = [x for x in runs if x["row"] == r and x["case"] == c and x["n_train"] == "all"]
            table[r][c] = {"score": _stats([x["score"] for x in main]), "miou": _stats([x["miou"] for x in main]),
                           "per_class": {k: _stats([x["per_class_dice"][k] for x in main])
                                         for k in (main[0]["per_class_dice"] if main else {})}}
        for n in (1, 3):
            le = [x for x in runs if x["row"] == r and x["case"] == "ebhi" and x["n_train"] == n]
            table[r][f"ebhi-n{n}"] = {"score": _stats([x["score"] for x in le])}
    return table


def main_table(table: dict, rows: list[str], cases: list[str]) -> list[str]:
    """The markdown of the main table (mean (min–max) per cell) and its computed reading."""
    L: list[str] = []
    head = ["Row"] + [CASES[c].title for c in cases] + ["EBHI-Seg, 1 image", "EBHI-Seg, 3 images"]
    L += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = []
        for c in cases:
            s = table[r][c]
            cell = _fmt(s["score"])
            if c == "ivygap" and s["miou"]["n"]:
                cell += f" / {s['miou']['mean']:.3f}"
            cells.append(cell)
        cells += [_fmt(table[r]["ebhi-n1"]["score"]), _fmt(table[r]["ebhi-n3"]["score"])]
        L.append(f"| {ROWS[r].title} | " + " | ".join(cells) + " |")
    L += ["", "**Reading** (computed from the table): "]
    for c in cases + ["ebhi-n1", "ebhi-n3"]:
        means = {r: table[r][c]["score"]["mean"] for r in rows if table[r][c]["score"]["n"]}
        if not means:
            continue
        best = max(means, key=means.get)
        name = CASES[c].title if c in CASES else f"EBHI-Seg with {c[-1]} training image(s)"
        line = f"- {name}: best `{best}` ({means[best]:.3f})"
        if "small" in means and "baseline" in means:
            line += f"; `small` − colour-texture = {means['small'] - means['baseline']:+.3f}"
        if "small-context" in means and "baseline" in means:
            line += f"; `small --head context` − colour-texture = {means['small-context'] - means['baseline']:+.3f}"
        if "small" in means and "raw" in means:
            line += f"; `small` − raw pixels = {means['small'] - means['raw']:+.3f}"
        if "small-context" in means and "raw-context" in means:
            line += f"; `small --head context` − raw pixels (context head) = " \
                    f"{means['small-context'] - means['raw-context']:+.3f}"
        for r, m in means.items():
            if r not in DEFAULT_ROWS and "small-context" in means:
                line += f"; `{r}` − `small --head context` = {m - means['small-context']:+.3f}"
        L.append(line + ".")
    return L


def _span(v: list[int]) -> str:
    """[0, 1, 2] → "0–2", [5] → "5"."""
    if len(v) > 2 and list(v) == list(range(v[0], v[-1] + 1)):
        return f"{v[0]}–{v[-1]}"
    return ",".join(map(str, v))


def auto_section(runs: list[dict]) -> list[str]:
    """``small-auto`` against ``small-context`` (the same head with the default t and blocks), seed by seed:
    both scores, the choice, the cross-validated estimate, and the training time of each."""
    L: list[str] = []
    for c in CASES:
        pairs = []
        for a in sorted((x for x in runs if x["row"] == "small-auto" and x["case"] == c and x["n_train"] == "all"),
                        key=lambda x: x["seed"]):
            # the runs so far were made when the context head's default was blocks 0–2 (until 2026-12-07)
            d = next((x for row in ("small-context-012", "small-context") for x in runs if x["row"] == row
                      and x["case"] == c and x["n_train"] == "all" and x["seed"] == a["seed"]), None)
            if d is not None:
                pairs.append((d, a))
        if not pairs:
            continue
        if not L:
            L += ["## `train --t auto --blocks auto`", "",
                  ("`small-auto` against the same context head at t 5, blocks 0–2 (the default when these runs were made), "
                   "same seed, same training tiles for the final head. The search cross-validates t ∈ {5, 25, 100} "
                   "× blocks {0–2, 1–2} by image over min(4, images) folds (16 tiles per class, one view, "
                   "6 head epochs per fold) and records each candidate's fold scores in model.json; *CV estimate* "
                   "is the chosen candidate's mean fold score, shown to the user as the expected macro Dice."), ""]
        L += [f"### {CASES[c].title}", "",
              "| seed | default | auto | auto − default | chosen t / blocks | CV estimate (macro Dice) | train s (default → auto) "
              "| of which search s | CV mean per candidate (t / blocks) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for d, a in pairs:
            au = a.get("auto") or {}
            ch = au.get("choice") or {"t": a.get("t"), "blocks": a.get("blocks")}
            est = au.get("estimate")
            L.append(f"| {a['seed']} | {d['score']:.3f} | {a['score']:.3f} | {a['score'] - d['score']:+.3f} | "
                     f"{_span(ch['t'])} / {_span(ch['blocks'])} | "
                     f"{'—' if est is None else f'{est:.3f}'} | {d['train_s']:.0f} → {a['train_s']:.0f} | "
                     f"{au.get('seconds', 0):.0f} | "
                     + " · ".join(f"{_span(k['t'])} / {_span(k['blocks'])}: "
                                  + ("—" if k["mean"] is None else f"{k['mean']:.3f}")
                                  for k in au.get("candidates") or []) + " |")
        ds, as_ = np.array([d["score"] for d, _ in pairs]), np.array([a["score"] for _, a in pairs])
        td, ta = sum(d["train_s"] for d, _ in pairs), sum(a["train_s"] for _, a in pairs)
        L += ["", (f"Mean over {len(pairs)} seeds: default {ds.mean():.3f} (spread {ds.max() - ds.min():.3f}), auto "
                   f"{as_.mean():.3f} (spread {as_.max() - as_.min():.3f}); auto − default {as_.mean() - ds.mean():+.3f}"
                   f" (per seed {', '.join(f'{v:+.3f}' for v in as_ - ds)}). Training time: auto {ta / max(td, 1e-9):.1f}× "
                   "the default (train only, summed over seeds; evaluate is the same). The search's cost does not "
                   "depend on the training budget (its tiles and epochs are fixed): here "
                   f"{min(a.get('auto', {}).get('seconds', 0) for _, a in pairs):.0f}–"
                   f"{max(a.get('auto', {}).get('seconds', 0) for _, a in pairs):.0f} s per run."), ""]
    return L


def write_docs(runs: list[dict], meta: dict, md: Path, js: Path, also: Path | None = None,
               auto_runs: list[dict] | None = None) -> None:
    from pdseg_qupath.core.fileio import atomic_write_text, write_json

    rows = [r for r in meta["rows"]]
    cases = [c for c in meta["cases"]]
    table = summarize(runs, rows, cases)
    write_json(js, {"meta": meta, "table": table, "runs": runs,
                    "auto_runs": [x for x in auto_runs or [] if x["row"] == "small-auto"]})
    L = ["# Accuracy: pdseg's heads against a colour-texture pixel classifier", "",
         (f"Generated by `python benchmarks/accuracy.py{' --quick' if meta['quick'] else ''}` "
         f"({meta['generated']}); every run is in [`accuracy.json`](accuracy.json). Machine: {meta['machine']}."),
         ""]
    if meta["quick"]:
        L += [("**Quick mode**: fewer seeds and subsets, fewer test images (gbm40 31–35, EBHI-Seg 24 of 120 "
              "(4 per category), worked at its own 1.2 µm/px instead of 0.5, IvyGAP 8 of 40, worked at 16 µm/px "
              "instead of 8) and a smaller training budget (8 tiles per class, 1 view, ≤ 8 "
              "validation tiles, one head) than the product's defaults (48 tiles per class, 2 views, an ensemble "
              "of 3 heads). The figures are "
              "comparable with each other, not with a full run."), ""]
    if meta.get("incomplete"):
        L += [f"**Incomplete**: {meta['incomplete']}", ""]
    L += [("Each cell: mean over seeds (min–max). Scores are `evaluate`'s: annotated pixels only, one "
          "confusion matrix pooled over the test images; macro Dice is the mean over classes."), ""]
    L += main_table(table, rows, cases)
    if meta["quick"]:
        L += ["", ("In quick mode the 8 IvyGAP test images hold no infiltrating tumour: a class with no truth "
                   "pixels that is predicted scores Dice 0 (`evaluate`'s rule), which lowers every row's macro "
                   "Dice alike.")]
    if also and also.is_file():
        other = json.loads(also.read_text())
        om = other["meta"]
        L += ["", "## At the product's default training budget (partial run)", "",
              (f"`benchmarks/accuracy.py` without `--quick`, seeds {', '.join(map(str, om['seeds']))}, only "
               f"for {', '.join(CASES[c].title for c in om['cases'])} and rows {', '.join(f'`{r}`' for r in om['rows'])} "
               f"(all test images; {om['generated']}; {om['machine']})"
               + (f"; incomplete: {om['incomplete']}" if om.get("incomplete") else "") + "."), ""]
        L += main_table(other["table"], om["rows"], om["cases"])
        at = {}
        for x in other["runs"]:
            at.setdefault(x["row"], set()).add(x["mpp"])
        L += ["", "Work resolution: " + "; ".join(f"`{r}` at {' and '.join(f'{m:g}' for m in sorted(at[r]))} µm/px"
                                                  for r in om["rows"] if r in at) + "."]
    if auto_runs:
        L += [""] + auto_section(auto_runs)
    L += ["", "Seeds: " + ", ".join(map(str, meta["seeds"])) + f"; label-efficiency subsets per size: {meta['subsets']} "
          "(each subset trained once, with its own seed; the spread covers both).", ""]
    for c in cases:
        classes = next((list(x["per_class_dice"]) for x in runs if x["case"] == c), [])
        if len(classes) < 3:
            continue
        L += [f"### Per-class Dice: {CASES[c].title}", "",
              "| Row | " + " | ".join(classes) + " |", "|" + " --- |" * (len(classes) + 1)]
        for r in rows:
            pc = table[r][c]["per_class"]
            L.append(f"| {ROWS[r].title} | " + " | ".join(
                f"{pc[k]['mean']:.3f}" if k in pc and pc[k]["n"] else "—" for k in classes) + " |")
        L.append("")
    L += ["## Protocol", "",
          "- **Rows.** " + "; ".join(f"`{r}`: {ROWS[r].title}" for r in rows) + ". The CLI has no RGB-only "
          "head, so raw pixels are measured as `--rgb-skip` on the untrained backbone (`random:small`). "
          "The colour-texture classifier is `benchmarks/baseline_pixel_classifier.py`: RGB and HED, and at "
          "σ = 1, 2, 4, 8, 16 px (work resolution) Gaussian, difference of Gaussians and gradient magnitude "
          "(96 features), a histogram gradient-boosting ensemble, trained on the pixels `train` samples from "
          "the same tiles (same seed), with the same class-prior correction, scored on the same pixels.",
          ("- **gbm40** (`shared/data/gbm40`): 40 glioblastoma tiles with traced nuclei, 0.5 µm/px; train on "
          "01–30, score on 31–40 (Nucleus Dice)."),
          ("- **EBHI-Seg** (`shared/data/ebhi-seg`): colon biopsies, Gland vs Other, 8 training images, 120 "
          "test images, 224-px crops at about 1.2 µm/px. pdseg rows work at the product's default 0.5 µm/px "
          "(the backbone's own; the crops are upsampled), the colour-texture classifier at the crops' own "
          "1.2 µm/px, where it scores best (see *Work resolution*); quick mode works every row at 1.2. Label "
          "efficiency trains on different random subsets of 1 and 3 of the 8."),
          ("- **IvyGAP** (`/work/data/ivygap-gbm`, made by `benchmarks/prepare_ivygap_gbm.py` from the MIT-"
          "licensed GBM_WSSM repository; source, licence and citation in its README): whole glioblastoma "
          "sections, 8 anatomic regions (leading edge, infiltrating tumour, cellular tumour, perinecrotic "
          "zone, pseudopalisading cells, microvascular proliferation, necrosis, background); 8 sparsely "
          "annotated training images → 40 densely annotated test images, about 4 µm/px, worked at 8 µm/px."),
          ("- **Runs**: `train` then `evaluate` through the Python API (CPU, fp32 backbone); features are "
          "cached on disk in fp16 between runs (`benchmarks/heads.py`)."),
          (f"- **Time**: the {len(runs)} runs took {sum(x['train_s'] + x['evaluate_s'] for x in runs) / 60:.0f} min "
           "(train + evaluate, summed) on this machine"
           + (f"; the last invocation computed {meta['computed']} of them in {meta['wall_s'] / 60:.0f} min and "
              f"reused {meta['reused']} from `--work`." if meta.get("computed") else ".")), ""]
    kept = md.read_text(encoding="utf-8").partition(KEEP_MARKER) if md.is_file() else ("", "", "")
    if kept[1]:
        L += ["", KEEP_MARKER + kept[2].rstrip("\n")]
    atomic_write_text(md, "\n".join(L) + "\n")


def auto_cells(runs_dir: Path) -> list[dict]:
    """Every finished ``small-auto``, ``small-context`` and ``small-context-012`` run on all training images,
    whatever the seeds of this invocation (the auto comparison may use more seeds than the main table)."""
    return [json.loads(p.read_text()) for row in ("small-auto", "small-context", "small-context-012")
            for p in sorted(runs_dir.glob(f"*-{row}-all-s*.json"))]


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 seeds, 2 subsets, fewer test images, smaller budget")
    ap.add_argument("--gbm40", type=Path, default=Path("/work/shared/data/gbm40"))
    ap.add_argument("--ebhi", type=Path, default=Path("/work/shared/data/ebhi-seg"))
    ap.add_argument("--ivygap", type=Path, default=Path("/work/data/ivygap-gbm"))
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--backbone-row", type=backbone_row, action="append", default=[], metavar="NAME=DIR",
                    help="add a row NAME: train --backbone DIR with the context head (e.g. a fine-tuned backbone)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 3; quick 2)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="run seeds FIRST.. (to split one table over processes sharing --work; then --docs-only)")
    ap.add_argument("--subsets", type=int, default=None, help="different random subsets per label-efficiency size (4; quick 2; at most all of them)")
    ap.add_argument("--no-label-efficiency", action="store_true")
    ap.add_argument("--docs-only", action="store_true", help="rewrite the docs from the finished runs; compute nothing")
    ap.add_argument("--also", type=Path, default=None,
                    help="the accuracy.json of another (e.g. partial full-budget) run, shown as a second table")
    ap.add_argument("--work", type=Path, default=None, help="runs and feature cache (default /work/data/accuracy-work[-quick])")
    ap.add_argument("--feature-cache", type=Path, default=Path("/tmp/pdseg-featcache"),
                    help="backbone features on disk, shared with benchmarks/heads.py")
    ap.add_argument("--md", type=Path, default=HERE.parent / "docs" / "ACCURACY.md")
    ap.add_argument("--json", type=Path, default=HERE.parent / "docs" / "accuracy.json")
    ap.add_argument("--machine", default=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores")
    args = ap.parse_args()
    quick = args.quick
    args.work = args.work or Path(f"/work/data/accuracy-work{'-quick' if quick else ''}")
    args.work.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.first_seed, args.first_seed + (args.seeds or (2 if quick else 3))))
    n_subsets = args.subsets or (2 if quick else 4)
    rows = [r for r in args.rows if r != "small-context" or has_context_head()]
    for row in args.backbone_row:
        ROWS[row.key] = row
        rows.append(row.key)

    from heads import install_cache

    install_cache(args.feature_cache)
    data = splits(args, quick)
    cases = [c for c in args.cases if c in data]
    missing = [c for c in args.cases if c not in data]
    # The plan: main table first (cheap rows first within a case), then label efficiency.
    plan = [(r, c, s, None) for s in seeds for c in cases for r in rows]
    if "ebhi" in data and not args.no_label_efficiency:
        names = train_names(data["ebhi"][0])
        for n in (1, 3):
            for k, pick in enumerate(distinct_subsets(names, n, n_subsets)):
                plan += [(r, "ebhi", k, pick) for r in rows]
    runs_dir = args.work / "cells"
    runs_dir.mkdir(exist_ok=True)
    meta = {"quick": quick, "rows": rows, "cases": cases, "seeds": seeds, "subsets": n_subsets,
            "machine": args.machine, "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "incomplete": f"no data for {missing}" if missing else None}
    t0 = time.perf_counter()
    computed = reused = 0
    failed: list[str] = []
    runs: list[dict] = []
    for i, (r, c, seed, images) in enumerate(plan):
        tag = f"{c}-{r}-{'all' if images is None else '+'.join(x.split('.')[0][:24] for x in images)}-s{seed}"
        f = runs_dir / f"{tag}.json"
        if f.is_file() and _same_protocol(json.loads(f.read_text()), r, c, quick):
            runs.append(json.loads(f.read_text()))
            reused += 1
            continue
        if args.docs_only:
            failed.append(tag)
            continue
        tr, te, test_names = data[c]
        print(f"[{i + 1}/{len(plan)}] {tag}", flush=True)
        try:
            rec = run_cell(ROWS[r], CASES[c], tr, te, test_names, seed, images, quick, args.work / "runs" / tag)
        except Exception:  # noqa: BLE001 -- one failed run must not lose the others; it is reported and retried next time
            import traceback

            traceback.print_exc()
            failed.append(tag)
            continue
        f.write_text(json.dumps(rec, indent=1))
        runs.append(rec)
        computed += 1
        print(f"    score {rec['score']:.4f} macro {rec['macro_dice']:.4f} ({rec['train_s']} s + {rec['evaluate_s']} s)",
              flush=True)
        meta.update(wall_s=time.perf_counter() - t0, computed=computed, reused=reused,
                    incomplete=f"{len(plan) - i - 1} of {len(plan)} runs still to do" if i + 1 < len(plan) else None)
        write_docs(runs, meta, args.md, args.json, args.also, auto_cells(runs_dir))
    not_done = f"{len(failed)} of {len(plan)} runs not done yet" if args.docs_only else f"failed runs: {failed}"
    gaps = ([f"no data for {missing}"] if missing else []) + ([not_done] if failed else [])
    meta.update(wall_s=time.perf_counter() - t0, computed=computed, reused=reused,
                incomplete="; ".join(gaps) or None)
    write_docs(runs, meta, args.md, args.json, args.also, auto_cells(runs_dir))
    print(f"wrote {args.md} and {args.json}: {computed} runs computed, {reused} reused, "
          f"{(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
