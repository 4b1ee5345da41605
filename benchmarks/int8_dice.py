"""Downstream check of the int8 probe: ``benchmarks/gbm40_loop.py`` with int8 features (not a test).

Runs the gbm40 loop (train on tiles 01-30, evaluate on 31-40, defaults) in this process with every
feature extractor that training and evaluation build (``learn.predictor.features_for``) replaced by the
int8 variant of ``benchmarks/int8_probe.py``: int8 encoder and UNet convolutions (static ranges
calibrated on gbm40 tiles 01-02, which are training tiles; per-channel scales in the UNet; 1x1 shortcuts
fp32). Training and evaluation thus both see int8 features, as an opt-in int8 model would. Without
``--int8`` it is exactly ``gbm40_loop.py``, for the side-by-side fp32 run.

    nice -n 10 python benchmarks/int8_dice.py /path/to/gbm40 --int8 --seed 0 --out /tmp/g-int8-s0

``--ivygap DIR`` runs the IvyGAP set the same way (4 µm/px images worked at 8 µm/px, as ``accuracy.py``).
``--ebhi DIR`` runs EBHI-Seg instead (DIR/train → DIR/test, ``--image-mpp 1.2``, the default 0.5 µm/px work
resolution, defaults otherwise; macro Dice), still calibrated on the gbm40 tiles of the first argument
(``--texture`` / ``--no-texture``, ``--prior-correction``, ``--class-weights``, ``--cache-mb``, ``--views``: as ``train``'s; the defaults
otherwise):

    nice -n 10 python benchmarks/int8_dice.py /path/to/gbm40 --ebhi /path/to/ebhi-seg --int8 --seed 0 --out /tmp/e
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gbm40_loop
import int8_probe


def main() -> None:
    use_int8 = "--int8" in sys.argv
    if use_int8:
        sys.argv.remove("--int8")
        _patch(Path(sys.argv[1]))
    if "--ebhi" in sys.argv or "--ivygap" in sys.argv:
        _tissue()
    else:
        gbm40_loop.main()


#: tissue sets: (image µm/px, work µm/px), as benchmarks/accuracy.py runs them
TISSUE = {"ebhi": (1.2, 0.5), "ivygap": (4.0, 8.0)}


def _tissue() -> None:
    import argparse
    import json
    import time

    from rich.console import Console

    from pdseg_qupath.learn.options import TrainOptions
    from pdseg_qupath.sources.inputs import open_source
    from pdseg_qupath.tasks.evaluate import evaluate
    from pdseg_qupath.tasks.train import train
    from pdseg_qupath.ui import ConsoleEvents

    ap = argparse.ArgumentParser()
    ap.add_argument("gbm40", type=Path)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--ebhi", type=Path)
    group.add_argument("--ivygap", type=Path, help="benchmarks/prepare_ivygap_gbm.py's folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--texture", action=argparse.BooleanOptionalAction, default=None,
                    help="train --texture / --no-texture (the default otherwise)")
    ap.add_argument("--prior-correction", type=float, default=None, help="train --prior-correction (default: train's)")
    ap.add_argument("--class-weights", default=None, help="train --class-weights (e.g. balanced)")
    ap.add_argument("--cache-mb", type=float, default=None, help="train --cache-mb (default: train's)")
    ap.add_argument("--views", type=int, default=None, help="TrainOptions.views (default: train's)")
    args = ap.parse_args()
    key = "ebhi" if args.ebhi else "ivygap"
    root, (image_mpp, mpp) = getattr(args, key), TISSUE[key]
    events = ConsoleEvents(Console(stderr=True), plain=True)
    t0 = time.perf_counter()
    opts = TrainOptions(texture=args.texture, class_weights=args.class_weights,
                        **gbm40_loop._given(prior_correction=args.prior_correction, cache_mb=args.cache_mb,
                                            views=args.views))
    res = train(open_source(root / "train"), args.out / "model", backbone="small", mpp=mpp, image_mpp=image_mpp,
                device="cpu", seed=args.seed, events=events, options=opts)
    t1 = time.perf_counter()
    m = evaluate(open_source(root / "test"), args.out / "model", args.out / "report", image_mpp=image_mpp,
                 device="cpu", events=events)
    print(json.dumps({"backbone": res.backbone_label, "best_epoch": res.best_epoch, "macro_dice": m["macro_dice"],
                      "miou": m["miou"], "per_class_dice": {k: v["dice"] for k, v in m["per_class"].items()},
                      "train_s": round(t1 - t0, 1), "evaluate_s": round(time.perf_counter() - t1, 1)}, indent=1))


def _patch(gbm40: Path) -> None:
    from pdseg_qupath.backbone.features import LDMFeatures
    from pdseg_qupath.learn import predictor

    made: dict[int, object] = {}

    def int8_features(backbone, **kwargs):
        if id(backbone) not in made:  # one int8 copy per loaded backbone
            ranges = int8_probe.calibrate(backbone, int8_probe.gbm40_tiles(gbm40.parent, [1, 2]))
            made[id(backbone)] = int8_probe.int8_copy(backbone, ("encoder", "unet"), ranges, True, ("unet",))
        print("int8 features (probe)", file=sys.stderr)
        return LDMFeatures(made[id(backbone)], **kwargs)

    predictor.LDMFeatures = int8_features


if __name__ == "__main__":
    main()
