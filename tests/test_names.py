"""Names never collide, data never mixes: clashing outputs, shared sidecars, model ids on resume, long names."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from pdseg_qupath import cli
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.names import check_unique
from pdseg_qupath.learn.options import PredictOptions
from pdseg_qupath.outputs.slide_outputs import geojson_model_id
from pdseg_qupath.sources.qupath.folder import GeoJSONFolder
from pdseg_qupath.tasks.cohort import predict_cohort
from pdseg_qupath.tasks.masks import masks
from pdseg_qupath.tasks.predict import predict

from _cohort_data import tiny_model, write_pyramid
from _loop_data import make_image


def _twin(folder: Path, src: str, name: str, sidecar: bool = True) -> None:
    """A copy of image ``src`` named ``name`` (same pixels, any extension PIL writes), with its own sidecar."""
    with Image.open(folder / src) as im:
        im.save(folder / name)
    if sidecar:
        shutil.copy(folder / (Path(src).stem + ".geojson"), folder / f"{name}.geojson")


def test_check_unique_names_both_inputs() -> None:
    check_unique([("a.svs", "a.svs"), ("a.svs", "a.svs"), ("b", "b")])  # one input listed twice: fine
    with pytest.raises(PdsegError, match=r"'x:y.png' and 'x_y.png' would both be written as 'x_y.png'"):
        check_unique([("x:y.png", "x_y.png"), ("x_y.png", "x_y.png")])
    with pytest.raises(PdsegError, match="'A.png' and 'a.png'"):  # case-insensitive file systems
        check_unique([("A.png", "A.png"), ("a.png", "a.png")])


@pytest.mark.parametrize("first,second", [("a.png", "a.tif"), ("x:y.png", "xy.png")])
def test_masks_refuse_two_images_with_one_output_name(tmp_path: Path, first: str, second: str) -> None:
    root = tmp_path / "images"
    make_image(root, "seed", size=(48, 48))
    _twin(root, "seed.png", first)
    _twin(root, "seed.png", second)
    (root / "seed.png").unlink()
    (root / "seed.geojson").unlink()
    with pytest.raises(PdsegError, match=rf"'{first}' and '{second}' would both be written"):
        masks(GeoJSONFolder(root), tmp_path / "out", mpp=0.5, image_mpp=0.5)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))


def test_a_sidecar_two_images_could_own_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "images"
    make_image(root, "a", size=(48, 48))  # a.png + a.geojson
    _twin(root, "a.png", "a.tif", sidecar=False)
    recs = {r.name: r for r in GeoJSONFolder(root).images()}
    for name in ("a.png", "a.tif"):
        assert "a.geojson: could hold the annotations of a.png and a.tif" in recs[name].error
    shutil.copy(root / "a.geojson", root / "a.tif.geojson")  # now each image has its own
    recs = {r.name: r for r in GeoJSONFolder(root).images()}
    assert recs["a.png"].error is None and recs["a.tif"].error is None


def test_folder_predictions_of_a_svs_and_a_svs_tif_go_to_two_files(tmp_path: Path) -> None:
    from pdseg_qupath.sources.base import ImageRecord

    src = GeoJSONFolder(tmp_path)
    paths = {src.predictions_path(ImageRecord(name=n, uri=f"file:///{n}")) for n in ("a.svs", "a.svs.tif")}
    assert {p.name for p in paths} == {"a.svs.geojson", "a.svs.tif.geojson"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("m") / "model")


def test_folder_write_back_refuses_names_that_meet_before_any_work(tmp_path: Path, model: Path) -> None:
    root = tmp_path / "images"
    make_image(root, "seed", size=(48, 48))
    _twin(root, "seed.png", "p:q.png")
    _twin(root, "seed.png", "p_q.png")
    with pytest.raises(PdsegError, match=r"'p:q.png' and 'p_q.png' would both be written"):
        predict(GeoJSONFolder(root), model, device="cpu", options=PredictOptions(image_mpp=0.5))
    assert not (root / "pdseg").exists()
    with pytest.raises(PdsegError, match=r"'p:q.png' and 'p_q.png'"):  # --write-back --out DIR
        predict(GeoJSONFolder(root), model, device="cpu", out_dir=tmp_path / "out",
                options=PredictOptions(image_mpp=0.5))


def test_resume_checks_the_model_id_inside_the_geojson(tmp_path: Path, model: Path) -> None:
    slide = write_pyramid(tmp_path / "slides" / "s.tif", w=64, h=48)
    out = tmp_path / "out"
    first = predict_cohort([slide], model, out, devices="cpu")
    assert geojson_model_id(out / "s.tif.geojson") == first.model_id
    # A crash between another model's GeoJSON write and its summary row: the file holds M2's objects,
    # summary.csv still says M1 did the slide.
    other = tiny_model(tmp_path / "m2", seed=7)
    fc = json.loads((out / "s.tif.geojson").read_text())
    fc["pdseg"]["model_id"] = "m2-" + first.model_id
    (out / "s.tif.geojson").write_text(json.dumps(fc))
    again = predict_cohort([slide], model, out, devices="cpu")
    assert again.rows[0]["status"] == "ok"  # redone, not skipped
    assert geojson_model_id(out / "s.tif.geojson") == first.model_id
    assert other.is_dir()


def test_long_names_checked_before_the_work(tmp_path: Path, model: Path) -> None:
    name = "n" * 240 + ".tif"  # 244 characters: a legal file name
    slide = write_pyramid(tmp_path / "slides" / name, w=64, h=48)
    with pytest.raises(PdsegError, match=r"output file name would be 256 bytes"):
        predict_cohort([slide], tmp_path / "no-model-needed", tmp_path / "out", devices="cpu",
                       options=PredictOptions(overlay=True))
    res = predict_cohort([slide], model, tmp_path / "out", devices="cpu")  # GeoJSON only: 252 bytes fits
    assert res.rows[0]["status"] == "ok" and (tmp_path / "out" / f"{name}.geojson").is_file()


def test_failed_write_back_exits_non_zero_with_a_summary(tmp_path: Path, model: Path, capsys) -> None:
    root = tmp_path / "images"
    make_image(root, "a", size=(48, 48))
    (root / "pdseg").mkdir()
    (root / "pdseg" / "predictions").write_text("a file where pdseg wants a folder")
    old = sys.argv
    sys.argv = ["pdseg-qupath", "predict", str(root), "--model", str(model), "--device", "cpu", "--image-mpp", "0.5"]
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main()
    finally:
        sys.argv = old
    text = capsys.readouterr()
    assert exc.value.code == 1
    assert "a.png: write-back failed" in text.err and "1 of 1 image(s) failed" in text.err


PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]])
print(child.pid, flush=True)
time.sleep(120)
"""
CHILD = """
import pathlib, sys, time
from pdseg_qupath.core.lifeline import die_with_parent
die_with_parent(int(sys.argv[1]), poll_s=0.2)
pathlib.Path(sys.argv[2]).write_text("armed")
time.sleep(120)
pathlib.Path(sys.argv[2]).write_text("outlived its parent")
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_dies_with_its_coordinator(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(marker)], stdout=subprocess.PIPE,
                              text=True, env=env)
    child = int(parent.stdout.readline())
    try:
        deadline = time.time() + 60
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert marker.read_text() == "armed"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 5
        while _alive(child) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


COORDINATOR = """
import sys
from pdseg_qupath.tasks.cohort import predict_cohort
predict_cohort([sys.argv[1]], sys.argv[2], sys.argv[3], devices="cpu", workers=2)
"""


def _children(pid: int) -> list[int]:
    """Worker processes of ``pid`` (spawned by multiprocessing; its resource tracker left out)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"resource_tracker" not in cmd:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_batch_workers_stop_when_the_coordinator_is_killed(tmp_path: Path, model: Path) -> None:
    """kill -9 of the coordinator as soon as its two workers exist: they must go away without predicting
    a slide (before the fix they loaded the model, predicted and wrote every slide, unlocked)."""
    import os
    import signal
    import subprocess
    import time

    slides = tmp_path / "slides"
    for i in range(4):
        write_pyramid(slides / f"w{i}.tif", w=96, h=80, seed=30 + i)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen([sys.executable, "-c", COORDINATOR, str(slides), str(model), str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and len(workers) < 2:
            workers = _children(proc.pid)
            time.sleep(0.02)
        assert proc.poll() is None and len(workers) == 2, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 60
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers)
        assert not list(out.glob("*.geojson"))  # nothing predicted or written once the coordinator was gone
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def test_given_names_split_at_commas_unless_the_whole_value_is_a_name() -> None:
    from pdseg_qupath.core.names import given_names

    known = ["a.svs", "b.svs", "Patient 3, block A.svs"]
    assert given_names(None, known) is None
    assert given_names(["a.svs,b.svs"], known) == ["a.svs", "b.svs"]
    assert given_names(["b.svs", "a.svs", "b.svs"], known) == ["b.svs", "a.svs"]  # order kept, repeats dropped
    assert given_names(["Patient 3, block A.svs", " a.svs "], known) == ["Patient 3, block A.svs", "a.svs"]
    assert given_names(["Patient 3, x.svs"], known) == ["Patient 3", "x.svs"]  # unknown: left to the caller
