"""Every bad input gets a clear error, never a traceback or a hang: GeoJSON, images, pixel sizes, options,
model files, non-finite training, damaged QuPath data, annotations off the image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from test_cli import run  # the console entry point, as the installed script runs it
from test_project_nojvm import fake_paquo, project  # noqa: F401 - fixtures

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.slide import check_mpp, open_slide, probe
from pdseg_qupath.learn.modelio import META_FILE, load_model
from pdseg_qupath.learn.options import IOConfig, PredictOptions, TrainOptions
from pdseg_qupath.sources.qupath.geojson import parse_geojson, read_geojson

from _cohort_data import tiny_model
from _loop_data import feature, make_image, train_tiny

SQUARE = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]


def _fc(*features) -> dict:
    return {"type": "FeatureCollection", "features": list(features)}


def _feat(geometry, **props) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": {"objectType": "annotation", **props}}


# ------------------------------------------------------------------------------------------------- GeoJSON

@pytest.mark.parametrize("kind", [["FeatureCollection"], {"a": 1}])
def test_top_level_type_that_is_not_a_name(kind) -> None:
    with pytest.raises(PdsegError, match=r"doc\.geojson: the top-level \"type\" is"):
        parse_geojson({"type": kind, "features": []}, "doc.geojson")


@pytest.mark.parametrize("kind", [["Polygon"], {"x": "Polygon"}])
def test_geometry_type_that_is_not_a_name_skips_the_feature(kind) -> None:
    doc = _fc(_feat({"type": kind, "coordinates": [SQUARE]}), _feat({"type": "Polygon", "coordinates": [SQUARE]}))
    objs, rep = parse_geojson(doc, "d.geojson")
    assert len(objs) == 1 and rep.skipped_other == 1
    assert any("d.geojson: feature 1" in m and "geometry \"type\"" in m for m in rep.messages)


def test_huge_integers_in_coordinates_and_measurements() -> None:
    huge = int("9" * 400)
    bad = _feat({"type": "Polygon", "coordinates": [[[0, 0], [huge, 0], [10, 10], [0, 0]]]})
    ok = _feat({"type": "Polygon", "coordinates": [SQUARE]}, measurements={"big": huge, "fine": 2})
    objs, rep = parse_geojson(_fc(bad, ok), "d.geojson")
    assert len(objs) == 1 and objs[0].measurements == {"fine": 2.0}
    assert any("feature 1" in m and "integer of 400 digits" in m for m in rep.messages)
    assert any("feature 2" in m and "measurement" in m for m in rep.messages)


def test_integers_beyond_pythons_limit(tmp_path: Path) -> None:
    p = tmp_path / "big.geojson"
    p.write_text('{"type": "FeatureCollection", "features": [' + "1" * 5000 + "]}")
    with pytest.raises(PdsegError, match=r"big\.geojson: unreadable JSON"):
        read_geojson(p)


def test_subnormal_coordinates_in_an_invalid_polygon() -> None:
    ring = [[0, 10], [0, 1], [1, 1e-44], [1, 1], [1e-300, -1e-44], [1e-44, 1e-300], [0, 10]]  # GEOS asserted
    objs, rep = parse_geojson(_fc(_feat({"type": "Polygon", "coordinates": [ring]}, name="tiny")), "d.geojson")
    assert len(objs) + rep.skipped == 1  # read (repaired) or skipped, with a message: never a GEOS exception
    assert all("d.geojson" in m for m in rep.messages)


def test_coordinates_beyond_any_slide_are_skipped() -> None:
    far = [[0, 0], [1e300, 0], [1e300, 1e300], [0, 0]]
    objs, rep = parse_geojson(_fc(_feat({"type": "Polygon", "coordinates": [far]})), "d.geojson")
    assert objs == [] and "beyond" in rep.messages[0] and "feature 1" in rep.messages[0]


def test_tangled_polygon_is_skipped_and_reported_instead_of_repaired_for_minutes() -> None:
    rng = np.random.default_rng(0)
    ring = rng.uniform(0, 1000, (400, 2)).tolist()
    ring.append(ring[0])
    simple = [[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]]  # a bow-tie: one crossing, still repaired
    objs, rep = parse_geojson(_fc(_feat({"type": "Polygon", "coordinates": [ring]}, name="scribble"),
                                  _feat({"type": "Polygon", "coordinates": [simple]}, name="bowtie")), "d.geojson")
    assert [a.name for a in objs] == ["bowtie"] and rep.repaired == 1
    assert any('name "scribble"' in m and "too tangled" in m for m in rep.messages)


# -------------------------------------------------------------------------------------- images, pixel sizes

def test_decompression_bomb_guard_names_the_variable(tmp_path: Path, monkeypatch) -> None:
    p = tmp_path / "bomb.png"
    Image.new("RGB", (2000, 1000), "white").save(p)  # a few kB that decode to 6 MB
    monkeypatch.setenv("PDSEG_MAX_IMAGE_PIXELS", "1000000")
    for call in (lambda: open_slide(p, fallback_mpp=0.5), lambda: probe(p)):
        with pytest.raises(PdsegError, match=r"bomb\.png: image is 2000 × 1000 px.*PDSEG_MAX_IMAGE_PIXELS=<pixels>"):
            call()
    monkeypatch.setenv("PDSEG_MAX_IMAGE_PIXELS", "3000000")
    with open_slide(p, fallback_mpp=0.5) as s:
        assert (s.width, s.height) == (2000, 1000)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -2, 0, 1e-5, 5000, "abc"])
def test_impossible_pixel_sizes_are_refused(value) -> None:
    with pytest.raises(PdsegError, match="--mpp"):
        check_mpp(value, "--mpp")
    with pytest.raises(PdsegError):
        IOConfig(value, 64, 8) if not isinstance(value, str) else check_mpp(value, "x")


def test_image_mpp_option_and_model_mpp_refused_up_front(tmp_path: Path) -> None:
    with pytest.raises(PdsegError, match="--image-mpp"):
        PredictOptions(image_mpp=float("inf"))
    model = tiny_model(tmp_path / "m")
    meta = json.loads((model / META_FILE).read_text())
    meta["mpp"] = -2
    (model / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(PdsegError, match=r"model\.json.*cannot be a real pixel size"):
        load_model(model)


def _tiff(path: Path, mpp_x: float, mpp_y: float) -> Path:
    img = np.full((64, 64, 3), 200, np.uint8)
    tifffile.imwrite(path, img, photometric="rgb", resolution=(1e4 / mpp_x, 1e4 / mpp_y), resolutionunit="CENTIMETER")
    return path


def test_a_tiff_tag_of_1e_minus_5_um_is_not_a_pixel_size(tmp_path: Path) -> None:
    p = _tiff(tmp_path / "t.tif", 1e-5, 1e-5)
    assert probe(p)[2] is None  # treated as not recorded: --image-mpp is needed, never 112 GiB of tiles
    with pytest.raises(PdsegError, match="--image-mpp"):
        open_slide(p)


def test_non_square_pixels_are_reported(tmp_path: Path) -> None:
    with open_slide(_tiff(tmp_path / "ns.tif", 0.25, 0.5)) as s:
        assert s.mpp == pytest.approx(0.375) and "not square" in s.notes[0]
    with open_slide(_tiff(tmp_path / "sq.tif", 0.5, 0.5)) as s:
        assert s.notes == []


# ---------------------------------------------------------------------------------- options and model files



@pytest.mark.parametrize("flag,value,expect", [
    ("--t", "abc", "--t abc: expected whole numbers"),
    ("--blocks", "1,x", "--blocks 1,x: expected whole numbers"),
    ("--class-weights", "1,nan", "--class-weights 1,nan: each weight must be a finite number"),
    ("--prior-correction", "1.5", "--prior-correction 1.5: expected a finite number from 0 to 1"),
    ("--mpp", "inf", "--mpp"),
    ("--image-mpp", "inf", "--image-mpp"),
])
def test_bad_train_options_give_one_clear_line(tmp_path: Path, capsys, flag: str, value: str, expect: str) -> None:
    src = tmp_path / "src"
    make_image(src, "a", size=(48, 48))
    code, text = run(["train", str(src), "--out", str(tmp_path / "m"), "--backbone", "random:tiny",
                      "--image-mpp", "0.5", flag, value], capsys)
    assert code == 2 and expect in text and "Traceback" not in text, text
    assert len(text.strip().splitlines()) == 1


def test_bad_simplify_gives_one_clear_line_in_um(tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    make_image(src, "a", size=(48, 48))
    code, text = run(["predict", str(src), "--model", str(tmp_path / "m"), "--simplify", "-1"], capsys)
    assert code == 2 and "--simplify (µm) -1.0: expected a finite number >= 0" in text, text
    assert len(text.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["-1", "2.5", "many"])
def test_bad_keep_backups_gives_one_clear_line(tmp_path: Path, capsys, value: str) -> None:
    src = tmp_path / "src"
    make_image(src, "a", size=(48, 48))
    code, text = run(["predict", str(src), "--model", str(tmp_path / "m"), "--keep-backups", value], capsys)
    assert code == 2 and "--keep-backups" in text and "Traceback" not in text, text
    for bad in (-1, True, 2.5):
        with pytest.raises(PdsegError, match="--keep-backups .*0 to keep all"):
            PredictOptions(keep_backups=bad)


def test_non_finite_train_options_are_refused() -> None:
    for bad in (dict(class_weights=[1.0, float("nan")]), dict(lr=float("inf")), dict(cache_mb=float("nan")),
                dict(class_weights=[0, 0]), dict(prior_correction=-0.1), dict(prior_correction="half")):
        with pytest.raises(PdsegError):
            TrainOptions(**bad)


def test_training_stops_when_the_loss_is_not_finite(tmp_path: Path, monkeypatch) -> None:
    from pdseg_qupath.learn import fit

    make_image(tmp_path / "src", "a", size=(64, 64))
    make_image(tmp_path / "src", "b", size=(64, 64), seed=1)
    monkeypatch.setattr(fit, "_train_epoch", lambda *a, **k: float("nan"))
    with pytest.raises(PdsegError, match="training stopped at epoch 1: the loss is nan"):
        train_tiny(tmp_path / "src", tmp_path / "m", epochs=2)
    assert not (tmp_path / "m" / META_FILE).exists()  # no model saved


@pytest.mark.parametrize("edit,expect", [
    (lambda m: m.update(format_version="abc"), "\"format_version\" is 'abc'"),
    (lambda m: m["class_map"]["classes"][0].update(name=5), "class name 5 is not text"),
])
def test_malformed_model_files_give_one_clear_line(tmp_path: Path, edit, expect: str) -> None:
    model = tiny_model(tmp_path / "m")
    meta = json.loads((model / META_FILE).read_text())
    edit(meta)
    (model / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(PdsegError, match=r"model\.json") as e:
        load_model(model)
    assert expect in str(e.value)


def test_unwritable_out_for_masks_and_train(tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    make_image(src, "a", size=(48, 48))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for cmd in (["masks", str(src), "--out", str(blocker / "out"), "--mpp", "0.5", "--image-mpp", "0.5"],
                ["train", str(src), "--out", str(blocker / "out"), "--backbone", "random:tiny", "--image-mpp", "0.5"]):
        code, text = run(cmd, capsys)
        assert code == 2 and "cannot write here" in text and "Traceback" not in text, text


# ------------------------------------------------------------------------------- QuPath data and annotations

def test_empty_qpdata_names_pdsegs_backup(project: Path) -> None:  # noqa: F811 - fixture
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource

    backup = project / "pdseg" / "backups" / "20260101-120000" / "data" / "1" / "data.qpdata"
    backup.parent.mkdir(parents=True)
    backup.write_text("original")
    (project / "data" / "1" / "data.qpdata").write_bytes(b"")
    src = QuPathProjectSource(project)
    with pytest.raises(PdsegError) as e:
        src.read_annotations(src.images()[0])
    assert "data/1/data.qpdata" in str(e.value) and "0 bytes" in str(e.value)
    assert str(backup) in str(e.value) and "copy it over" in str(e.value)


def test_annotations_outside_the_image_are_reported(tmp_path: Path) -> None:
    from shapely.geometry import box

    from pdseg_qupath.learn.data import load_training_images
    from pdseg_qupath.sources.qupath.folder import GeoJSONFolder

    make_image(tmp_path, "a", size=(48, 48), extra_features=[feature(box(500, 500, 600, 600), "Nucleus")])
    messages: list[str] = []
    imgs, _ = load_training_images(GeoJSONFolder(tmp_path), image_mpp=0.5, classes=None, messages=messages)
    imgs[0].slide.close()
    assert any("a.png: 1 annotation(s) lie entirely outside the image (48 × 48 px)" in m for m in messages)
