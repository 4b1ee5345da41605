"""Cohort prediction: inputs, outputs, summary.csv, resume, failures, kill-and-resume, worker processes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.learn.options import PredictOptions
from pdseg_qupath.learn.runtime import parse_devices
from pdseg_qupath.tasks.cohort import collect_slides, predict_cohort

from _cohort_data import tiny_model, write_pyramid


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("m") / "model")


def _summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as f:
        return {r["slide"]: r for r in csv.DictReader(f)}


def _check_outputs(out: Path) -> None:
    """Every output parses; no temp file is left behind."""
    assert not list(out.glob(".*.tmp"))
    for g in out.glob("*.geojson"):
        fc = json.loads(g.read_text())
        assert fc["type"] == "FeatureCollection"
    for p in out.glob("*.png"):
        with Image.open(p) as im:
            im.load()


def test_collect_slides_from_globs_folders_and_a_qpproj(tmp_path):
    a = write_pyramid(tmp_path / "a" / "s1.tif", seed=1)
    write_pyramid(tmp_path / "a" / "s2.tif", seed=2)
    (tmp_path / "a" / "s1.geojson").write_text("{}")  # a sidecar is not a slide
    b = write_pyramid(tmp_path / "b" / "deep" / "s3.tif", seed=3)
    jobs = collect_slides([tmp_path / "a", str(tmp_path / "b" / "**" / "*.tif"), a])
    assert [j.name for j in jobs] == ["s1.tif", "s2.tif", "s3.tif"]  # the repeated s1 is listed once
    proj = tmp_path / "proj"
    proj.mkdir()
    builder = {"builderType": "uri", "providerClassName": "x", "uri": b.as_uri(),
               "metadata": {"width": 96, "height": 80, "pixelCalibration": {
                   "pixelWidth": {"value": 0.25, "unit": "µm"}, "pixelHeight": {"value": 0.25, "unit": "µm"}}}}
    images = [{"imageName": "case 7", "entryID": 1, "serverBuilder": builder},
              {"imageName": "remote", "entryID": 2, "serverBuilder": {"builderType": "uri", "uri": "https://x/y.svs"}}]
    (proj / "project.qpproj").write_text(json.dumps({"version": "0.6.0", "images": images}))
    pj = collect_slides([proj / "project.qpproj"])
    assert [(j.name, j.mpp, j.error) for j in pj][0] == ("case 7", 0.25, None)
    assert pj[0].path == b and "not a local file" in pj[1].error
    write_pyramid(tmp_path / "c" / "s1.tif", seed=4)
    with pytest.raises(PdsegError, match="s1.tif' and '.*s1.tif' would both be written as 's1.tif'"):
        collect_slides([tmp_path / "a", tmp_path / "c"])
    with pytest.raises(PdsegError, match="no files match"):
        collect_slides([str(tmp_path / "*.svs")])
    with pytest.raises(PdsegError, match="no such slide"):
        collect_slides([tmp_path / "missing.svs"])
    assert parse_devices("0,1") == ["cuda:0", "cuda:1"] and parse_devices("cpu", workers=2) == ["cpu", "cpu"]


def test_batch_outputs_summary_failures_resume_and_force(tmp_path, model):
    slides = tmp_path / "slides"
    for i in range(2):
        write_pyramid(slides / f"s{i}.tif", w=80, h=64, seed=i, glass_right=0.4)
    (slides / "broken.svs").write_bytes(b"II*\x00 truncated")
    out = tmp_path / "out"
    opts = PredictOptions(overlay=True, classmap=True, batch_size=8)
    res = predict_cohort([slides], model, out, devices="cpu", options=opts)
    assert [r["status"] for r in res.rows] == ["failed", "ok", "ok"]
    rows = _summary(out)
    assert "broken.svs" in rows["broken.svs"]["error"]  # names the file; the run went on
    for name in ("s0.tif", "s1.tif"):
        r = rows[name]
        assert r["model_id"] == res.model_id and int(r["tiles"]) > 0
        total = float(r["Stroma_mm2"]) + float(r["Nucleus_mm2"])
        assert float(r["tissue_mm2"]) == pytest.approx(total, abs=1e-6)
        assert 0.3 * 80 * 64 * 0.25e-6 < total < 0.9 * 80 * 64 * 0.25e-6  # glass on the right is left out
        fc = json.loads((out / f"{name}.geojson").read_text())
        assert fc["features"] and fc["features"][0]["properties"]["objectType"] == "annotation"
        with Image.open(out / f"{name}.classes.png") as cm:
            labels = np.asarray(cm)
            assert cm.mode == "P" and labels.shape == (64, 80)
            assert (labels[:, -10:] == 255).all() and (labels[:, :30] < 2).all()
        assert (out / f"{name}.overlay.png").is_file()
    _check_outputs(out)

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("s?.tif.*")}
    time.sleep(0.02)
    again = predict_cohort([slides], model, out, devices="cpu", options=opts)
    assert [r["status"] for r in again.rows] == ["failed", "skipped", "skipped"]  # failures are retried
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("s?.tif.*")} == mtimes
    assert _summary(out)["s0.tif"]["status"] == "skipped" and _summary(out)["s0.tif"]["tiles"] == rows["s0.tif"]["tiles"]

    forced = predict_cohort([slides / "s0.tif"], model, out, devices="cpu",
                            options=PredictOptions(), force=True)
    assert forced.rows[0]["status"] == "ok"
    assert (out / "s0.tif.geojson").stat().st_mtime_ns > mtimes["s0.tif.geojson"]
    assert (out / "s1.tif.geojson").stat().st_mtime_ns == mtimes["s1.tif.geojson"]

    other = tiny_model(tmp_path / "other", seed=5)  # another model id: nothing counts as done
    redo = predict_cohort([slides / "s1.tif"], other, out, devices="cpu")
    assert redo.rows[0]["status"] == "ok" and _summary(out)["s1.tif"]["model_id"] == redo.model_id != res.model_id


KILLED_RUN = """
import sys
from pdseg_qupath.learn.options import PredictOptions
from pdseg_qupath.tasks.cohort import predict_cohort
predict_cohort([sys.argv[1]], sys.argv[2], sys.argv[3], devices="cpu", options=PredictOptions(classmap=True))
"""


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_finished_slides(tmp_path, model):
    slides = tmp_path / "slides"
    n = 6
    for i in range(n):
        write_pyramid(slides / f"k{i}.tif", w=160, h=144, seed=10 + i)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(slides), str(model), str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    done: dict[str, dict] = {}
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "summary.csv").exists():
                done = {k: r for k, r in _summary(out).items() if r["status"] == "ok"}
                if done:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # still running: killed midway
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 1 <= len(done) < n
    finished = {k: (out / f"{k}.geojson").stat().st_mtime_ns for k in done}
    for g in out.glob("*.geojson"):  # whatever the kill left is complete (atomic renames)
        json.loads(g.read_text())

    res = predict_cohort([slides], model, out, devices="cpu", options=PredictOptions(classmap=True))
    status = {r["slide"]: r["status"] for r in res.rows}
    assert len(status) == n and all(s in ("ok", "skipped") for s in status.values())
    assert {k for k, s in status.items() if s == "skipped"} >= set(done)
    assert {k: (out / f"{k}.geojson").stat().st_mtime_ns for k in done} == finished
    assert all(r["status"] in ("ok", "skipped") for r in _summary(out).values())
    _check_outputs(out)


@pytest.mark.slow
def test_two_worker_processes_share_the_slides(tmp_path, model):
    slides = tmp_path / "slides"
    for i in range(4):
        write_pyramid(slides / f"w{i}.tif", w=64, h=64, seed=20 + i)
    ref = predict_cohort([slides / "w0.tif"], model, tmp_path / "ref", devices="cpu")
    res = predict_cohort([slides], model, tmp_path / "out", devices="cpu", workers=2)
    assert res.engine == "processes" and res.devices == ["cpu", "cpu"]
    assert [r["status"] for r in res.rows] == ["ok"] * 4
    a = json.loads((tmp_path / "ref" / "w0.tif.geojson").read_text())["features"]
    b = json.loads((tmp_path / "out" / "w0.tif.geojson").read_text())["features"]
    assert [f["geometry"] for f in a] == [f["geometry"] for f in b]  # same result in a worker process
    assert _summary(tmp_path / "out")["w0.tif"]["tissue_mm2"] == ref.rows[0]["tissue_mm2"]
    _check_outputs(tmp_path / "out")


def test_cli_batch_mode(tmp_path, model):
    from typer.testing import CliRunner

    from pdseg_qupath.cli import app

    slides = tmp_path / "slides"
    for i in range(2):
        write_pyramid(slides / f"c{i}.tif", w=48, h=40, seed=40 + i)
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["predict", str(slides / "c*.tif"), "--model", str(model), "--out", str(out),
                                   "--devices", "cpu", "--classmap"])
    assert run.exit_code == 0, run.output
    assert "2 predicted, 0 already done, 0 failed" in " ".join(run.output.split())
    assert (out / "c1.tif.classes.png").is_file()
    again = CliRunner().invoke(app, ["predict", str(slides), "--model", str(model), "--out", str(out), "--devices", "cpu"])
    assert again.exit_code == 0 and "0 predicted, 2 already done" in " ".join(again.output.split())
    bad = CliRunner().invoke(app, ["predict", str(slides / "c0.tif"), str(slides / "c1.tif"), "--model", str(model)])
    assert isinstance(bad.exception, PdsegError) and "--out" in str(bad.exception)


def test_pixel_size_missing_or_implausible(tmp_path, model):
    slides = tmp_path / "pngs"
    slides.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 48, 3), 200 + i, np.uint8)).save(slides / f"p{i}.png")
    with pytest.raises(PdsegError, match=r"2 image\(s\) record no pixel size.*p0.png, p1.png.*--image-mpp"):
        predict_cohort([slides], model, tmp_path / "out", devices="cpu")
    # 5 µm/px typed for 0.5: each slide is skipped with the reason, not upscaled into hundreds of tiles
    res = predict_cohort([slides], model, tmp_path / "out", devices="cpu", options=PredictOptions(image_mpp=5.0))
    assert [r["status"] for r in res.rows] == ["failed", "failed"]
    assert all(r["error"].startswith("skipped: ") and "typo" in r["error"] and "upscaled 10×" in r["error"]
               for r in res.rows)
    assert res.tiles == 0
