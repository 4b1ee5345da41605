"""BCSS and GlaS readers: published layouts, class merge, exact mask round trip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.grid import Window
from pdseg_qupath.sources.datasets import BCSS_NOTE, open_bcss, open_dataset, open_glas

from _helpers import rasterize


def _bcss(root, name, codes):
    (root / "rgbs_colorNormalized").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    h, w = codes.shape
    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(root / "rgbs_colorNormalized" / name)
    Image.fromarray(codes.astype(np.uint8)).save(root / "masks" / name)


def test_bcss_merge_and_round_trip(tmp_path):
    codes = np.zeros((20, 30), dtype=np.uint8)
    codes[2:10, 2:12] = 1  # tumor
    codes[2:10, 12:20] = 20  # dcis -> Tumor
    codes[10:18, 2:12] = 10  # plasma cells -> Inflammatory
    codes[10:18, 12:20] = 9  # fat -> Other
    codes[:, 22:] = 7  # exclude -> ignored
    codes[5, 25] = 2  # stroma
    _bcss(tmp_path, "TCGA-A1-A0SK-DX1_xmin1_ymin2_MPP-0.2500.png", codes)
    _bcss(tmp_path, "TCGA-OL-A5D6-DX1_xmin1_ymin2_MPP-0.2500.png", codes)
    ds = open_bcss(tmp_path)
    recs = ds.images()
    assert [r.mpp for r in recs] == [0.25, 0.25] and recs[0].width == 30
    anns, _ = ds.read_annotations(recs[0])
    assert sorted(a.classification for a in anns) == ["Inflammatory", "Other", "Stroma", "Tumor"]
    back = rasterize(anns, ds.class_map, Window(0, 0, 30, 20, 1.0))
    assert np.array_equal(back, ds.labels(recs[0]))
    assert (back[:, 22:][codes[:, 22:] == 7] == 255).all() and (back[0] == 255).all()
    assert back[5, 25] == 1 and back[3, 15] == 0 and back[12, 5] == 2 and back[12, 15] == 4
    assert "dcis" in BCSS_NOTE and ds.notes == [BCSS_NOTE]
    assert [r.name[:7] for r in open_bcss(tmp_path, sites=["OL"], exclude_sites=True).images()] == ["TCGA-A1"]
    with pytest.raises(PdsegError, match="read-only"):
        ds.write_predictions(recs[0], [])


def test_glas_splits_and_binary_classes(tmp_path):
    for stem in ("train_1", "testA_1", "testB_2"):
        Image.fromarray(np.full((12, 16, 3), 180, np.uint8)).save(tmp_path / f"{stem}.bmp")
        inst = np.zeros((12, 16), np.uint8)
        inst[2:6, 2:6], inst[7:10, 8:14] = 1, 2
        Image.fromarray(inst).save(tmp_path / f"{stem}_anno.bmp")
    ds = open_glas(tmp_path, split="test")
    assert [r.name for r in ds.images()] == ["testA_1.bmp", "testB_2.bmp"]
    rec = ds.images()[0]
    assert rec.mpp == 0.62
    anns, _ = ds.read_annotations(rec)
    back = rasterize(anns, ds.class_map, Window(0, 0, 16, 12, 1.0))
    assert (back == 1).sum() == 16 + 18 and (back == 0).sum() == 12 * 16 - 34
    assert len(open_dataset("glas", tmp_path, split="train").images()) == 1
    with pytest.raises(PdsegError, match="split"):
        open_glas(tmp_path, split="val")
    with pytest.raises(PdsegError, match="bcss"):
        open_dataset("camelyon", tmp_path)
    with pytest.raises(PdsegError, match="BCSS layout"):
        open_bcss(tmp_path)


def test_train_and_evaluate_on_a_dataset_folder(tmp_path, capsys):
    """``train --dataset glas`` / ``--dataset bcss``: the published layout, at the data set's own µm/px."""
    import json

    from test_cli import run

    rng = np.random.default_rng(0)
    for stem in ("train_1", "train_2", "testA_1"):
        img = np.full((64, 64, 3), (236, 170, 200), np.uint8)
        inst = np.zeros((64, 64), np.uint8)
        inst[8:30, 10:40], inst[40:58, 20:50] = 1, 2
        img[inst > 0] = (90, 50, 140)
        Image.fromarray((img + rng.integers(0, 8, img.shape)).astype(np.uint8)).save(tmp_path / f"{stem}.bmp")
        Image.fromarray(inst).save(tmp_path / f"{stem}_anno.bmp")
    code, text = run(["train", str(tmp_path), "--dataset", "glas", "--out", str(tmp_path / "m"), "--backbone",
                      "random:tiny", "--epochs", "1", "--tiles-per-class", "3", "--device", "cpu"], capsys)
    assert code == 0, text
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["mpp"] == 0.62 and [c["name"] for c in meta["class_map"]["classes"]] == ["Background", "Gland"]
    assert set(meta["training"]["train_images"] + meta["training"]["val_images"]) == {"train_1.bmp", "train_2.bmp"}
    code, text = run(["evaluate", str(tmp_path), "--dataset", "glas", "--model", str(tmp_path / "m"), "--report",
                      str(tmp_path / "r"), "--device", "cpu"], capsys)
    assert code == 0, text
    assert list(json.loads((tmp_path / "r" / "metrics.json").read_text())["per_image"]) == ["testA_1.bmp"]

    bcss = tmp_path / "bcss"
    codes = np.ones((48, 48), np.uint8)  # tumor
    codes[:, 24:] = 2  # stroma
    codes[:4] = 0  # outside the ROI: ignored
    for name in ("TCGA-A1-A0SK-DX1_xmin1_ymin2_MPP-0.5000.png", "TCGA-OL-A5D6-DX1_xmin1_ymin2_MPP-0.5000.png"):
        _bcss(bcss, name, codes)
    code, text = run(["train", str(bcss), "--dataset", "bcss", "--out", str(tmp_path / "b"), "--backbone",
                      "random:tiny", "--epochs", "1", "--tiles-per-class", "3", "--device", "cpu"], capsys)
    assert code == 0, text
    meta = json.loads((tmp_path / "b" / "model.json").read_text())
    assert meta["mpp"] == 0.5 and [c["name"] for c in meta["class_map"]["classes"]] == ["Stroma", "Tumor"]
    code, text = run(["train", str(bcss), "--dataset", "glas", "--out", str(tmp_path / "x")], capsys)
    assert code != 0 and "no GlaS images" in text
