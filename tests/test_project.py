"""The QuPath project adapter against a real QuPath through paquo 0.9 (skipped when QuPath is absent).

Run with a QuPath 0.5/0.6 installation: ``PAQUO_QUPATH_DIR=/opt/QuPath pytest tests/test_project.py``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

try:
    from paquo.classes import QuPathPathClass
    from paquo.images import QuPathImageType
    from paquo.projects import QuPathProject
except Exception:  # paquo raises ValueError("no valid qupath installation found") at import
    pytest.skip(
        "QuPath not found: set PAQUO_QUPATH_DIR to a QuPath 0.5/0.6 installation to run these tests",
        allow_module_level=True,
    )

import tifffile
from PIL import Image
from shapely.geometry import LineString, Point, Polygon, box

from pdseg_qupath.core.annotations import Annotation
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.sources.qupath.project import QuPathProjectSource

pytestmark = pytest.mark.qupath

HOLED = Polygon([(10, 10), (110, 10), (110, 110), (10, 110)], [[(40, 40), (60, 40), (60, 60), (40, 60)]])


def _images(folder: Path) -> tuple[Path, Path]:
    folder.mkdir()
    rgb = np.full((256, 320, 3), 235, np.uint8)
    rgb[40:200, 60:260] = (170, 60, 150)
    tif = folder / "slide.tif"
    # 0.5 µm/px = 20000 px/cm, as scanners record it
    tifffile.imwrite(tif, rgb, photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    png = folder / "tile.png"
    Image.fromarray(rgb[:128, :128]).save(png)  # PNG: no pixel size
    return tif, png


@pytest.fixture
def project(tmp_path: Path) -> Path:
    tif, png = _images(tmp_path / "images")
    proj = tmp_path / "proj"
    with QuPathProject(proj, mode="x") as qp:  # saved on exit
        # return_list: paquo adds one entry per series a reader reports
        (slide,) = qp.add_image(tif, image_type=QuPathImageType.BRIGHTFIELD_H_E, return_list=True)
        (tile,) = qp.add_image(png, image_type=QuPathImageType.BRIGHTFIELD_H_E, return_list=True)
        tumor = QuPathPathClass("Tumor", color=(200, 0, 0))
        stroma = QuPathPathClass("Stroma", color=(150, 200, 150))
        epidermis = QuPathPathClass("Epidermis", color=(10, 120, 30))
        qp.path_classes = [tumor, stroma, epidermis]  # a new project's list is empty
        h = slide.hierarchy
        h.add_annotation(roi=HOLED, path_class=tumor).name = "my tumour"
        h.add_annotation(roi=box(150, 20, 300, 60), path_class=epidermis, measurements={"score": 2.0})
        h.add_annotation(roi=box(0, 200, 20, 220))  # unclassified
        h.add_annotation(roi=Point(5, 5), path_class=tumor)
        h.add_annotation(roi=LineString([(0, 0), (30, 30)]), path_class=stroma)
        tile.hierarchy.add_annotation(roi=box(1, 1, 21, 21), path_class=stroma)
    return proj


def _by_file(records):
    return {r.path.name: r for r in records}


def test_read_images_and_annotations(project):
    src = QuPathProjectSource(project)
    recs = _by_file(src.images())
    slide, tile = recs["slide.tif"], recs["tile.png"]
    assert slide.error is None and tile.error is None
    assert (slide.width, slide.height) == (320, 256) and (tile.width, tile.height) == (128, 128)
    assert slide.mpp == pytest.approx(0.5, rel=1e-3)
    assert tile.mpp is None  # uncalibrated: QuPath says 1.0 px, which is not a pixel size

    anns, report = src.read_annotations(slide)
    assert sorted(a.classification or "-" for a in anns) == ["-", "Epidermis", "Tumor"]
    tumour = next(a for a in anns if a.classification == "Tumor")
    assert tumour.name == "my tumour" and tumour.geometry.area == pytest.approx(100 * 100 - 20 * 20)
    assert len(tumour.geometry.interiors) == 1 and tumour.color == (200, 0, 0)
    epi = next(a for a in anns if a.classification == "Epidermis")
    assert epi.measurements == {"score": 2.0} and epi.color == (10, 120, 30)
    assert len({a.id for a in anns}) == 3 and all(len(a.id) == 36 for a in anns)  # QuPath's UUIDs
    assert (report.read, report.skipped_points, report.skipped_lines) == (3, 1, 1)
    colors = src.class_colors()
    assert colors["Tumor"] == (200, 0, 0) and colors["Epidermis"] == (10, 120, 30)
    src.close()


def _predictions(n: int) -> list[Annotation]:
    return [
        Annotation(box(0, 0, 50 + 10 * i, 50), "Tumor", color=(200, 0, 0), name=f"pdseg Tumor {i}",
                   measurements={"pdseg area µm²": 625.0 + i, "pdseg mean probability": 0.75})
        for i in range(n - 1)
    ] + [Annotation(box(200, 100, 260, 180), "Necrosis", color=(50, 50, 50), measurements={"pdseg n": 3})]


def _snapshot(project: Path, file_name: str):
    src = QuPathProjectSource(project)
    rec = _by_file(src.images())[file_name]
    anns, _ = src.read_annotations(rec)
    src.close()
    users = sorted((a for a in anns if not a.is_pdseg), key=lambda a: a.id)
    return users, [a for a in anns if a.is_pdseg]


def test_pruning_backups_keeps_the_newest_one_of_each_image(project):
    from pdseg_qupath.sources.qupath.backup import backup_folders, latest_backup

    with QuPathProjectSource(project, writable=True) as src:  # one session writes both images
        recs = _by_file(src.images())
        first = src.write_predictions(recs["slide.tif"], _predictions(2)).backup
        src.write_predictions(recs["tile.png"], _predictions(2))
    for _ in range(2):  # then two sessions write the slide only, keeping 1 backup folder
        with QuPathProjectSource(project, writable=True) as src:
            last = src.write_predictions(_by_file(src.images())["slide.tif"], _predictions(2)).backup
            report = src.prune_backups(1)
    assert backup_folders(project) == [first, last] and len(report.removed) == 1 and not report.failed
    entries = {p.name for p in (first / "data").iterdir()}
    (tile_entry,) = entries - {p.name for p in (last / "data").iterdir()}
    assert latest_backup(project, project / "data" / tile_entry).parent.parent.parent == first  # its only copy


def test_write_predictions_replaces_only_pdseg_objects(project):
    users_before, mine_before = _snapshot(project, "slide.tif")
    assert mine_before == []

    src = QuPathProjectSource(project, writable=True)
    slide = _by_file(src.images())["slide.tif"]
    r1 = src.write_predictions(slide, _predictions(3))
    r2 = src.write_predictions(slide, _predictions(2))
    src.close()
    assert (r1.removed, r1.added, r1.kept) == (0, 3, 5)  # 5 user objects incl. the point and the line
    assert (r2.removed, r2.added, r2.kept) == (3, 2, 5)
    assert r1.backup is not None and r1.backup == r2.backup
    assert (r1.backup / "project.qpproj").is_file() and any((r1.backup / "data").iterdir())

    src = QuPathProjectSource(project, writable=True)  # a second session: its own backup, same result
    r3 = src.write_predictions(_by_file(src.images())["slide.tif"], _predictions(2))
    src.close()
    assert (r3.removed, r3.added) == (2, 2) and r3.backup != r1.backup

    users_after, mine = _snapshot(project, "slide.tif")
    assert sorted(a.name for a in mine) == ["pdseg Necrosis", "pdseg Tumor 0"]
    tumour = next(a for a in mine if a.classification == "Tumor")
    assert tumour.measurements["pdseg area µm²"] == 625.0 and tumour.geometry.area == pytest.approx(2500)
    necrosis = next(a for a in mine if a.classification == "Necrosis")
    assert necrosis.measurements["pdseg n"] == 3.0 and "pdseg: fingerprint" in necrosis.measurements
    assert [a.role for a in mine] == ["untouched", "untouched"]  # the fingerprint survives QuPath's storage
    assert [a.id for a in users_after] == [a.id for a in users_before]
    assert [a.classification for a in users_after] == [a.classification for a in users_before]
    assert all(a.geometry.equals(b.geometry) for a, b in zip(users_after, users_before))
    assert "Necrosis" in [pc.name for pc in QuPathProject(project, mode="r").path_classes]
    assert _snapshot(project, "tile.png")[1] == []  # other images untouched


def test_moved_image(project, tmp_path):
    (tmp_path / "images" / "slide.tif").rename(tmp_path / "slide-moved.tif")
    src = QuPathProjectSource(project, writable=True)
    recs = _by_file(src.images())
    assert recs["slide.tif"].error and "Update URIs" in recs["slide.tif"].error
    assert recs["tile.png"].error is None and recs["tile.png"].width == 128
    assert (recs["slide.tif"].width, recs["slide.tif"].height) == (320, 256)  # from the project file
    with pytest.raises(PdsegError, match="cannot open the image file"):
        src.write_predictions(recs["slide.tif"], _predictions(1))
    moved, report = src.read_annotations(recs["slide.tif"])  # objects live in the project, not the slide
    assert report.read == 3 and any(a.name == "my tumour" for a in moved)
    anns, _ = src.read_annotations(recs["tile.png"])
    assert [a.classification for a in anns] == ["Stroma"]
    src.close()


EDIT_IN_QUPATH = textwrap.dedent("""
    import sys
    from paquo.classes import QuPathPathClass
    from paquo.projects import QuPathProject
    from shapely.geometry import box
    with QuPathProject(sys.argv[1], mode="r+") as qp:
        entry = next(e for e in qp.images if e.uri.endswith("slide.tif"))
        pcs = {pc.id: pc for pc in qp.path_classes}
        h = entry.hierarchy
        if sys.argv[2] == "draw":
            h.add_annotation(roi=box(200, 150, 230, 190), path_class=pcs["Stroma"]).name = "drawn mid-run"
        elif sys.argv[2] == "project":  # a project-level change: a new image and a new class
            qp.add_image(sys.argv[3])
            qp.path_classes = list(qp.path_classes) + [QuPathPathClass("Immune cells", color=(160, 90, 160))]
        else:  # reclassify the first pdseg prediction
            obj = next(o for o in h.annotations if (o.name or "").startswith("pdseg"))
            obj.update_path_class(pcs["Stroma"])
        entry.save()
""")


def test_an_edit_saved_mid_run_is_kept_and_corrections_are_told_apart(project):
    from pdseg_qupath.core.annotations import CORRECTED, UNTOUCHED

    preds = [Annotation(box(10.004, 120.5, 50.337, 160.25), "Tumor", (200, 0, 0)),
             Annotation(box(60, 120, 90, 150).difference(box(70, 130, 75, 135)), "Stroma", (150, 200, 150))]
    src = QuPathProjectSource(project, writable=True)
    assert src._pq.PathObjects is not None and src._pq.ImagePlane is not None  # QuPath's own geometry path
    slide = _by_file(src.images())["slide.tif"]
    before, _ = src.read_annotations(slide)
    # a second process (QuPath, in real life) saves an edit while pdseg is predicting
    subprocess.run([sys.executable, "-c", EDIT_IN_QUPATH, str(project), "draw"], check=True)
    report = src.write_predictions(slide, preds)
    src.close()
    assert report.added == 2
    src = QuPathProjectSource(project)
    after, read = src.read_annotations(_by_file(src.images())["slide.tif"])
    names = [a.name for a in after]
    assert "drawn mid-run" in names and all(b.name in names for b in before)
    assert [a.role for a in after if a.is_pdseg] == [UNTOUCHED, UNTOUCHED]  # the fingerprint survives QuPath
    assert all(a.geometry.is_valid for a in after) and not any("are gone" in m for m in read.messages)
    src.close()
    subprocess.run([sys.executable, "-c", EDIT_IN_QUPATH, str(project), "reclassify"], check=True)
    src = QuPathProjectSource(project)
    after, _ = src.read_annotations(_by_file(src.images())["slide.tif"])
    assert sorted(a.role for a in after if a.is_pdseg) == [CORRECTED, UNTOUCHED]


def test_an_image_and_a_class_added_mid_run_are_kept(project, tmp_path):
    extra = tmp_path / "images" / "added.png"
    Image.new("RGB", (64, 64), (200, 120, 180)).save(extra)
    src = QuPathProjectSource(project, writable=True)
    slide = _by_file(src.images())["slide.tif"]
    subprocess.run([sys.executable, "-c", EDIT_IN_QUPATH, str(project), "project", str(extra)], check=True)
    src.write_predictions(slide, [Annotation(box(10, 120, 50, 160), "Necrosis", (50, 50, 50))])
    src.close()
    with QuPathProject(project, mode="r") as qp:
        assert sorted(Path(e.uri).name for e in qp.images) == ["added.png", "slide.tif", "tile.png"]
        classes = {pc.id: pc.color.to_rgb() for pc in qp.path_classes}
    assert classes["Immune cells"] == (160, 90, 160) and "Necrosis" in classes and "Tumor" in classes


def test_review_map_detections_and_a_wiped_write_back(project):
    preds = [Annotation(box(10, 120, 50, 160), "Tumor", (200, 0, 0), metadata={"pdseg_model": "0123456789abcdef"}),
             Annotation(box(0, 0, 64, 64), "Review*", (255, 140, 0), name="pdseg review 001",
                        measurements={"pdseg: uncertainty": 0.7, "pdseg: review rank": 1.0}),
             Annotation(box(0, 0, 16, 16), None, name="pdseg uncertainty", object_type="detection",
                        measurements={"pdseg: uncertainty": 0.5})]
    for _ in range(2):  # the second run replaces the map rather than adding to it
        src = QuPathProjectSource(project, writable=True)
        src.write_predictions(_by_file(src.images())["slide.tif"], preds)
        src.close()
    with QuPathProject(project, mode="r+") as qp:
        entry = next(e for e in qp.images if e.uri.endswith("slide.tif"))
        (cell,) = list(entry.hierarchy.detections)
        assert cell.measurements["pdseg: uncertainty"] == pytest.approx(0.5)
        assert "Review*" in [pc.id for pc in qp.path_classes]
        # an open QuPath saves its older copy: the pdseg objects vanish
        for obj in [o for o in entry.hierarchy.annotations if (o.name or "").startswith("pdseg")]:
            entry.hierarchy.annotations.discard(obj)
        entry.save()
    src = QuPathProjectSource(project)
    _, report = src.read_annotations(_by_file(src.images())["slide.tif"])
    assert "2 pdseg object(s) written by model 01234567" in report.messages[0] and "are gone" in report.messages[0]


def test_predict_with_review_into_a_real_project(project, tmp_path):
    from pdseg_qupath.learn.options import PredictOptions
    from pdseg_qupath.tasks.predict import predict

    from _loop_data import make_folder, train_tiny

    model = train_tiny(make_folder(tmp_path / "train", n=2, size=(48, 48)), tmp_path / "model", epochs=1).model_dir
    with QuPathProjectSource(project, writable=True) as src:
        result = predict(src, model, options=PredictOptions(image_mpp=0.5, review=2, review_size_um=16,
                                                            tissue_only=False))
    assert not result.failed and all(r.write is not None and r.write.added > 0 for r in result.images)
    src = QuPathProjectSource(project)
    anns, _ = src.read_annotations(_by_file(src.images())["slide.tif"])
    ours = [a for a in anns if a.is_pdseg]
    assert ours and {a.role for a in ours} == {"untouched"}
    assert [a.measurements["pdseg: review rank"] for a in ours if a.classification == "Review*"] == [1.0, 2.0]
    bounds = box(0, 0, 320, 256)
    assert all(bounds.contains(a.geometry) for a in ours)  # clipped to the image
    with QuPathProject(project, mode="r") as qp:
        entry = next(e for e in qp.images if e.uri.endswith("slide.tif"))
        assert len(list(entry.hierarchy.detections)) > 0
