"""GeoJSON-folder source: listing, sidecar matching, errors per image, and safe prediction write-back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import Polygon

from pdseg_qupath.core.annotations import Annotation
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.sources.base import AnnotationSource
from pdseg_qupath.sources.inputs import open_source
from pdseg_qupath.sources.qupath.folder import GeoJSONFolder
from pdseg_qupath.sources.qupath.geojson import read_geojson, write_geojson

FIX = Path(__file__).parent / "fixtures"


def png(path: Path, w: int = 40, h: int = 30) -> Path:
    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(path)
    return path


def square(x: float, cls: str | None = "Tumor", **kw: object) -> Annotation:
    return Annotation(Polygon([(x, 0), (x + 10, 0), (x + 10, 10), (x, 10)]), cls, **kw)  # type: ignore[arg-type]


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    png(tmp_path / "a.png")
    write_geojson(tmp_path / "a.geojson", [
        square(0, "Tumor", color=(1, 2, 3)),
        square(20, "Stroma"),
        square(40, "Nucleus", object_type="detection", color=(9, 9, 9)),
    ])
    png(tmp_path / "b.jpg", 16, 8)  # no sidecar
    write_geojson(tmp_path / "c.geojson", [square(0, "Tumor", color=(7, 7, 7))])  # image missing
    png(tmp_path / "d.png")
    write_geojson(tmp_path / "d.png.geojson", [square(0, "Necrosis")])  # full-name sidecar
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_listing_matches_sidecars_and_keeps_going(folder: Path) -> None:
    src = GeoJSONFolder(folder)
    assert isinstance(src, AnnotationSource)
    recs = {r.name: r for r in src.images()}
    assert sorted(recs) == ["a.png", "b.jpg", "c", "d.png"]
    a = recs["a.png"]
    assert (a.width, a.height, a.mpp, a.error) == (40, 30, None, None)  # PNG: no pixel size recorded
    assert a.path == folder / "a.png" and a.uri.startswith("file://")
    assert recs["b.jpg"].error is None and (recs["b.jpg"].width, recs["b.jpg"].height) == (16, 8)
    assert recs["c"].error and "image file not found" in recs["c"].error and "c.geojson" in recs["c"].error
    assert src.sidecar(recs["d.png"]) == folder / "d.png.geojson"


def test_read_annotations_areas_of_annotation_objects_only(folder: Path) -> None:
    src = GeoJSONFolder(folder)
    recs = {r.name: r for r in src.images()}
    anns, rep = src.read_annotations(recs["a.png"])
    assert [a.classification for a in anns] == ["Tumor", "Stroma"]
    assert rep.read == 2 and rep.skipped_other == 1 and "annotations only" in rep.messages[-1]
    anns, rep = src.read_annotations(recs["b.jpg"])
    assert anns == [] and rep.read == 0 and rep.skipped == 0
    assert [a.classification for a in src.read_annotations(recs["d.png"])[0]] == ["Necrosis"]


def test_class_colors_first_seen_wins(folder: Path) -> None:
    write_geojson(folder / "e.geojson", [square(0, "Tumor", color=(99, 99, 99))])
    colors = GeoJSONFolder(folder).class_colors()
    # a.geojson sorts before c.geojson and e.geojson; Stroma and Necrosis were written with QuPath's defaults
    assert colors == {"Tumor": (1, 2, 3), "Stroma": (150, 200, 150), "Nucleus": (9, 9, 9), "Necrosis": (50, 50, 50)}


def test_unreadable_image_sets_error(tmp_path: Path) -> None:
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    png(tmp_path / "ok.png")
    recs = {r.name: r for r in GeoJSONFolder(tmp_path).images()}
    assert recs["broken.tif"].error and "broken.tif" in recs["broken.tif"].error
    assert recs["ok.png"].error is None


def test_broken_sidecar_raises_with_file_and_line(tmp_path: Path) -> None:
    png(tmp_path / "x.png")
    (tmp_path / "x.geojson").write_text('{"type": "FeatureCollection",\n "features": [}\n')
    src = GeoJSONFolder(tmp_path)
    (rec,) = src.images()
    with pytest.raises(PdsegError, match=r"x.geojson: invalid JSON at line 2"):
        src.read_annotations(rec)
    assert src.class_colors() == {}


def test_open_source_and_not_a_folder(folder: Path) -> None:
    assert isinstance(open_source(folder), GeoJSONFolder)
    with pytest.raises(PdsegError, match="not a folder"):
        GeoJSONFolder(folder / "a.png")


def test_write_predictions_replaces_only_pdseg_objects(folder: Path) -> None:
    src = GeoJSONFolder(folder)
    rec = next(r for r in src.images() if r.name == "a.png")
    sidecar_before = (folder / "a.geojson").read_bytes()

    first = [square(0, "Tumor", name="pdseg Tumor"), square(20, "Stroma", name="pdseg Stroma")]
    rep1 = src.write_predictions(rec, first)
    target = folder / "pdseg" / "predictions" / "a.png.geojson"
    assert (rep1.added, rep1.removed, rep1.kept, rep1.backup) == (2, 0, 0, None)

    # the user adds their own objects to the predictions file, including a point QuPath exported
    data = json.loads(target.read_text())
    user_point = {"type": "Feature", "id": "u1", "geometry": {"type": "Point", "coordinates": [1.0, 2.0]},
                  "properties": {"objectType": "annotation", "name": "my point", "extra": {"kept": True}}}
    user_area = {"type": "Feature", "id": "u2", "geometry": {"type": "Polygon",
                 "coordinates": [[[0.0, 0.0], [5.0, 0.0], [5.0, 5.0], [0.0, 0.0]]]},
                 "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [1, 1, 1]}}}
    data["features"] += [user_point, user_area]
    target.write_text(json.dumps(data))
    before_second = target.read_bytes()

    second = [square(50, "Tumor", name="pdseg Tumor")]
    rep2 = src.write_predictions(rec, second)
    assert (rep2.added, rep2.removed, rep2.kept) == (1, 2, 2)
    assert rep2.backup == target.with_name("a.png.geojson.bak") and rep2.backup.read_bytes() == before_second

    features = json.loads(target.read_text())["features"]
    assert user_point in features and user_area in features  # kept exactly
    objs, _ = read_geojson(target)
    pdseg = [a for a in objs if a.is_pdseg]
    assert len(pdseg) == 1 and pdseg[0].geometry.bounds == (50.0, 0.0, 60.0, 10.0)
    assert (folder / "a.geojson").read_bytes() == sidecar_before  # the user's sidecar is untouched

    # a third write still leaves exactly one set of pdseg objects
    src.write_predictions(rec, second)
    assert sum(a.is_pdseg for a in read_geojson(target)[0]) == 1


def test_write_predictions_marks_unmarked_objects(folder: Path) -> None:
    src = GeoJSONFolder(folder)
    rec = next(r for r in src.images() if r.name == "a.png")
    src.write_predictions(rec, [square(0, "Tumor", name="my own"), square(20, "Stroma")])
    target = src.predictions_path(rec)
    assert [a.name for a in read_geojson(target)[0]] == ["pdseg my own", "pdseg Stroma"]
    rep = src.write_predictions(rec, [square(0, "Tumor")])
    assert (rep.removed, rep.added, rep.kept) == (2, 1, 0)


def test_predictions_are_named_after_the_whole_image_name(tmp_path: Path) -> None:
    png(tmp_path / "s.png")
    png(tmp_path / "s.jpg")
    png(tmp_path / "t.png")
    src = GeoJSONFolder(tmp_path)
    paths = {r.name: src.predictions_path(r).name for r in src.images()}
    assert paths == {"s.jpg": "s.jpg.geojson", "s.png": "s.png.geojson", "t.png": "t.png.geojson"}


def test_real_gbm40_folder(tmp_path: Path) -> None:
    for name in ("01.png", "01.geojson"):
        shutil.copy(FIX / "gbm40" / name, tmp_path / name)
    src = GeoJSONFolder(tmp_path)
    (rec,) = src.images()
    assert (rec.name, rec.width, rec.height, rec.mpp, rec.error) == ("01.png", 512, 512, None, None)
    anns, rep = src.read_annotations(rec)
    assert len(anns) == 103 and rep.skipped == 0
    assert src.class_colors()["Background"] == (200, 200, 200)
    src.close()
