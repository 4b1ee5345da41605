# ruff: noqa: F811 - the fake-paquo fixtures are imported from test_project_nojvm
"""The correction loop: a user's edit is never lost, predictions are never labels unless corrected,
classes ending in ``*`` are ignored, and a wiped write-back is noticed (on the fake of paquo).

The same points against a real QuPath are in test_project.py (marked ``qupath``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import shapely
from shapely.affinity import translate
from shapely.geometry import box
from test_project_nojvm import (  # noqa: F401 - fixtures
    FakeAnnotationObject,
    FakePathClass,
    dump_qpdata,
    fake_paquo,
    load_qpdata,
    project,
)

from pdseg_qupath.core.annotations import (
    ACCEPTED,
    CORRECTED,
    IGNORE,
    UNTOUCHED,
    USER,
    Annotation,
    ClassMap,
    fingerprint,
    label_role,
    stamped,
    training_labels,
)
from pdseg_qupath.core.errors import PdsegError


def _predictions() -> list[Annotation]:
    meta = {"pdseg_model": "abcdef0123456789"}
    return [
        Annotation(box(300, 300, 340.37, 351.5), "Tumor", name="pdseg Tumor", metadata=meta),
        Annotation(box(400, 300, 450, 350).difference(box(410, 310, 420, 320)), "Stroma", metadata=meta),
        Annotation(box(500, 300, 560, 350), "Tumor", metadata=meta),
        Annotation(box(600, 300, 660, 350), "Stroma", metadata=meta),
    ]


def _data(project) -> list:
    return load_qpdata((project / "data" / "1" / "data.qpdata").read_text())


EDIT = textwrap.dedent("""
    import json, sys, shapely
    from shapely.geometry import box
    path = sys.argv[1]
    data = json.loads(open(path).read())
    data["fake-qpdata"].append({"wkb": shapely.to_wkb(box(700, 700, 720, 730), hex=True), "name": "drawn mid-run",
                                "id": "33333333-3333-4333-8333-333333333333", "class": ["Stroma", [150, 200, 150]],
                                "measurements": {}})
    open(path, "w").write(json.dumps(data))
""")


def test_an_edit_saved_while_predict_runs_is_kept(project, fake_paquo):
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource

    qpdata = project / "data" / "1" / "data.qpdata"
    qpdata.write_text(dump_qpdata(fake_paquo[project]["images"][0]["objects"]))  # as QuPath saved it
    with QuPathProjectSource(project, writable=True) as src:
        slide = src.images()[0]
        before, _ = src.read_annotations(slide)  # pdseg's copy, read when the run starts
        # ... the run predicts; meanwhile the pathologist draws an object and QuPath saves (another process)
        subprocess.run([sys.executable, "-c", EDIT, str(qpdata)], check=True)
        report = src.write_predictions(slide, _predictions())
    names = [o.name for o in _data(project)]
    assert "drawn mid-run" in names  # the edit survived the write-back
    assert all(a.name in names for a in before)  # and so did everything else the user had
    assert (report.added, report.removed, report.kept) == (4, 0, len(before) + 3)  # + point, line, new object
    # the backup holds the file as it was just before pdseg's write (edit included), not the stale copy
    assert "drawn mid-run" in (report.backup / "data" / "1" / "data.qpdata").read_text()


def test_a_data_file_that_keeps_changing_is_refused(project, fake_paquo, monkeypatch):
    from pdseg_qupath.sources.qupath import project as adapter

    ticks = iter(range(100))
    monkeypatch.setattr(adapter, "_data_stamp", lambda entry: next(ticks))  # a new save at every look
    with adapter.QuPathProjectSource(project, writable=True) as src, pytest.raises(PdsegError, match="kept changing"):
        src.write_predictions(src.images()[0], _predictions())
    assert fake_paquo[project]["images"][0].get("saves") is None  # nothing written


def test_corrected_and_accepted_predictions_become_labels(project, fake_paquo):
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource

    with QuPathProjectSource(project, writable=True) as src:
        src.write_predictions(src.images()[0], _predictions())
    # the pathologist, in QuPath: reclassifies one, reshapes one, accepts one by renaming, leaves one
    objects = _data(project)
    mine = [o for o in objects if (o.name or "").startswith("pdseg")]
    mine[0].path_class = FakePathClass("Stroma", (150, 200, 150))
    mine[1].roi = mine[1].roi.union(box(440, 340, 470, 380))
    mine[2].name = "Tumor"
    (project / "data" / "1" / "data.qpdata").write_text(dump_qpdata(objects))

    src = QuPathProjectSource(project)
    anns, _ = src.read_annotations(src.images()[0])
    roles = [a.role for a in anns if a.measurements.get("pdseg: fingerprint") is not None]
    assert sorted(roles) == sorted([CORRECTED, CORRECTED, ACCEPTED, UNTOUCHED])
    labels, count = training_labels(anns)
    assert (count.corrected, count.accepted, count.untouched, count.user) == (2, 1, 1, len(anns) - 4)
    assert all(a.role != UNTOUCHED for a in labels) and len(labels) == len(anns) - 1

    # predicting again replaces only the untouched prediction; the corrections stay
    with QuPathProjectSource(project, writable=True) as src:
        report = src.write_predictions(src.images()[0], _predictions()[:1])
    assert report.removed == 1 and any("corrected" in m for m in report.messages)
    kept = [o.name for o in _data(project)]
    assert kept.count("pdseg Tumor") == 2  # the reclassified one (still named so) and the new one


def test_fingerprint_tolerates_storage_and_catches_edits():
    g = box(10_000.123, 20_000.456, 10_500.789, 20_300.001).difference(box(10_100, 20_100, 10_200, 20_200))
    a = Annotation(g, "Tumor", name="pdseg Tumor", measurements=fingerprint(g, "Tumor"))
    stored = shapely.transform(shapely.set_precision(g, 0.01), lambda c: c.astype("float32").astype("float64"))
    assert label_role(Annotation(stored, "Tumor", name=a.name, measurements=a.measurements)) == UNTOUCHED
    assert label_role(Annotation(g, "Stroma", name=a.name, measurements=a.measurements)) == CORRECTED
    assert label_role(Annotation(translate(g, 3, 0), "Tumor", name=a.name, measurements=a.measurements)) == CORRECTED
    assert label_role(Annotation(g.union(box(10_500, 20_000, 10_510, 20_010)), "Tumor", name=a.name,
                                 measurements=a.measurements)) == CORRECTED
    assert label_role(Annotation(g, "Tumor", name="Tumor", measurements=a.measurements)) == ACCEPTED
    assert label_role(Annotation(g, "Tumor", name="pdseg Tumor")) == UNTOUCHED  # older pdseg: no fingerprint
    assert label_role(Annotation(g, "Tumor", name="my tumour")) == USER
    assert stamped(Annotation(g, "Tumor")).role == UNTOUCHED


def test_classes_ending_in_a_star_are_ignored():
    anns = [Annotation(box(0, 0, 5, 5), c) for c in ("Tumor", "Region*", "Ignore*", "Review*", "Stroma")]
    cmap = ClassMap.from_annotations(anns)
    assert cmap.names == ["Stroma", "Tumor"]
    assert [cmap.index(n) for n in ("Region*", "Ignore*", "Review*", "Tumor")] == [IGNORE, IGNORE, IGNORE, 1]
    with pytest.raises(ValueError, match="not trainable"):
        ClassMap.from_annotations(anns, ["Tumor", "Region*"])


def test_a_wiped_write_back_is_noticed(project, fake_paquo):
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource

    user_objects = [FakeAnnotationObject(o.roi, o.path_class, o.name) for o in fake_paquo[project]["images"][0]["objects"]]
    with QuPathProjectSource(project, writable=True) as src:
        src.write_predictions(src.images()[0], _predictions())
    src = QuPathProjectSource(project)
    _, report = src.read_annotations(src.images()[0])
    assert not any("are gone" in m for m in report.messages)
    # an open QuPath saves its older copy of the image over the write-back
    (project / "data" / "1" / "data.qpdata").write_text(dump_qpdata(user_objects))
    src = QuPathProjectSource(project)
    _, report = src.read_annotations(src.images()[0])
    assert "4 pdseg object(s) written by model abcdef01" in report.messages[0] and "are gone" in report.messages[0]
    record = json.loads((project / "pdseg" / "writes.json").read_text())
    assert record["1"]["objects"] == 4 and record["1"]["image"] == "slide.tif"


def test_folder_predictions_carry_the_fingerprint_and_untouched_ones_are_not_labels(tmp_path):
    from pdseg_qupath.learn.data import load_training_images
    from pdseg_qupath.sources.qupath.folder import GeoJSONFolder

    from _loop_data import make_image

    make_image(tmp_path, "a", size=(64, 64))
    src = GeoJSONFolder(tmp_path)
    rec = src.images()[0]
    src.write_predictions(rec, [Annotation(box(0, 0, 30, 30), "Nucleus"), Annotation(box(30, 30, 60, 60), "Nucleus")])
    written = json.loads(src.predictions_path(rec).read_text())["features"]
    assert all("pdseg: fingerprint" in f["properties"]["measurements"] for f in written)
    # imported into QuPath and exported back with the user's annotations: one reshaped, one untouched
    written[0]["geometry"] = shapely.geometry.mapping(box(0, 0, 20, 30))
    sidecar = tmp_path / "a.geojson"
    fc = json.loads(sidecar.read_text())
    fc["features"] += written
    sidecar.write_text(json.dumps(fc))
    messages: list[str] = []
    (image,), _ = load_training_images(GeoJSONFolder(tmp_path), image_mpp=0.5, classes=None, messages=messages)
    assert (image.labels.corrected, image.labels.untouched, image.labels.accepted) == (1, 1, 0)
    assert len(image.annotations) == len(fc["features"]) - 1
    image.slide.close()


def test_review_regions_and_the_uncertainty_map_go_into_the_project(project, fake_paquo):
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource

    review = [Annotation(box(0, 0, 64, 64), "Review*", name="pdseg review 001",
                         measurements={"pdseg: uncertainty": 0.7, "pdseg: review rank": 1.0}),
              Annotation(box(0, 0, 16, 16), None, name="pdseg uncertainty", object_type="detection",
                         measurements={"pdseg: uncertainty": 0.5})]
    for _ in range(2):  # a second run replaces the map instead of adding to it
        with QuPathProjectSource(project, writable=True) as src:
            src.write_predictions(src.images()[0], [*_predictions()[:1], *review])
    data = json.loads((project / "data" / "1" / "data.qpdata").read_text())
    assert [d["measurements"]["pdseg: uncertainty"] for d in data["detections"]] == [0.5]
    assert "Review*" in [pc.id for pc in fake_paquo[project]["classes"]]
    src = QuPathProjectSource(project)
    anns, _ = src.read_annotations(src.images()[0])
    (region,) = [a for a in anns if a.classification == "Review*"]
    assert region.is_ignore and ClassMap.from_annotations(anns).index("Review*") == IGNORE


def test_predict_says_when_its_last_write_back_was_wiped(project, fake_paquo):
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource

    user_objects = [FakeAnnotationObject(o.roi, o.path_class, o.name) for o in fake_paquo[project]["images"][0]["objects"]]
    with QuPathProjectSource(project, writable=True) as src:
        first = src.write_predictions(src.images()[0], _predictions())
    (project / "data" / "1" / "data.qpdata").write_text(dump_qpdata(user_objects))  # QuPath saved over it
    with QuPathProjectSource(project, writable=True) as src:
        again = src.write_predictions(src.images()[0], _predictions())
    assert not any("are gone" in m for m in first.messages)
    assert any("4 pdseg object(s) written by model abcdef01" in m and "are gone" in m for m in again.messages)


def test_the_simulated_pathologist_labels_exactly_the_review_region():
    """benchmarks/review_vs_random.py: a corrected region becomes its ground truth, nothing outside it."""
    import importlib.util
    from pathlib import Path

    from shapely.geometry import Point, shape

    spec = importlib.util.spec_from_file_location(
        "review_vs_random", Path(__file__).parents[1] / "benchmarks" / "review_vs_random.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cell = box(64, 0, 128, 64)
    nuclei = [Point(60, 30).buffer(10), Point(100, 100).buffer(5), Point(90, 20).buffer(6)]
    feats = bench._region_labels(nuclei, cell)
    by_class = {}
    for f in feats:
        by_class.setdefault(f["properties"]["classification"]["name"], []).append(shape(f["geometry"]))
    assert sum(g.area for gs in by_class.values() for g in gs) == pytest.approx(cell.area)
    assert all(cell.buffer(1e-9).contains(g) for gs in by_class.values() for g in gs)
    assert len(by_class["Nucleus"]) == 2  # the one far outside the region is not labelled
    assert sum(g.area for g in by_class["Nucleus"]) == pytest.approx(
        nuclei[0].intersection(cell).area + nuclei[2].area)


def test_the_benchmark_scores_uncertainty_away_from_edges_and_committee_disagreement():
    """benchmarks/review_vs_random.py: review-interior ignores a doubtful nucleus outline, not a doubtful interior;
    committee counts the pixels where the heads disagree."""
    import importlib.util
    from pathlib import Path

    import numpy as np

    spec = importlib.util.spec_from_file_location(
        "review_vs_random", Path(__file__).parents[1] / "benchmarks" / "review_vs_random.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    labels = np.zeros((64, 128), np.uint8)
    labels[20:40, 20:40] = 1  # a nucleus in the left region
    margin = np.ones((64, 128), np.float32)
    margin[bench._edges(labels, 1)] = 0.0  # unsure only on its outline (left region)
    margin[10:18, 80:88] = 0.0  # unsure inside uniform tissue (right region)
    interior = bench._map_scores("review-interior", {"t": (labels, margin)}, [], 1, 64)
    assert interior[("t", 0, 0)] == 0.0 and interior[("t", 64, 0)] == pytest.approx(64 / 4096)
    plain = bench._cell_means(1.0 - margin, 64)
    assert plain[0, 0] > plain[0, 1]  # the plain mean ranks the outline first
    other = labels.copy()
    other[0:8, 64:72] = 1
    committee = bench._map_scores("committee", {"t": (labels, margin)}, [{"t": (other, margin)}], 1, 64)
    assert committee == {("t", 0, 0): 0.0, ("t", 64, 0): pytest.approx(64 / 4096)}


def test_the_uncertainty_map_stays_small_on_a_whole_slide(monkeypatch):
    import numpy as np

    from pdseg_qupath.core.grid import Window
    from pdseg_qupath.learn import review
    from pdseg_qupath.learn.stitch import Strip

    grid = review.ReviewGrid(Window(0, 0, 640, 480, 2.0), 64)  # 16-px cells: 40 × 30 of them
    margin = np.random.default_rng(0).random((480, 640)).astype(np.float32)
    grid.add(Strip(0, np.zeros((480, 640), np.uint8), margin, margin))
    monkeypatch.setattr(review, "MAX_MAP_CELLS", 300)
    cells = [a for a in grid.objects(3, "m", (1280, 960)) if a.object_type == "detection"]
    assert len(cells) <= 300 and sum(c.geometry.area for c in cells) == pytest.approx(1280 * 960)
    mean = sum(c.measurements["pdseg: uncertainty"] * c.geometry.area for c in cells) / (1280 * 960)
    assert mean == pytest.approx(float((1 - margin).mean()), abs=1e-3)


def test_class_weights_rank_a_rare_class_s_doubt_first():
    import numpy as np

    from pdseg_qupath.core.annotations import IGNORE
    from pdseg_qupath.core.grid import Window
    from pdseg_qupath.learn import review
    from pdseg_qupath.learn.stitch import Strip

    labels = np.zeros((64, 128), np.uint8)
    labels[:, 64:] = 1  # right region: predicted class 1, the rare one
    labels[:8, :8] = IGNORE  # no prediction: never counts
    margin = np.full((64, 128), 0.5, np.float32)
    margin[:, :64] = 0.4  # the left region is the less certain one
    ranked = {}
    for weights in (None, [1.0, 2.0]):
        grid = review.ReviewGrid(Window(0, 0, 128, 64, 1.0), 64, weights)
        grid.add(Strip(0, labels, margin, margin))
        ranked[weights is None] = [(round(s, 4), i) for s, i, _ in grid.regions()]
    assert ranked[True] == [(0.6, 0), (0.5, 1)]  # plain: the mean uncertainty over predicted pixels
    assert ranked[False] == [(1.0, 1), (0.6, 0)]  # the rare class's doubt counts twice


def test_predict_keeps_an_edit_saved_by_another_process_mid_run(project, fake_paquo, tmp_path, monkeypatch):
    from pdseg_qupath.learn.options import PredictOptions
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource
    from pdseg_qupath.tasks import predict as task

    from _loop_data import make_folder, train_tiny

    model = train_tiny(make_folder(tmp_path / "train", n=2, size=(48, 48)), tmp_path / "model", epochs=1).model_dir
    qpdata = project / "data" / "2" / "data.qpdata"
    qpdata.write_text(dump_qpdata([]))
    real = task.predict_image

    def predict_while_qupath_saves(*args, **kwargs):
        out = real(*args, **kwargs)
        subprocess.run([sys.executable, "-c", EDIT, str(qpdata)], check=True)  # the pathologist saves now
        return out

    monkeypatch.setattr(task, "predict_image", predict_while_qupath_saves)
    with QuPathProjectSource(project, writable=True) as src:
        result = task.predict(src, model, images=["tile.png"],
                              options=PredictOptions(image_mpp=0.5, tissue_only=False))
    assert not result.failed and result.images[0].write.added > 0
    names = [o.name for o in load_qpdata(qpdata.read_text())]
    assert "drawn mid-run" in names and sum(n.startswith("pdseg") for n in names) == result.images[0].write.added
