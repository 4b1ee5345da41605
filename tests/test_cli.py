"""The CLI as a user runs it: real commands in a subprocess-free runner, clear errors, exit codes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pdseg_qupath import cli

FIX = Path(__file__).parent / "fixtures"


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the console entry point exactly as the installed script does."""
    old = sys.argv
    sys.argv = ["pdseg-qupath", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def gbm_folder(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    shutil.copy(FIX / "gbm40" / "01.png", d / "01.png")
    shutil.copy(FIX / "gbm40" / "01.geojson", d / "01.geojson")
    return d


def test_masks_writes_labels_and_classes(gbm_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "masks"
    code, text = run(["masks", str(gbm_folder), "--mpp", "1.0", "--image-mpp", "0.5", "--out", str(out), "--overlay"], capsys)
    assert code == 0, text
    classes = json.loads((out / "classes.json").read_text())
    assert [c["name"] for c in classes["classes"]] == ["Background", "Nucleus"]
    assert classes["ignore"] == 255 and classes["mpp"] == 1.0
    labels = np.array(Image.open(out / "01.png"))
    assert labels.shape == (256, 256)  # 512 px at 0.5 µm/px → 256 px at 1 µm/px
    assert set(np.unique(labels)) <= {0, 1}
    assert 0.1 < (labels == 1).mean() < 0.5
    assert (out / "overlays" / "01.png").exists()
    assert "Nucleus" in text and "ok" in text


def test_masks_class_order_follows_classes_option(gbm_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "masks"
    code, text = run(["masks", str(gbm_folder), "--mpp", "0.5", "--image-mpp", "0.5", "--out", str(out),
                      "--classes", "Nucleus,Background"], capsys)
    assert code == 0, text
    labels = np.array(Image.open(out / "01.png"))
    assert (labels == 0).mean() < (labels == 1).mean()  # nuclei are now class 0, the minority


def test_unknown_class_is_a_clear_error(gbm_folder: Path, tmp_path: Path, capsys) -> None:
    code, text = run(["masks", str(gbm_folder), "--mpp", "0.5", "--image-mpp", "0.5", "--out", str(tmp_path / "m"),
                      "--classes", "Tumor"], capsys)
    assert code == 2
    assert "Tumor" in text and "Traceback" not in text


@pytest.mark.parametrize("command", [
    ["masks", "--mpp", "0.5", "--out", "m"],
    ["train", "--out", "model", "--backbone", "random:tiny"],
    ["predict", "--model", "no-model"],
    ["evaluate", "--model", "no-model", "--report", "r"],
])
def test_missing_pixel_size_is_one_clear_line_in_every_command(gbm_folder: Path, tmp_path: Path, capsys,
                                                              command: list[str]) -> None:
    args = [a if a not in ("m", "model", "r") else str(tmp_path / a) for a in command]
    code, text = run([args[0], str(gbm_folder), *args[1:]], capsys)
    assert code == 2, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--image-mpp" in lines[0] and "01.png" in lines[0], text


def test_ctrl_c_says_what_was_saved_and_how_to_continue(gbm_folder: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("pdseg_qupath.tasks.train.train", interrupted)
    code, text = run(["train", str(gbm_folder), "--out", str(tmp_path / "model"), "--image-mpp", "0.5"], capsys)
    assert code == 130
    assert "interrupted (Ctrl-C)" in text and ".pdseg-train" in text and "run the same command again" in text


def test_first_hour_stumbles_get_a_clear_line(gbm_folder: Path, tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text("{}")
    code, text = run(["train", str(gbm_folder), "--out", str(model)], capsys)
    assert code == 2 and "--force" in text and "already holds a trained model" in text
    code, text = run(["predict", str(gbm_folder / "01.png"), "--model", str(model)], capsys)
    assert code == 2 and "give --out DIR" in text
    (tmp_path / "empty").mkdir()
    code, text = run(["predict", str(tmp_path / "empty"), "--model", str(model)], capsys)
    assert code == 2 and "no images to predict" in text
    code, text = run(["predict", "--help"], capsys)
    assert code == 0 and "<bool>" not in text and "µm²" in text and "--review" in text
    code, text = run(["train", "--help"], capsys)
    assert "--timesteps" in text and "--t " in text.replace(",", " ")


def test_broken_geojson_names_file_and_line(gbm_folder: Path, tmp_path: Path, capsys) -> None:
    (gbm_folder / "01.geojson").write_text('{"type": "FeatureCollection",\n "features": [ {,] }')
    code, text = run(["masks", str(gbm_folder), "--mpp", "0.5", "--image-mpp", "0.5", "--out", str(tmp_path / "m")], capsys)
    assert code != 0
    assert "01.geojson" in text and "line 2" in text and "Traceback" not in text


def test_missing_source_is_a_clear_error(tmp_path: Path, capsys) -> None:
    code, text = run(["masks", str(tmp_path / "nope"), "--mpp", "0.5", "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "no such project or folder" in text


def test_atomic_writes_keep_ordinary_permissions_and_old_file_on_failure(tmp_path: Path) -> None:
    """Outputs must be readable by colleagues (not mkstemp's 0600), and a failed write keeps the old file."""
    import os
    import stat

    from pdseg_qupath.core.errors import PdsegError
    from pdseg_qupath.core.fileio import atomic_write_text, atomic_write_with

    target = tmp_path / "a.json"
    old = os.umask(0o022)
    try:
        atomic_write_text(target, "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644

    def boom(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(PdsegError, match="old file is unchanged"):
        atomic_write_with(target, boom)
    assert target.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_train_options_reach_the_model_folder(gbm_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "model"
    code, text = run(["train", str(gbm_folder), "--out", str(out), "--backbone", "random:tiny", "--image-mpp", "0.5",
                      "--epochs", "1", "--tiles-per-class", "4", "--t", "10,50", "--blocks", "0",
                      "--class-weights", "balanced"], capsys)
    assert code == 0, text
    assert "RANDOM WEIGHTS" in text
    assert "3 context heads with texture maps" in " ".join(text.split())  # the default head says what it has
    record = json.loads((out / "model.json").read_text())
    assert record["features"]["t"] == [10, 50] and record["features"]["blocks"] == [0]
    assert record["head"]["kind"] == "context" and record["head"]["texture"] is True
    code, text = run(["train", str(gbm_folder), "--out", str(tmp_path / "m2"), "--backbone", "random:tiny",
                      "--class-weights", "heavy"], capsys)
    assert code == 2 and "--class-weights" in text
    code, text = run(["train", str(gbm_folder), "--out", str(tmp_path / "m3"), "--backbone", "random:tiny",
                      "--image-mpp", "0.5", "--head", "pixel", "--texture"], capsys)
    assert code == 2 and "--texture needs the context head" in " ".join(text.split())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from _loop_data import make_folder, train_tiny

    src = make_folder(tmp_path_factory.mktemp("src"), n=2, size=(48, 48))
    return train_tiny(src, tmp_path_factory.mktemp("run") / "model", epochs=1).model_dir


def test_predict_says_where_it_wrote(tiny_model: Path, tmp_path: Path, capsys) -> None:
    from _loop_data import make_folder

    src = make_folder(tmp_path / "src", n=2, size=(48, 48))
    model = tiny_model
    code, text = run(["predict", str(src), "--model", str(model), "--image-mpp", "0.5", "--review", "1",
                      "--review-size", "8"], capsys)
    assert code == 0, text
    flat = " ".join(text.split())
    assert "object(s) written to" in flat and "pdseg/predictions/" in flat and "areas per class:" in flat
    written = json.loads((src / "pdseg" / "predictions" / "img0.png.geojson").read_text())["features"]
    assert any(f["properties"].get("classification", {}).get("name") == "Review*" for f in written)


def test_list_options_are_repeatable_and_names_with_commas_are_taken_whole(tiny_model: Path, tmp_path: Path,
                                                                           capsys) -> None:
    from shapely.geometry import box

    from _loop_data import _feature, make_folder, make_image

    src = make_folder(tmp_path / "src", n=2, size=(48, 48))
    model = tiny_model
    make_image(src, "Patient 3, block A", size=(48, 48), seed=5,
               extra_features=[_feature(box(2, 2, 20, 20), "Necrosis, early", (90, 10, 10))])
    predictions = src / "pdseg" / "predictions"

    def predicted(*args: str) -> list[str]:
        shutil.rmtree(predictions, ignore_errors=True)
        code, text = run(["predict", str(src), "--model", str(model), "--image-mpp", "0.5", *args], capsys)
        assert code == 0, text
        return sorted(p.name for p in predictions.glob("*.geojson"))

    # the name with a comma, alone or beside another --images; the older comma-separated form still works
    assert predicted("--images", "Patient 3, block A.png") == ["Patient 3, block A.png.geojson"]
    assert predicted("--images", "Patient 3, block A.png", "--images", "img1.png") == [
        "Patient 3, block A.png.geojson", "img1.png.geojson"]
    assert predicted("--images", "img0.png,img1.png") == ["img0.png.geojson", "img1.png.geojson"]
    code, text = run(["predict", str(src), "--model", str(model), "--image-mpp", "0.5", "--images", "Patient 3"],
                     capsys)
    assert code == 2 and "Patient 3" in text and "Patient 3, block A.png" in text  # the known names are listed

    # a class name with a comma, in label order with a repeated --classes
    out = tmp_path / "masks"
    code, text = run(["masks", str(src), "--mpp", "0.5", "--image-mpp", "0.5", "--out", str(out),
                      "--classes", "Necrosis, early", "--classes", "Nucleus,Background"], capsys)
    assert code == 0, text
    classes = json.loads((out / "classes.json").read_text())
    assert [c["name"] for c in classes["classes"]] == ["Necrosis, early", "Nucleus", "Background"]


def test_number_lists_take_commas_and_repeats_alike() -> None:
    assert cli._int_list_or_auto(["10", "50"], "--t") == cli._int_list_or_auto("10,50", "--t") == [10, 50]
    assert cli._int_list_or_auto(["1,2", "3"], "--blocks") == [1, 2, 3]
    assert cli._int_list_or_auto(["auto"], "--t") == "auto" and cli._int_list(None, "--t") is None
    assert cli._class_weights_option(["1", "2.5"]) == cli._class_weights_option(["1,2.5"]) == [1.0, 2.5]
    assert cli._class_weights_option(["balanced"]) == "balanced"
    with pytest.raises(cli.PdsegError, match="--t 1,x: expected whole numbers"):
        cli._int_list_or_auto(["1", "x"], "--t")


def test_a_silent_phase_gets_keep_alive_lines_in_a_log(tiny_model: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """Output that is not a terminal (capsys, as nohup or SLURM): a slow tissue detection is named while it runs."""
    import time

    from _loop_data import make_folder

    from pdseg_qupath import ui
    from pdseg_qupath.core.tissue import TissueMap

    detect = TissueMap.detect

    def slow_detect(cls, *args, **kwargs):
        time.sleep(1.0)  # a whole slide's tissue detection, shortened
        return detect(*args, **kwargs)

    monkeypatch.setattr(TissueMap, "detect", classmethod(slow_detect))
    monkeypatch.setattr(ui, "PLAIN_EVERY", 0.2)  # 0.2 s of silence instead of 10 s
    src = make_folder(tmp_path / "src", n=1, size=(48, 48))
    code, text = run(["predict", str(src), "--model", str(tiny_model), "--image-mpp", "0.5"], capsys)
    assert code == 0, text
    lines = text.splitlines()
    alive = [i for i, line in enumerate(lines) if line.startswith("predict (img0.png · detecting tissue): running, ")]
    assert len(alive) >= 2, text
    done = next(i for i, line in enumerate(lines) if line.startswith("predict (img0.png): ") and "- done" in line)
    assert alive[-1] < done and not any("running" in line for line in lines[done:])
