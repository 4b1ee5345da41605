"""bench_features runs on CPU and reports what the issue asks for; FLOPs match the reference."""

from __future__ import annotations

import json

import pytest

from pdseg_qupath.backbone.bench import bench_features, gflop_per_tile
from pdseg_qupath.backbone.model import RANDOM_LABEL, build_backbone


def test_bench_features_cpu_tiny() -> None:
    r = bench_features("random:tiny", "cpu", batch_size=2, steps=1, compile=False)
    json.dumps(r)  # JSON-ready
    assert RANDOM_LABEL in r["backbone"] and r["random_weights"] is True
    for k in ("tiles_per_s", "gflop_per_tile", "tflop_per_s", "peak_memory_gib", "ref_rel_error", "first_call_s"):
        assert r[k] >= 0, k
    assert r["tiles_per_s"] > 0 and r["gflop_per_tile"] > 0
    assert r["ref_rel_error"] < 1e-5  # eager fp32 against itself
    assert r["precision"] == "fp32" and r["compile"] is None and r["channels"] == 96


@pytest.mark.slow
def test_paper_flops_per_tile() -> None:
    """553 GFLOP/tile with all four up blocks (the reference figure); the default taps skip the last."""
    bb = build_backbone("pathsegdiff-brca-20x", "meta")
    assert round(gflop_per_tile(bb, [50], [0, 1, 2, 3], 256)) == 554
    assert round(gflop_per_tile(bb, [50], [1, 2], 256)) == 524
