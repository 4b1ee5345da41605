"""The colour-texture baseline of benchmarks/accuracy.py runs on the product's data path (needs scikit-learn)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import box

pytest.importorskip("sklearn")
pytest.importorskip("scipy")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from baseline_pixel_classifier import evaluate_baseline, fit_baseline, pixel_features

from pdseg_qupath.core.annotations import Annotation
from pdseg_qupath.learn.options import TrainOptions
from pdseg_qupath.sources.qupath.geojson import write_geojson


def _two_textures(folder: Path, n: int, seed: int) -> None:
    """Images whose left half is smooth pink and right half a purple speckle, annotated as such."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.empty((64, 96, 3), np.uint8)
        img[:, :48] = (230, 160, 200) + rng.integers(-6, 6, (64, 48, 3))
        img[:, 48:] = np.where(rng.random((64, 48, 1)) < 0.5, (90, 40, 140), (200, 170, 220))
        Image.fromarray(img.astype(np.uint8)).save(folder / f"im{i}.png")
        write_geojson(folder / f"im{i}.geojson", [Annotation(box(2, 2, 44, 62), "Stroma", (0, 200, 0)),
                                                   Annotation(box(52, 2, 94, 62), "Tumor", (200, 0, 0))])


def test_features_are_colour_and_texture_at_five_scales() -> None:
    f = pixel_features(np.full((20, 30, 3), 128, np.uint8))
    assert f.shape == (20, 30, 96) and f.dtype == np.float32
    assert np.allclose(f[..., 6 + 6:6 + 18], 0, atol=1e-5)  # a flat image has no DoG and no gradient


@pytest.mark.slow
def test_baseline_learns_texture_from_sparse_annotations(tmp_path: Path) -> None:
    _two_textures(tmp_path / "train", 2, 0)
    _two_textures(tmp_path / "test", 2, 1)
    model, cmap, io, info = fit_baseline(tmp_path / "train", image_mpp=1.0, mpp=1.0, seed=0,
                                         options=TrainOptions(tiles_per_class=4, views=1), max_iter=20)
    assert cmap.names == ["Stroma", "Tumor"] and info["train_pixels"] > 100
    m = evaluate_baseline(model, cmap, io, tmp_path / "test", image_mpp=1.0)
    assert m["macro_dice"] > 0.95
    # Only annotated pixels are scored: the 4-px unannotated border and gap are not counted.
    # every annotated pixel in all_annotated; the main scores only inside the tissue predict detects (as evaluate)
    assert m["all_annotated"]["pixels_scored"] == 2 * 2 * 42 * 60 >= m["pixels_scored"] > 0
    assert m["scored_within"] == "detected tissue, as predict"
