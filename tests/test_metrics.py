"""Metrics on sparse labels, and the evaluate command's report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from shapely.geometry import box

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.metrics import Confusion, scores
from pdseg_qupath.sources.inputs import open_source

from _helpers import scores_from_labels
from _loop_data import feature, make_folder, make_image, train_tiny


def test_hand_computed_scores():
    truth = np.array([[0, 0, 1, 1], [255, 255, 1, 2]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1], [1, 1, 0, 255]], dtype=np.uint8)
    m = scores_from_labels(truth, pred, ["a", "b", "c"])
    # scored pixels: 6 (two 255 truths ignored). a: tp1 fn1 fp1; b: tp2 fn1 fp1; c: unpredicted (miss)
    assert m["per_class"]["a"] == pytest.approx(
        {"dice": 0.5, "iou": 1 / 3, "pixels": 2, "predicted_pixels": 2, "precision": 0.5, "recall": 0.5})
    assert m["per_class"]["b"]["dice"] == pytest.approx(2 * 2 / (3 + 3))
    assert m["per_class"]["b"]["iou"] == pytest.approx(2 / 4)
    assert m["per_class"]["c"]["dice"] == 0.0 and m["per_class"]["c"]["pixels"] == 1
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["miou"] == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)
    assert m["macro_dice"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert m["pixels_scored"] == 6 and m["pixels_unpredicted"] == 1


def test_class_without_pixels_is_not_scored():
    truth = np.array([0, 0, 1, 255], dtype=np.uint8)
    m = scores_from_labels(truth, truth.copy(), ["a", "b", "never"])
    assert m["per_class"]["never"] == {"dice": None, "iou": None, "pixels": 0, "predicted_pixels": 0,
                                       "precision": None, "recall": None}
    assert m["miou"] == 1.0 and m["macro_dice"] == 1.0
    json.dumps(m)  # no NaN: strict JSON


def test_merge_equals_one_shot():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 4, (50, 50)).astype(np.uint8)
    t[t == 3] = 255
    p = rng.integers(0, 3, (50, 50)).astype(np.uint8)
    a, b = Confusion(3), Confusion(3)
    a.update(t[:20], p[:20])
    b.update(t[20:], p[20:])
    assert scores(a.merge(b), "xyz") == scores_from_labels(t, p, "xyz")


def test_evaluate_report(tmp_path):
    src = make_folder(tmp_path / "src", n=2, size=(64, 64))
    model = train_tiny(src, tmp_path / "model", epochs=2, ensemble=1).model_dir  # one head: an image held out
    from pdseg_qupath.tasks.evaluate import evaluate

    test = tmp_path / "test"
    make_image(test, "t0", size=(72, 60), seed=11, extra_features=[feature(box(2, 2, 10, 10), "Tumor")])
    make_image(test, "blank", size=(40, 40), seed=12, annotate=False)
    metrics = evaluate(open_source(test), model, tmp_path / "report", device="cpu", image_mpp=0.5,
                       notes=["a note"])
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["per_class"].keys() == {"Background", "Nucleus"}
    for pc in saved["per_class"].values():
        assert set(pc) >= {"dice", "iou", "pixels"}
    assert {"accuracy", "miou", "macro_dice"} <= saved.keys()
    every = saved["all_annotated"]["per_class"]
    assert every["Background"]["pixels"] + every["Nucleus"]["pixels"] == 72 * 60
    in_tissue = saved["per_class"]["Background"]["pixels"] + saved["per_class"]["Nucleus"]["pixels"]
    assert in_tissue == round(72 * 60 * (1 - saved["outside_tissue_share"]))
    assert saved["unscored_annotation_classes"] == {"Tumor": 1}
    assert "blank.png" in saved["skipped_images"] and saved["notes"] == ["a note"]
    assert metrics["accuracy"] == saved["accuracy"]
    assert (tmp_path / "report" / "confusion.png").is_file()
    assert (tmp_path / "report" / "overlays" / "t0.png.overlay.png").is_file()
    with pytest.raises(PdsegError, match="nothing to evaluate"):
        evaluate(open_source(test), model, tmp_path / "r2", images=["blank.png"], device="cpu",
                 image_mpp=0.5)
    # scored as predict sees the slide (its tissue mask), with every annotated pixel reported beside
    assert saved["scored_within"].startswith("detected tissue") and 0 <= saved["outside_tissue_share"] <= 1
    assert saved["all_annotated"]["per_class"].keys() == {"Background", "Nucleus"}
    # the training images are left out unless asked for, and then the report says so
    trained = json.loads((model / "model.json").read_text())["training"]["train_images"]
    held_out = evaluate(open_source(src), model, tmp_path / "r3", device="cpu", image_mpp=0.5)
    assert held_out["excluded_training_images"] == trained and not set(held_out["per_image"]) & set(trained)
    with pytest.raises(PdsegError, match="every image was used to train"):
        evaluate(open_source(src), model, tmp_path / "r3", images=trained, device="cpu", image_mpp=0.5)
    again = evaluate(open_source(src), model, tmp_path / "r3", device="cpu", image_mpp=0.5, include_training=True)
    assert any("optimistic" in n for n in again["notes"]) and again["excluded_training_images"] == []
    assert set(trained) < set(again["per_image"])
