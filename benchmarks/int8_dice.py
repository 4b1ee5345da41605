"""Downstream check of the int8 probe: ``benchmarks/gbm40_loop.py`` with int8 features (not a test).

Runs the gbm40 loop (train on tiles 01-30, evaluate on 31-40, defaults) in this process with every
feature extractor that training and evaluation build (``learn.predictor.features_for``) replaced by the
int8 variant of ``benchmarks/int8_probe.py``: int8 encoder and UNet convolutions (static ranges
calibrated on gbm40 tiles 01-02, which are training tiles; per-channel scales in the UNet; 1x1 shortcuts
fp32). Training and evaluation thus both see int8 features, as an opt-in int8 model would. Without
``--int8`` it is exactly ``gbm40_loop.py``, for the side-by-side fp32 run.

    nice -n 10 python benchmarks/int8_dice.py /path/to/gbm40 --int8 --seed 0 --out /tmp/g-int8-s0
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
    gbm40_loop.main()


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
