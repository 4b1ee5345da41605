"""Plots, overlays, tables and CSV that people read."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from rich.console import Console

from pdseg_qupath.core.annotations import ClassInfo, ClassMap
from pdseg_qupath.learn.inference import AreaRow, LabelCanvas
from pdseg_qupath.outputs.overlay import render_overlay
from pdseg_qupath.outputs.plots import write_confusion_png, write_training_curve
from pdseg_qupath.outputs.tables import write_areas_csv
from pdseg_qupath.ui import EpochTable, areas_table

CMAP = ClassMap((ClassInfo("Tumor", (200, 0, 0)), ClassInfo("Stroma", (0, 160, 0))))


def _row(e):
    return {"epoch": e, "loss": 1 / e, "val_loss": 1.2 / e, "accuracy": 0.5, "miou": 0.4 + e / 100,
            "macro_dice": 0.5, "per_class": {"Tumor": {"dice": 0.6, "iou": 0.4}, "Stroma": {"dice": None, "iou": None}}}


def test_training_curve_and_confusion_pngs(tmp_path):
    p = write_training_curve([_row(e) for e in range(1, 6)], tmp_path / "curve.png", CMAP.names, best_epoch=3)
    assert Image.open(p).size[0] > 300
    c = write_confusion_png(np.array([[10, 2], [0, 5]]), CMAP.names, tmp_path / "conf.png")
    assert Image.open(c).format == "PNG"


def test_epoch_table_prints_rows():
    buf = io.StringIO()
    t = EpochTable(CMAP.names, Console(file=buf, width=200))
    t.add(_row(1))
    t.add(_row(2))
    text = buf.getvalue()
    assert text.count("epoch") == 1 and "0.60/0.40" in text and "—/—" in text


def test_overlay_canvas_downsamples_strips_and_renders(tmp_path):
    canvas = LabelCanvas(5000, 1000, max_size=1000)
    assert canvas.scale == 5 and (canvas.ow, canvas.oh) == (1000, 200)
    labels = np.zeros((600, 5000), dtype=np.uint8)
    labels[:, 2500:] = 1
    canvas.add_strip(0, labels)
    canvas.add_strip(600, np.full((400, 5000), 255, dtype=np.uint8))
    assert (canvas.labels[:120, :500] == 0).all() and (canvas.labels[:120, 500:] == 1).all()
    assert (canvas.labels[120:] == 255).all()
    bg = np.full((200, 1000, 3), 240, dtype=np.uint8)
    out = np.asarray(Image.open(render_overlay(bg, canvas.labels, CMAP, tmp_path / "o.png", title="slide")))
    assert out.shape == (200, 1000, 3)
    assert tuple(out[100, 499]) == (200, 0, 0)  # outline in the class colour
    assert tuple(out[150, 300]) == (240, 240, 240)  # unpredicted rows: tissue untouched


def test_render_overlay_checks_shapes(tmp_path):
    import pytest

    with pytest.raises(ValueError):
        render_overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4), np.uint8), CMAP, tmp_path / "x.png")


def test_areas_csv_and_table(tmp_path):
    rows = [AreaRow("a.svs", "Tumor", 1.25, 3, 0.91), AreaRow("a.svs", "Stroma", 0.0, 0, None)]
    p = write_areas_csv(rows, tmp_path / "areas.csv")
    assert p.read_text().splitlines() == [
        "image,class,area_mm2,objects,mean_probability", "a.svs,Tumor,1.250000,3,0.9100", "a.svs,Stroma,0.000000,0,"]
    buf = io.StringIO()
    Console(file=buf, width=120).print(areas_table(rows))
    assert "1.2500" in buf.getvalue()
