"""The model folder: round trip, and a clear error for every way it can be broken."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pdseg_qupath.core.annotations import ClassInfo, ClassMap
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.learn.head import FCNHead, HeadConfig
from pdseg_qupath.learn.modelio import SegModel, load_model, save_model
from pdseg_qupath.learn.options import IOConfig


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    head = FCNHead(HeadConfig(in_channels=8, n_classes=2, hidden=(8, 4)))
    cmap = ClassMap((ClassInfo("Tumor", (200, 0, 0)), ClassInfo("Stroma", (150, 200, 150))))
    model = SegModel(head, cmap, IOConfig(0.5, 256, 64),
                     backbone={"spec": "random:tiny", "sha256": None, "random_weights": True, "label": "x"},
                     features={"t": [50], "blocks": [0, 1], "channels": 8, "out_stride": 4},
                     training={"seed": 0})
    return save_model(model, tmp_path / "model"), head


def test_round_trip(saved):
    path, head = saved
    m = load_model(path)
    assert m.class_map.names == ["Tumor", "Stroma"] and m.class_map.classes[0].color == (200, 0, 0)
    assert (m.io.mpp, m.io.tile, m.io.overlap, m.io.stride) == (0.5, 256, 64, 4)
    assert m.features["blocks"] == [0, 1] and m.training == {"seed": 0}
    x = torch.randn(1, 8, 3, 3)
    head.eval()
    assert torch.equal(m.head(x), head(x))
    assert len(m.model_id) == 12
    meta = json.loads((path / "model.json").read_text())
    assert meta["pdseg_version"] and meta["head"]["hidden"] == [8, 4]


def test_missing_folder(tmp_path):
    with pytest.raises(PdsegError, match="no such model folder"):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize("damage, match", [
    (lambda p: (p / "model.json").unlink(), "model.json: missing"),
    (lambda p: (p / "head.safetensors").unlink(), "head.safetensors: missing"),
    (lambda p: (p / "model.json").write_text((p / "model.json").read_text()[:200]), r"model.json: not valid JSON \(line"),
    (lambda p: (p / "head.safetensors").write_bytes((p / "head.safetensors").read_bytes()[:100]),
     "head.safetensors: its sha256 does not match"),
    (lambda p: (p / "model.json").write_text('{"format": "something-else"}'), "not a pdseg model"),
])
def test_broken_folder_names_the_file(saved, damage, match):
    path, _ = saved
    damage(path)
    with pytest.raises(PdsegError, match=match):
        load_model(path)


def test_weights_that_do_not_fit_the_config(saved):
    path, _ = saved
    meta = json.loads((path / "model.json").read_text())
    meta["head"]["hidden"] = [16, 4]
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PdsegError, match="do not fit"):
        load_model(path)


def test_resave_replaces_atomically(saved, tmp_path):
    path, head = saved
    m = load_model(path)
    save_model(m, path)
    assert sorted(p.name for p in path.iterdir()) == ["head.safetensors", "model.json"]
    shutil.rmtree(path)
