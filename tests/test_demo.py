"""The demo's train → predict → evaluate flow, on a miniature example folder with the tiny backbone."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image
from rich.console import Console

from pdseg_qupath.tasks.demo import EXAMPLE_IMAGE, SETUP_MESSAGE, choose_demo_backbone, run_demo
from pdseg_qupath.ui import session

from _loop_data import make_image


@pytest.mark.slow
def test_demo_on_a_miniature_example(tmp_path):
    ex = tmp_path / "examples"
    png = make_image(ex, "scene", size=(80, 72), seed=4, n_nuclei=8)
    tifffile.imwrite(ex / EXAMPLE_IMAGE, np.asarray(Image.open(png)), photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # 0.5 µm/px
    shutil.move(ex / "scene.geojson", ex / "CMU-1-Small-Region.geojson")
    (ex / "validation").mkdir()
    make_image(tmp_path / "v", "scene", size=(80, 72), seed=4, n_nuclei=8)  # same scene, its polygons
    shutil.copy(tmp_path / "v" / "scene.geojson", ex / "validation" / "CMU-1-Small-Region.geojson")
    png.unlink()
    out = tmp_path / "out"
    with open(tmp_path / "log.txt", "w") as log_file, session(Console(file=log_file, width=200), plain=True) as events:
        res = run_demo(out, backbone="random:tiny", device="cpu", epochs=2, examples_dir=ex, events=events)
    assert "RANDOM WEIGHTS" in res.backbone_label
    fc = json.loads(res.geojson.read_text())
    assert fc["type"] == "FeatureCollection" and fc["features"]
    assert res.overlay is not None and res.overlay.is_file()
    assert (out / "evaluation" / "metrics.json").is_file() and res.metrics["accuracy"] is not None
    assert (out / "model" / "model.json").is_file()
    assert not (ex / "pdseg").exists(), "the demo never writes into examples/"
    log = (tmp_path / "log.txt").read_text()
    assert "backbone:" in log and "convert-backbone" in log and "QuPath project" in log
    assert "convert-backbone" in SETUP_MESSAGE


def test_demo_prefers_the_largest_installed_backbone_on_a_gpu(tmp_path, monkeypatch):
    from pdseg_qupath.backbone import spec
    from pdseg_qupath.backbone.folder import MANIFEST

    monkeypatch.setattr(spec, "SHIPPED_WEIGHTS", tmp_path)
    assert choose_demo_backbone("cuda") == "small"  # nothing installed: small (random weights, labelled)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / MANIFEST).write_text("{}")
    assert choose_demo_backbone("cuda") == "base"
    assert choose_demo_backbone("cpu") == "small"  # base does not fit the demo's CPU budget
