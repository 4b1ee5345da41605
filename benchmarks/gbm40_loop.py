"""gbm40 nucleus benchmark of the train → evaluate loop (not a test; prints JSON).

Trains on tiles 01–30 and evaluates on 31–40 of a gbm40 folder (``NN.png`` + ``NN.geojson``, 20x),
with ``--image-mpp 0.5 --mpp 0.5``, exactly as a user would through the Python API. The data set is
research-only and is never shipped; pass its folder on the command line.

    python benchmarks/gbm40_loop.py /path/to/gbm40 --backbone small --out /tmp/gbm40-run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

from rich.console import Console


def _link_split(src: Path, dst: Path, first: int, last: int) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for i in range(first, last + 1):
        for ext in (".png", ".geojson"):
            f = src / f"{i:02d}{ext}"
            link = dst / f.name
            if not link.exists():
                os.symlink(f.resolve(), link)
    return dst


def _given(**options: object) -> dict:
    """The options given on the command line (not None): the others keep ``TrainOptions``' defaults."""
    return {k: v for k, v in options.items() if v is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gbm40", type=Path)
    ap.add_argument("--backbone", default="small")
    ap.add_argument("--out", type=Path, default=Path("gbm40-run"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--tiles-per-class", type=int, default=48)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--rgb-skip", action="store_true")
    ap.add_argument("--t", type=int, default=None)
    ap.add_argument("--blocks", type=str, default=None, help="comma-separated up-block indices")
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-features", action="store_true", help="reuse cached features across head variants")
    ap.add_argument("--prior-correction", type=float, default=None, help="train --prior-correction (default: train's)")
    ap.add_argument("--cache-mb", type=float, default=None, help="train --cache-mb (default: train's)")
    ap.add_argument("--hidden", default=None, help="head widths, e.g. 64,32 (default: the head's own)")
    ap.add_argument("--head", default="context", choices=["context", "pixel"])
    ap.add_argument("--texture", action=argparse.BooleanOptionalAction, default=None,
                    help="train --texture / --no-texture (default: the head's)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--skip-eval", action="store_true")
    args = ap.parse_args()

    from pdseg_qupath.learn.options import TrainOptions
    from pdseg_qupath.sources.inputs import open_source
    from pdseg_qupath.tasks.evaluate import evaluate
    from pdseg_qupath.tasks.train import train
    from pdseg_qupath.ui import ConsoleEvents

    events = ConsoleEvents(Console(stderr=True), plain=True)
    train_dir = _link_split(args.gbm40, args.out / "train", 1, 30)
    test_dir = _link_split(args.gbm40, args.out / "test", 31, 40)
    opts = TrainOptions(tiles_per_class=args.tiles_per_class, views=args.views, rgb_skip=args.rgb_skip,
                        t=args.t, overlap=args.overlap, keep_features=args.keep_features,
                        lr=args.lr, **_given(prior_correction=args.prior_correction, cache_mb=args.cache_mb),
                        hidden=tuple(int(h) for h in args.hidden.split(",")) if args.hidden else None, head=args.head,
                        texture=args.texture,
                        blocks=[int(b) for b in args.blocks.split(",")] if args.blocks else None)
    t0 = time.perf_counter()
    res = train(open_source(train_dir), args.out / "model", backbone=args.backbone, mpp=0.5,
                image_mpp=0.5, epochs=args.epochs, device="cpu", seed=args.seed, options=opts, events=events)
    t1 = time.perf_counter()
    if args.skip_eval:
        print(json.dumps({"backbone": res.backbone_label, "options": opts.to_json(), "val": res.best,
                          "train_s": round(t1 - t0, 1)}, indent=1))
        return
    metrics = evaluate(open_source(test_dir), args.out / "model", args.out / "report", image_mpp=0.5,
                       device="cpu", events=events)
    t2 = time.perf_counter()
    print(json.dumps({
        "backbone": res.backbone_label,
        "options": opts.to_json(),
        "best_epoch": res.best_epoch,
        "val_miou": res.best["miou"],
        "test": {k: metrics[k] for k in ("accuracy", "miou", "macro_dice")},
        "test_nucleus_dice": metrics["per_class"]["Nucleus"]["dice"],
        "test_background_dice": metrics["per_class"]["Background"]["dice"],
        "train_s": round(t1 - t0, 1),
        "evaluate_s": round(t2 - t1, 1),
        "evaluate_tiles": metrics["tiles"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cache": res.cache,
    }, indent=2))


if __name__ == "__main__":
    main()
