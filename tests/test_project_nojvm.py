"""The QuPath project adapter without QuPath: pure helpers, backups, and the adapter on a fake of paquo.

The fake mimics the parts of paquo 0.9 the adapter uses, including its traps (float-only measurements,
class names without ':', read-only mode raising, entry.save() skipping unreadable images), and what QuPath
does to stored objects (coordinates at 0.01 px held as float32, measurements as float32). Saved image data
goes to ``data.qpdata`` as JSON, so a second process can edit it the way QuPath would save an edit. The
same behaviour is checked against a real QuPath in test_project.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, box

from pdseg_qupath.core.annotations import Annotation, is_pdseg_name, prediction_name
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.geometry import clean_geometry
from pdseg_qupath.core.names import UNSAFE_CHARS, output_name, safe_filename
from pdseg_qupath.sources.qupath.backup import (
    ProjectBackup,
    backup_folders,
    latest_backup,
    new_backup_dir,
    prune_backups,
)
from pdseg_qupath.sources.qupath.qpproj import (
    missing_classes,
    mpp_from_builder,
    mpp_from_calibration,
    path_from_file_uri,
    project_file,
    read_server_builders,
    server_problem,
    size_from_builder,
    split_class_name,
)

GROOVY = Path(__file__).resolve().parents[1] / "groovy"


def calibration(value: float, unit: str = "µm") -> dict:
    return {"pixelWidth": {"value": value, "unit": unit}, "pixelHeight": {"value": value, "unit": unit},
            "zSpacing": {"value": 1.0, "unit": "z-slice"}, "timeUnit": "SECONDS", "timepoints": []}


def builder(uri: str, w: int, h: int, mpp: float | None) -> dict:
    cal = calibration(mpp) if mpp else calibration(1.0, "px")
    return {"builderType": "uri", "providerClassName": "qupath.lib.images.servers.bioformats.BioFormatsServerBuilder",
            "uri": uri, "args": [], "metadata": {"width": w, "height": h, "sizeZ": 1, "sizeT": 1,
                                                  "levels": [{"downsample": 1.0, "width": w, "height": h}],
                                                  "pixelCalibration": cal}}


# ---------------------------------------------------------------------------------------- file names


def test_safe_filename_replaces_exactly_the_unsafe_characters():
    assert safe_filename('a/b\\c:d*e?f"g<h>i|j') == "a_b_c_d_e_f_g_h_i_j"
    assert safe_filename("CMU-1 (copy).svs - Series #2 µm") == "CMU-1 (copy).svs - Series #2 µm"
    assert output_name("x:y.svs", ".geojson") == "x_y.svs.geojson"


@pytest.mark.parametrize("script", ["export_annotations.groovy", "import_predictions.groovy"])
def test_groovy_scripts_use_the_same_file_name_rule(script):
    text = (GROOVY / script).read_text(encoding="utf-8")
    m = re.search(r"replaceAll\('((?:[^'\\]|\\.)*)', '_'\)", text)
    assert m, f"{script}: no replaceAll(<regex>, '_') found"
    regex = re.sub(r"\\(.)", r"\1", m.group(1))  # undo Groovy single-quoted string escapes
    names = ["plain.svs", 'all/\\:*?"<>|here', "a b.c-d_e[1](2){3}$^+.tif", "tab\tand ünïcode"]
    for name in names + list(UNSAFE_CHARS):
        assert re.sub(regex, "_", name) == safe_filename(name)
    assert "+ '.geojson'" in text


def test_groovy_scripts_use_pdseg_folders_and_marker():
    export = (GROOVY / "export_annotations.groovy").read_text(encoding="utf-8")
    imp = (GROOVY / "import_predictions.groovy").read_text(encoding="utf-8")
    assert '"annotations"' in export and '"FEATURE_COLLECTION"' in export
    assert '"predictions"' in imp and 'def PDSEG = "pdseg"' in imp
    assert "PathIO.readObjects(file)" in imp and "saveImageData(imageData)" in imp
    assert "addObjects" in imp and "addPathObjects" in imp


def _groovy_env() -> dict[str, str] | None:
    """Environment to run the ``groovy`` command (any Groovy 2.4+ on a JDK), or None if there is none."""
    groovy, java = shutil.which("groovy"), shutil.which("java")
    if not groovy or not java:
        return None
    env = dict(os.environ)
    if not (Path(env.get("JAVA_HOME", "/nonexistent")) / "bin" / "java").exists():
        env["JAVA_HOME"] = str(Path(java).resolve().parents[1])
    return env


@pytest.mark.skipif(_groovy_env() is None, reason="needs the groovy command (apt-get install groovy)")
def test_groovy_scripts_run_against_qupath_stand_ins(tmp_path):
    """Run both scripts under Groovy with stand-ins for QuPath's project, hierarchy and PathIO."""
    harness = Path(__file__).parent / "groovy_harness"
    out = subprocess.run(
        ["groovy", "-cp", str(harness), str(harness / "run.groovy"), str(GROOVY), str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=_groovy_env(),
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, out.stdout + out.stderr
    r = json.loads(line[len("RESULT "):])
    slide = safe_filename("slide a:1/2.svs") + ".geojson"
    assert r["export_all"] == [slide, "b.png.geojson"]  # no image open: every image
    assert r["export_one"] == ["b.png.geojson"]  # Run for project / headless: the current image
    assert [f["properties"]["name"] for f in json.loads(r["export_file"])["features"]] == [
        "mine", "pdseg old", None, "pdseg as written", "pdseg corrected"]
    for key in ("import06", "import04"):  # QuPath 0.6 addObjects, older addPathObjects
        # untouched predictions are replaced; the one the pathologist reclassified stays (it is a label now)
        assert r[key]["names"] == [["mine", None, "pdseg corrected", "pdseg Tumor", "pdseg Necrosis"],
                                   ["pdseg keep: no file for b"]]
        assert r[key]["saves"] == [1, 0] and r[key]["classes"] == ["Tumor", "Necrosis"]
    assert "no predictions file b.png.geojson" in out.stdout
    # batch run on an image whose predictions file is empty: its old pdseg objects go, the others stay
    assert r["import_batch"]["names"] == [["mine", "pdseg old", None, "pdseg as written", "pdseg corrected"], []]
    assert r["import_batch"]["saves"] == [0, 1]


# ------------------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    "uri, path",
    [
        ("file:/home/u/a%20b.svs", Path("/home/u/a b.svs")),
        ("file:///home/u/x.tif", Path("/home/u/x.tif")),
        ("file:/C:/slides/x%C3%BC.svs", Path("C:/slides/xü.svs")),
        ("file://server/share/x.svs", Path("//server/share/x.svs")),
        ("https://omero.example.org/img/1", None),
    ],
)
def test_path_from_file_uri(uri, path):
    assert path_from_file_uri(uri) == path


def test_mpp_from_calibration_accepts_micrometres_only():
    assert mpp_from_calibration(calibration(0.2527)) == pytest.approx(0.2527)
    assert mpp_from_calibration(calibration(0.5, "μm")) == 0.5  # Greek mu, as hand-edited files have it
    assert mpp_from_calibration(calibration(0.5, "um")) == 0.5
    assert mpp_from_calibration(calibration(1.0, "px")) is None  # QuPath's uncalibrated default
    assert mpp_from_calibration(calibration(0.0)) is None
    assert mpp_from_calibration({}) is None and mpp_from_calibration(None) is None
    aniso = calibration(0.5)
    aniso["pixelHeight"]["value"] = 0.7
    assert mpp_from_calibration(aniso) == pytest.approx(0.6)


def test_builder_metadata_plain_and_wrapped():
    b = builder("file:/x.svs", 2220, 2967, 0.499)
    assert mpp_from_builder(b) == pytest.approx(0.499)
    assert size_from_builder(b) == (2220, 2967)
    rotated = {"builderType": "rotated", "rotation": "ROTATE_90", "builder": b}
    assert mpp_from_builder(rotated) == pytest.approx(0.499)
    assert mpp_from_builder(builder("file:/x.png", 10, 10, None)) is None
    assert mpp_from_builder(None) is None and size_from_builder({"metadata": {"width": "?"}}) is None


def test_server_problem_flags_views_that_move_pixels():
    plain = builder("file:/x.svs", 10, 10, 0.5)
    assert server_problem(plain) is None and server_problem(None) is None
    assert server_problem(dict(plain, args=["--series", "0"])) is None
    assert "series 2" in server_problem(dict(plain, args=["--series", "2"]))
    assert "rotated" in server_problem({"builderType": "rotated", "rotation": "ROTATE_90", "builder": plain})
    assert "cropped" in server_problem({"builderType": "cropped", "builder": plain})
    assert server_problem({"builderType": "pyramidize", "builder": plain}) is None  # same pixels


def test_read_server_builders(tmp_path):
    qp = tmp_path / "project.qpproj"
    qp.write_text(json.dumps({"version": "0.6.0", "images": [
        {"serverBuilder": builder("file:/a.svs", 10, 20, 0.25), "entryID": 1, "imageName": "a.svs"},
        {"entryID": 2, "imageName": "broken"},
    ]}), encoding="utf-8")
    builders = read_server_builders(qp)
    assert list(builders) == ["1"] and mpp_from_builder(builders["1"]) == 0.25
    qp.write_text("{not json", encoding="utf-8")
    assert read_server_builders(qp) == {}


def test_project_file(tmp_path):
    with pytest.raises(PdsegError, match="no such QuPath project"):
        project_file(tmp_path)
    (tmp_path / "project.qpproj").write_text("{}")
    assert project_file(tmp_path) == (tmp_path / "project.qpproj").absolute()
    assert project_file(tmp_path / "project.qpproj") == (tmp_path / "project.qpproj").absolute()
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(PdsegError, match="not a QuPath project file"):
        project_file(tmp_path / "x.json")


def test_names_and_classes():
    assert is_pdseg_name("pdseg Tumor") and not is_pdseg_name("Tumor") and not is_pdseg_name(None)
    assert prediction_name(Annotation(box(0, 0, 1, 1), "Tumor")) == "pdseg Tumor"
    assert prediction_name(Annotation(box(0, 0, 1, 1), "Tumor", name="pdseg Tumor #3")) == "pdseg Tumor #3"
    assert prediction_name(Annotation(box(0, 0, 1, 1), None, name="region")) == "pdseg region"
    assert split_class_name("Tumor: Positive") == ["Tumor", "Positive"]
    assert split_class_name("Stroma") == ["Stroma"]
    assert missing_classes(["Tumor"], ["Stroma", None, "Tumor", "Stroma", "Necrosis"]) == ["Stroma", "Necrosis"]


def test_clean_geometry():
    holed = Polygon([(0, 0), (10, 0), (10, 10), (0, 10)], [[(2, 2), (4, 2), (4, 4), (2, 4)]])
    assert clean_geometry(holed) == (holed, "ok")
    fixed, what = clean_geometry(Polygon([(0, 0), (2, 2), (2, 0), (0, 2)]))  # bow-tie
    assert what == "repaired" and fixed.is_valid and fixed.area == pytest.approx(2.0)
    assert clean_geometry(Point(1, 1)) == (None, "point")
    assert clean_geometry(LineString([(0, 0), (1, 1)])) == (None, "line")
    assert clean_geometry(Polygon()) == (None, "empty")
    mixed = Point(0, 0).union(box(0, 0, 1, 1)).union(LineString([(5, 5), (6, 6)]))
    geom, what = clean_geometry(mixed)
    assert what == "ok" and geom.area == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------- backups


def test_backup_copies_once_before_changes(tmp_path):
    proj = tmp_path / "proj"
    (proj / "data" / "1").mkdir(parents=True)
    (proj / "data" / "2").mkdir(parents=True)
    (proj / "classifiers").mkdir()
    (proj / "project.qpproj").write_text("original project")
    (proj / "classifiers" / "classes.json").write_text('{"pathClasses": []}')
    (proj / "data" / "1" / "data.qpdata").write_bytes(b"one")
    (proj / "data" / "2" / "data.qpdata").write_bytes(b"two")
    b = ProjectBackup(proj)
    folder = b.ensure(proj / "data" / "1")
    assert folder.parent == proj / "pdseg" / "backups"
    (proj / "data" / "1" / "data.qpdata").write_bytes(b"changed")
    (proj / "project.qpproj").write_text("changed project")
    assert b.ensure(proj / "data" / "1") == folder  # same session: the first copy is kept
    assert b.ensure(proj / "data" / "2") == folder
    assert (folder / "data" / "1" / "data.qpdata").read_bytes() == b"one"
    assert (folder / "data" / "2" / "data.qpdata").read_bytes() == b"two"
    assert (folder / "project.qpproj").read_text() == "original project"
    assert (folder / "classifiers" / "classes.json").is_file()
    assert ProjectBackup(proj).ensure() != folder  # a new session gets a new folder


def test_new_backup_dir_never_reuses_a_folder(tmp_path):
    from datetime import datetime

    when = datetime(2025, 1, 2, 3, 4, 5)
    a, b = new_backup_dir(tmp_path, when), new_backup_dir(tmp_path, when)
    assert a.name == "20250102-030405" and b.name == "20250102-030405-2"


def test_backup_failure_is_a_clear_error(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "project.qpproj").write_text("{}")

    def fail(*a: Any, **k: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("shutil.copy2", fail)
    with pytest.raises(PdsegError, match="nothing was written"):
        ProjectBackup(proj).ensure()


def _backups(proj: Path, folders: dict[str, dict[str, str]]) -> Path:
    """``pdseg/backups/<name>/data/<entry>/data.qpdata`` with the given texts (names as pdseg gives them)."""
    root = proj / "pdseg" / "backups"
    for name, entries in folders.items():
        (root / name).mkdir(parents=True)
        (root / name / "project.qpproj").write_text("{}")
        for entry, text in entries.items():
            (root / name / "data" / entry).mkdir(parents=True)
            (root / name / "data" / entry / "data.qpdata").write_text(text)
    return root


def test_prune_backups_keeps_the_newest_this_sessions_and_each_images_newest(tmp_path):
    proj = tmp_path / "proj"
    root = _backups(proj, {
        "20250101-090000": {"7": "image 7, written only in this old session"},
        "20250102-090000": {"1": "one, day 2", "3": "three, day 2"},
        "20250103-090000": {"1": "one, day 3"},  # this session's (another run is newer)
        "20250104-090000": {"1": "one, day 4"},
        "20250105-090000": {"1": "one, day 5", "3": ""},  # an empty copy does not count as holding image 3
        "20250106-090000": {"1": "one, day 6"},
        "20250106-090000-2": {"1": "one, day 6, second"},
        "20250106-090000-10": {"1": "one, day 6, tenth"},  # -10 sorts after -2
    })
    # what pdseg did not make: never touched
    (root / "notes.txt").write_text("mine")
    (root / "my copy").mkdir()
    (root / "20251399-000000").mkdir()  # the pattern but no date
    (root / "20250101-000000.zip").write_text("an archive")
    outside = tmp_path / "outside" / "20240101-000000"
    outside.mkdir(parents=True)
    (outside / "keep.txt").write_text("not pdseg's")
    (root / "20240101-000000").symlink_to(outside, target_is_directory=True)
    (proj / "pdseg" / "writes.json").write_text("{}")
    (proj / "pdseg" / "predictions").mkdir()
    (proj / "pdseg" / "predictions" / "a.geojson").write_text("{}")
    before = {e: latest_backup(proj, proj / "data" / e) for e in ("1", "3", "7")}
    assert [f.name for f in backup_folders(proj)][-3:] == ["20250106-090000", "20250106-090000-2",
                                                           "20250106-090000-10"]

    report = prune_backups(proj, keep=2, current=root / "20250103-090000")

    assert sorted(report.removed) == ["20250104-090000", "20250105-090000", "20250106-090000"]
    assert [f.name for f in backup_folders(proj)] == ["20250101-090000", "20250102-090000", "20250103-090000",
                                                      "20250106-090000-2", "20250106-090000-10"]
    assert report.kept == 5 and not report.failed
    assert {e: latest_backup(proj, proj / "data" / e) for e in ("1", "3", "7")} == before  # restores still found
    assert before["7"].read_text() == "image 7, written only in this old session"
    assert before["3"].read_text() == "three, day 2"
    assert (root / "notes.txt").read_text() == "mine" and (root / "my copy").is_dir()
    assert (root / "20251399-000000").is_dir() and (root / "20250101-000000.zip").is_file()
    assert (outside / "keep.txt").read_text() == "not pdseg's" and (root / "20240101-000000").is_symlink()
    assert (proj / "pdseg" / "writes.json").is_file() and (proj / "pdseg" / "predictions" / "a.geojson").is_file()
    msg = report.message(2)
    assert msg.startswith("pdseg/backups: deleted 3 older backup folder(s) (20250104-090000 … 20250106-090000)")
    assert "kept 5" in msg and "--keep-backups 0 keeps all" in msg


def test_prune_backups_zero_or_enough_keeps_all(tmp_path):
    proj = tmp_path / "proj"
    names = [f"2025010{d}-090000" for d in range(1, 6)]
    _backups(proj, {n: {"1": n} for n in names})
    for keep in (0, 5, 6):
        report = prune_backups(proj, keep=keep, current=None)
        assert (report.removed, report.failed, report.message(keep)) == ([], [], None)
        assert [f.name for f in backup_folders(proj)] == names
    assert prune_backups(proj, keep=1, current=None).removed == names[:-1]


def test_prune_backups_warns_instead_of_failing(tmp_path, monkeypatch):
    import shutil

    proj = tmp_path / "proj"
    _backups(proj, {f"2025010{d}-090000": {"1": str(d)} for d in range(1, 5)})
    real = shutil.rmtree

    def refuse_one(path: Any, *a: Any, **k: Any) -> None:
        if Path(path).name == "20250102-090000":
            raise PermissionError(13, "Permission denied")
        real(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", refuse_one)
    report = prune_backups(proj, keep=1, current=None)
    assert report.removed == ["20250101-090000", "20250103-090000"]
    assert len(report.failed) == 1 and "20250102-090000" in report.failed[0] and "Permission denied" in report.failed[0]
    assert [f.name for f in backup_folders(proj)] == ["20250102-090000", "20250104-090000"]


# ----------------------------------------------------------------------------- a fake of paquo 0.9


class FakeColor(tuple):
    def to_rgb(self) -> tuple[int, int, int]:
        return (self[0], self[1], self[2])


class FakePathClass:
    def __init__(self, name: str, color: Any = None, parent: "FakePathClass | None" = None) -> None:
        if not isinstance(name, str):
            raise TypeError(name)
        if ":" in name or "\n" in name:
            raise ValueError("PathClass names cannot contain ':' or '\\n'")
        self.name, self.parent = name, parent
        self.color = FakeColor(color[:3]) if color is not None else FakeColor((9, 9, 9))
        self.java_object = self  # stands for QuPath's PathClass

    @property
    def id(self) -> str:
        return f"{self.parent.id}: {self.name}" if self.parent else self.name


class FloatMeasurements(dict):
    def __setitem__(self, k: str, v: float) -> None:
        if not isinstance(v, float):
            raise TypeError(f"value must be float, got: {type(v).__name__}")
        super().__setitem__(k, v)

    def update(self, other: Any = (), **kw: Any) -> None:  # type: ignore[override]
        for k, v in dict(other, **kw).items():
            self[k] = v


def _as_stored(geom: Any) -> Any:
    """What QuPath keeps of a ROI: coordinates on its 0.01-px precision grid, held as float32."""
    return shapely.transform(shapely.set_precision(geom, 0.01), lambda c: c.astype(np.float32).astype(np.float64))


class FakeROI:
    def __init__(self, geom: Any) -> None:
        self.geom = geom

    def getGeometry(self) -> "FakeJTS":
        return FakeJTS(self.geom)


class FakeJTS:
    def __init__(self, geom: Any) -> None:
        self.geom = geom


class FakeJavaAnnotation:
    """What PathObjects.createAnnotationObject returns (a Java object in paquo)."""

    def __init__(self, roi: FakeROI, java_class: Any) -> None:
        self.roi, self.java_class = roi, java_class


class FakeAnnotationObject:
    _next = 0

    def __init__(self, roi: Any, path_class: Any = None, name: str | None = None, uid: str | None = None) -> None:
        if isinstance(roi, FakeJavaAnnotation):  # paquo: QuPathPathAnnotationObject(java_object)
            roi, path_class = roi.roi.geom, roi.java_class
        FakeAnnotationObject._next += 1
        uid = uid or f"00000000-0000-4000-8000-{FakeAnnotationObject._next:012d}"
        self.roi, self.path_class, self.name, self.locked = roi, path_class, name, False
        self.measurements = FloatMeasurements()
        self.java_object = types.SimpleNamespace(getID=lambda: uid, getColor=lambda: None,
                                                 getROI=lambda: FakeROI(self.roi))

    @classmethod
    def from_shapely(cls, roi: Any, path_class: Any = None, measurements: Any = None) -> "FakeAnnotationObject":
        if path_class is not None and not isinstance(path_class, FakePathClass):
            raise AttributeError("'str' object has no attribute 'java_object'")  # paquo: class must be an object
        obj = cls(roi, path_class)
        if measurements is not None:
            obj.measurements.update(measurements)
        return obj


class FakeDetectionObject(FakeAnnotationObject):
    """paquo's QuPathPathDetectionObject (a detection: the uncertainty map)."""


class FakeJava:
    """paquo.java: the QuPath and JTS classes the adapter uses for geometry."""

    @staticmethod
    def JClass(name: str) -> Any:
        assert name == "qupath.lib.regions.ImagePlane", name
        return FakeJava.ImagePlane

    class GeometryTools:
        @staticmethod
        def getDefaultFactory() -> str:
            return "qupath-default-factory"

        @staticmethod
        def geometryToROI(jts: FakeJTS, plane: Any) -> FakeROI:
            assert plane == "default-plane"
            return FakeROI(_as_stored(jts.geom))

    class ImagePlane:
        @staticmethod
        def getDefaultPlane() -> str:
            return "default-plane"

    class PathObjects:
        @staticmethod
        def createAnnotationObject(roi: FakeROI, java_class: Any) -> FakeJavaAnnotation:
            return FakeJavaAnnotation(roi, java_class)

        @staticmethod
        def createDetectionObject(roi: FakeROI, java_class: Any) -> FakeJavaAnnotation:
            return FakeJavaAnnotation(roi, java_class)

    class WKBReader:
        def __init__(self, factory: Any = None) -> None:
            assert factory == "qupath-default-factory", "build ROIs with QuPath's default geometry factory"

        def read(self, data: bytes) -> FakeJTS:
            return FakeJTS(shapely.from_wkb(data))

    class WKBWriter:
        def __init__(self, dims: int = 2) -> None:
            assert dims == 2

        def write(self, jts: FakeJTS) -> bytes:
            return shapely.to_wkb(jts.geom)


def dump_qpdata(objects: list, detections: list = ()) -> str:
    """The fake's data.qpdata: the objects as QuPath would keep them (float32 measurements)."""
    def one(o: Any) -> dict:
        return {"wkb": shapely.to_wkb(o.roi, hex=True), "id": o.java_object.getID(), "name": o.name,
                "class": [o.path_class.id, list(o.path_class.color)] if o.path_class is not None else None,
                "measurements": {k: float(np.float32(v)) for k, v in o.measurements.items()}}
    return json.dumps({"fake-qpdata": [one(o) for o in objects], "detections": [one(o) for o in detections]})


def load_qpdata(text: str, key: str = "fake-qpdata") -> list | None:
    try:
        data = json.loads(text)[key]
    except (ValueError, TypeError, KeyError):
        return None
    kind = FakeDetectionObject if key == "detections" else FakeAnnotationObject
    out = []
    for d in data:
        pc = None
        if d["class"]:
            *parents, leaf = d["class"][0].split(": ")
            parent = None
            for part in parents:
                parent = FakePathClass(part, parent=parent)
            pc = FakePathClass(leaf, d["class"][1], parent)
        o = kind(shapely.from_wkb(d["wkb"]), pc, d["name"], d["id"])
        dict.update(o.measurements, d["measurements"])
        out.append(o)
    return out


class FakeImageData:
    def __init__(self, objects: list, detections: list = ()) -> None:
        self.hierarchy = FakeHierarchy(objects, readonly=False, detections=detections)

    def getHierarchy(self) -> "FakeHierarchy":
        return self.hierarchy

    def isChanged(self) -> bool:
        return self.hierarchy.changed


class FakeProxy(list):
    def __init__(self, items: list, hierarchy: "FakeHierarchy", kind: type | None = None) -> None:
        super().__init__(items)
        self._h, self._kind = hierarchy, kind

    def add(self, x: Any) -> None:
        if self._h.readonly:
            raise OSError("project in readonly mode")
        if self._kind is FakeDetectionObject and not isinstance(x, FakeDetectionObject):
            raise TypeError("requires QuPathPathDetectionObject")
        if self._kind is None and (not isinstance(x, FakeAnnotationObject) or isinstance(x, FakeDetectionObject)):
            raise TypeError("requires QuPathPathAnnotationObject")
        self.append(x)
        self._h.changed = True

    def discard(self, x: Any) -> None:
        if self._h.readonly:
            raise OSError("project in readonly mode")
        self.remove(x)
        self._h.changed = True


class FakeHierarchy:
    def __init__(self, objects: list, readonly: bool, detections: Any = ()) -> None:
        self.readonly, self.changed, self.flushes = readonly, False, 0
        self.annotations = FakeProxy(objects, self)
        self.detections = FakeProxy(list(detections), self, FakeDetectionObject)

    @contextmanager
    def no_autoflush(self):
        yield self
        self.flushes += 1


class FakeServer:
    def __init__(self, w: int, h: int, mpp: float | None) -> None:
        self.w, self.h, self.mpp = w, h, mpp

    def getWidth(self) -> int:
        return self.w

    def getHeight(self) -> int:
        return self.h

    def getMetadata(self) -> Any:
        mpp = self.mpp
        cal = types.SimpleNamespace(hasPixelSizeMicrons=lambda: mpp is not None,
                                    getPixelWidthMicrons=lambda: mpp if mpp else float("nan"),
                                    getPixelHeightMicrons=lambda: mpp if mpp else float("nan"))
        return types.SimpleNamespace(getPixelCalibration=lambda: cal)


class FakeEntry:
    def __init__(self, project: "FakeProject", rec: dict) -> None:
        self._p, self._rec = project, rec
        self.image_name, self.uri, self.entry_id = rec["name"], rec["uri"], rec["id"]
        self.entry_path = project.dir / "data" / str(rec["id"])
        self._hierarchy: FakeHierarchy | None = None
        self.java_object = types.SimpleNamespace(readHierarchy=lambda: self._stored(), readImageData=self._read,
                                                 saveImageData=self._write)

    def _stored(self) -> list:
        """The objects as saved: data.qpdata when the fake wrote it (or another process did), else the start."""
        try:
            loaded = load_qpdata((self.entry_path / "data.qpdata").read_text())
        except OSError:
            loaded = None
        return loaded if loaded is not None else [self._copy(o) for o in self._rec["objects"]]

    def _read(self) -> FakeImageData:
        if not self.is_readable():
            raise RuntimeError("ImageData of a missing image")
        try:
            detections = load_qpdata((self.entry_path / "data.qpdata").read_text(), "detections") or []
        except OSError:
            detections = []
        return FakeImageData(self._stored(), detections)

    def _write(self, data: FakeImageData) -> None:
        if self._p.readonly:
            raise OSError("project in readonly mode")
        objects = list(data.hierarchy.annotations)
        (self.entry_path / "data.qpdata").write_text(dump_qpdata(objects, list(data.hierarchy.detections)))
        self._rec["objects"] = [self._copy(o) for o in objects]
        self._rec["saves"] = self._rec.get("saves", 0) + 1
        data.hierarchy.changed = False

    @property
    def hierarchy(self) -> FakeHierarchy:
        if self._hierarchy is None:
            if not self._p.readonly and not self.is_readable():
                raise TypeError("ImageData of a missing image")  # what may happen in QuPath 0.6
            self._hierarchy = FakeHierarchy(self._stored(), self._p.readonly)
        return self._hierarchy

    @staticmethod
    def _copy(o: FakeAnnotationObject) -> FakeAnnotationObject:
        c = FakeAnnotationObject(o.roi, o.path_class, o.name, o.java_object.getID())
        dict.update(c.measurements, o.measurements)
        return c

    def is_readable(self) -> bool:
        return Path(self.uri[len("file:"):]).is_file()

    @property
    def _image_server(self) -> FakeServer:
        if not self.is_readable():
            raise RuntimeError("paquo fallback: PathIO.readImageData signature missing")
        return FakeServer(*self._rec["server"])

    @property
    def width(self) -> int:
        return int(self._image_server.getWidth())

    @property
    def height(self) -> int:
        return int(self._image_server.getHeight())

    def is_changed(self) -> bool:
        return self.hierarchy.changed

    def save(self) -> None:
        if self._p.readonly:
            raise OSError("project in readonly mode")
        if self.is_readable() and self.is_changed():
            self._write(types.SimpleNamespace(hierarchy=self.hierarchy))


def _packed(color: Any) -> int | None:
    """QuPath's packed ARGB int of an RGB colour (as classes.json stores it), signed like a Java int."""
    if color is None:
        return None
    r, g, b = (int(v) for v in color)
    return (255 << 24 | r << 16 | g << 8 | b) - (1 << 32)


class FakeProject:
    store: dict[Path, dict] = {}

    def __init__(self, path: Any, mode: str = "r") -> None:
        p = Path(path)
        if p.suffix != ".qpproj":
            p = p / "project.qpproj"
        if not p.is_file():
            raise FileNotFoundError(p)
        self.dir, self.readonly = p.parent, mode == "r"
        self._state = FakeProject.store[self.dir]
        self.images = [FakeEntry(self, rec) for rec in self._state["images"]]
        self._project_json = p.read_text(encoding="utf-8")  # QuPath keeps the image list it read in memory

    @property
    def path_classes(self) -> tuple:
        return tuple(self._state["classes"])

    @path_classes.setter
    def path_classes(self, pcs: Any) -> None:
        if self.readonly:
            raise AttributeError("project in readonly mode")
        self._state["classes"] = list(pcs)
        self._state["class_writes"] = self._state.get("class_writes", 0) + 1
        # QuPath's setPathClasses writes classifiers/classes.json at once, from exactly this list
        saved = [{"name": pc.id, "color": _packed(pc.color)} for pc in pcs]
        (self.dir / "classifiers" / "classes.json").write_text(json.dumps({"pathClasses": saved}))

    def save(self, images: bool = True) -> None:
        if self.readonly:
            raise OSError("project in readonly mode")
        if images:
            for e in self.images:
                e.save()
        self._state["project_saves"] = self._state.get("project_saves", 0) + 1
        (self.dir / "project.qpproj").write_text(self._project_json, encoding="utf-8")  # syncChanges()


@pytest.fixture
def fake_paquo(monkeypatch):
    mods = {
        "paquo.projects": types.SimpleNamespace(QuPathProject=FakeProject),
        "paquo.classes": types.SimpleNamespace(QuPathPathClass=FakePathClass),
        "paquo.pathobjects": types.SimpleNamespace(QuPathPathAnnotationObject=FakeAnnotationObject,
                                                   QuPathPathDetectionObject=FakeDetectionObject),
        "paquo.hierarchy": types.SimpleNamespace(
            QuPathPathObjectHierarchy=lambda h, readonly, image_name: h if isinstance(h, FakeHierarchy)
            else FakeHierarchy(h, readonly)
        ),
        "paquo.java": FakeJava,
        "paquo.images": types.SimpleNamespace(QuPathImageType=types.SimpleNamespace(BRIGHTFIELD_H_E="BRIGHTFIELD_H_E")),
    }
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(FakeProject, "store", {})
    return FakeProject.store


HOLED = Polygon([(10, 10), (110, 10), (110, 110), (10, 110)], [[(40, 40), (60, 40), (60, 60), (40, 60)]])


@pytest.fixture
def project(tmp_path, fake_paquo):
    """A project with a calibrated slide, a PNG, and an image whose file has gone."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "slide.tif").write_bytes(b"not really a tiff")
    Image.new("RGB", (64, 48), "white").save(images / "tile.png")
    proj = tmp_path / "proj"
    (proj / "classifiers").mkdir(parents=True)
    tumor, stroma = FakePathClass("Tumor", (200, 0, 0)), FakePathClass("Stroma", (150, 200, 150))
    user = [
        FakeAnnotationObject(HOLED, tumor, "my tumour", "11111111-1111-4111-8111-111111111111"),
        FakeAnnotationObject(box(200, 0, 300, 50), stroma, None, "22222222-2222-4222-8222-222222222222"),
        FakeAnnotationObject(box(0, 200, 10, 210), None, "unclassified"),
        FakeAnnotationObject(Polygon([(0, 0), (2, 2), (2, 0), (0, 2)]), tumor, "bow-tie"),
        FakeAnnotationObject(Point(5, 5), tumor, "a point"),
        FakeAnnotationObject(LineString([(0, 0), (9, 9)]), stroma, "a line"),
    ]
    dict.update(user[0].measurements, {"Area µm^2": 1.5})
    recs = [
        {"id": 1, "name": "slide.tif", "uri": f"file:{images / 'slide.tif'}", "server": (1000, 800, 0.25),
         "objects": user},
        {"id": 2, "name": "tile.png", "uri": f"file:{images / 'tile.png'}", "server": (64, 48, None),
         "objects": []},
        {"id": 3, "name": "gone.svs", "uri": f"file:{images / 'gone.svs'}", "server": (0, 0, None),
         "objects": [FakeAnnotationObject(box(0, 0, 5, 5), stroma, "kept")]},
    ]
    qpproj = {"version": "0.6.0", "images": [
        {"serverBuilder": builder(recs[0]["uri"], 1000, 800, 0.25), "entryID": 1, "imageName": "slide.tif"},
        {"serverBuilder": builder(recs[1]["uri"], 64, 48, None), "entryID": 2, "imageName": "tile.png"},
        {"serverBuilder": builder(recs[2]["uri"], 4000, 3000, 0.5), "entryID": 3, "imageName": "gone.svs"},
    ]}
    (proj / "project.qpproj").write_text(json.dumps(qpproj), encoding="utf-8")
    (proj / "classifiers" / "classes.json").write_text('{"pathClasses": []}')
    for rec in recs:
        (proj / "data" / str(rec["id"])).mkdir(parents=True)
        (proj / "data" / str(rec["id"]) / "data.qpdata").write_text("original")
    fake_paquo[proj] = {"images": recs, "classes": [tumor, stroma]}
    return proj


def test_no_qupath_is_a_clear_error(tmp_path, monkeypatch):
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource

    (tmp_path / "project.qpproj").write_text("{}")
    monkeypatch.setitem(sys.modules, "paquo.projects", None)  # import fails as without QuPath
    with pytest.raises(PdsegError, match="PAQUO_QUPATH_DIR") as e:
        QuPathProjectSource(tmp_path)
    assert "export_annotations.groovy" in str(e.value)


def test_images_pixel_sizes_and_missing_file(project):
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource

    src = QuPathProjectSource(project)
    slide, tile, gone = src.images()
    assert (slide.name, slide.width, slide.height, slide.mpp, slide.error) == ("slide.tif", 1000, 800, 0.25, None)
    assert slide.path == project.parent / "images" / "slide.tif"
    assert tile.mpp is None and tile.error is None and (tile.width, tile.height) == (64, 48)
    assert gone.error and "not found" in gone.error and "Update URIs" in gone.error
    assert (gone.width, gone.height, gone.mpp) == (4000, 3000, 0.5)  # from project.qpproj


def test_read_annotations(project):
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource

    src = QuPathProjectSource(project)
    slide = src.images()[0]
    anns, report = src.read_annotations(slide)
    assert [a.classification for a in anns] == ["Tumor", "Stroma", None, "Tumor"]
    tumour = anns[0]
    assert tumour.geometry.area == pytest.approx(100 * 100 - 20 * 20)
    assert tumour.id == "11111111-1111-4111-8111-111111111111" and tumour.name == "my tumour"
    assert tumour.color == (200, 0, 0) and tumour.measurements == {"Area µm^2": 1.5}
    assert anns[3].geometry.is_valid
    assert (report.read, report.repaired, report.skipped_points, report.skipped_lines) == (4, 1, 1, 1)
    assert src.class_colors() == {"Tumor": (200, 0, 0), "Stroma": (150, 200, 150)}
    # a moved image's objects can still be read (they live in the project, not in the slide)
    gone_anns, _ = src.read_annotations(src.images()[2])
    assert [a.name for a in gone_anns] == ["kept"]


def test_write_requires_writable(project):
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource

    src = QuPathProjectSource(project)
    with pytest.raises(PdsegError, match="read-only"):
        src.write_predictions(src.images()[0], [Annotation(box(0, 0, 1, 1), "Tumor")])


def test_writable_reads_a_moved_image_from_its_data_file(project):
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource

    src = QuPathProjectSource(project, writable=True)
    anns, _ = src.read_annotations(src.images()[2])
    assert [a.name for a in anns] == ["kept"]


def predictions(n: int) -> list[Annotation]:
    out = [
        Annotation(MultiPolygon([box(0, 0, 10, 10), box(20, 20, 30, 30)]), "Tumor", color=(200, 0, 0),
                   name="pdseg Tumor", measurements={"pdseg area µm²": 12, "pdseg mean probability": 0.9}),
        Annotation(box(400, 400, 500, 500), "Necrosis", color=(50, 50, 50), measurements={"pdseg area µm²": 625.0}),
        Annotation(box(600, 400, 700, 500), "Tumor: Positive", color=(250, 0, 0)),
    ]
    return out[:n]


def test_write_predictions_twice_replaces_only_pdseg_objects(project, fake_paquo):
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource

    before, _ = QuPathProjectSource(project).read_annotations(QuPathProjectSource(project).images()[0])
    with QuPathProjectSource(project, writable=True) as src:
        slide, tile, gone = src.images()
        r1 = src.write_predictions(slide, predictions(3))
        r2 = src.write_predictions(slide, predictions(2))
        with pytest.raises(PdsegError, match="cannot open the image file"):
            src.write_predictions(gone, predictions(1))
    assert (r1.removed, r1.added, r1.kept) == (0, 3, 6)
    assert (r2.removed, r2.added, r2.kept) == (3, 2, 6)
    assert r1.backup == r2.backup and r1.backup.parent == project / "pdseg" / "backups"
    assert (r1.backup / "data" / "1" / "data.qpdata").read_text() == "original"
    assert (r1.backup / "project.qpproj").is_file() and (r1.backup / "classifiers" / "classes.json").is_file()
    assert not (r1.backup / "data" / "2").exists()  # only what was written is backed up

    state = fake_paquo[project]
    assert [pc.id for pc in state["classes"]] == ["Tumor", "Stroma", "Necrosis", "Tumor: Positive"]
    assert state["class_writes"] == 1  # grown once, existing class objects kept
    assert state["images"][1].get("saves") is None and state["images"][2].get("saves") is None

    src = QuPathProjectSource(project)
    after, report = src.read_annotations(src.images()[0])
    mine = [a for a in after if a.is_pdseg]
    users = [a for a in after if not a.is_pdseg]
    assert [(a.name, a.classification) for a in mine] == [("pdseg Tumor", "Tumor"), ("pdseg Necrosis", "Necrosis")]
    assert mine[0].measurements["pdseg area µm²"] == 12.0
    assert mine[0].measurements["pdseg mean probability"] == pytest.approx(0.9)  # QuPath keeps float32
    assert [a.role for a in mine] == ["untouched", "untouched"]  # the fingerprint survives storage
    assert mine[0].geometry.geom_type == "MultiPolygon"
    assert [(a.id, a.name, a.classification) for a in users] == [(a.id, a.name, a.classification) for a in before]
    assert all(u.geometry.equals(b.geometry) for u, b in zip(users, before))


def test_project_changes_saved_by_qupath_during_a_run_are_kept(project, fake_paquo):
    """QuPath (still open) adds an image and a class while pdseg runs: pdseg's write-back must not undo them."""
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource

    with QuPathProjectSource(project, writable=True) as src:
        slide = src.images()[0]
        qpproj = json.loads((project / "project.qpproj").read_text())
        qpproj["images"].append({"serverBuilder": builder("file:/elsewhere/new.svs", 10, 10, 0.5), "entryID": 4,
                                 "imageName": "new.svs"})
        (project / "project.qpproj").write_text(json.dumps(qpproj))  # saved by QuPath mid-run
        (project / "classifiers" / "classes.json").write_text(json.dumps(
            {"pathClasses": [{"name": "Immune cells", "color": _packed((160, 90, 160))}]}))
        report = src.write_predictions(slide, predictions(3))
    assert report.added == 3
    assert json.loads((project / "project.qpproj").read_text()) == qpproj  # the new image is still listed
    saved = json.loads((project / "classifiers" / "classes.json").read_text())["pathClasses"]
    names = [c["name"] for c in saved]
    assert names[:2] == ["Tumor", "Stroma"] and "Immune cells" in names and "Necrosis" in names
    immune = next(c for c in saved if c["name"] == "Immune cells")
    assert immune["color"] == _packed((160, 90, 160))  # QuPath's colour, not pdseg's default


def test_read_saved_classes(tmp_path):
    from pdseg_qupath.sources.qupath.qpproj import read_saved_classes

    assert read_saved_classes(tmp_path) == {}
    (tmp_path / "classifiers").mkdir()
    (tmp_path / "classifiers" / "classes.json").write_text(json.dumps({"pathClasses": [
        {"name": "Tumor", "color": _packed((200, 0, 0))}, {"name": "Tumor: Positive"}, {"name": ""}, {"x": 1}]}))
    assert read_saved_classes(tmp_path) == {"Tumor": (200, 0, 0), "Tumor: Positive": None}
    (tmp_path / "classifiers" / "classes.json").write_text("{broken")
    assert read_saved_classes(tmp_path) == {}


def test_prediction_objects_always_carry_the_marker(project, fake_paquo):
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource

    with QuPathProjectSource(project, writable=True) as src:
        slide = src.images()[0]
        src.write_predictions(slide, [Annotation(box(0, 0, 5, 5), "Stroma", name="unmarked")])
        report = src.write_predictions(slide, [])
    assert report.removed == 1 and report.added == 0  # the unmarked name was prefixed, so it was ours


def test_open_source_dispatches_to_project(project):
    from pdseg_qupath.sources.base import AnnotationSource
    from pdseg_qupath.sources.inputs import open_source
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource

    src = open_source(project / "project.qpproj")
    assert isinstance(src, QuPathProjectSource) and isinstance(src, AnnotationSource)


def test_close_without_writes_saves_nothing(project, fake_paquo):
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource

    with QuPathProjectSource(project, writable=True) as src:
        for rec in src.images():
            src.read_annotations(rec)
    assert "project_saves" not in fake_paquo[project]
    assert not (project / "pdseg").exists()  # no backup either: nothing was about to change


def test_rotated_view_is_an_error_for_that_image_only(project):
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource

    qpproj = project / "project.qpproj"
    data = json.loads(qpproj.read_text(encoding="utf-8"))
    data["images"][0]["serverBuilder"] = {"builderType": "rotated", "rotation": "ROTATE_180",
                                          "builder": data["images"][0]["serverBuilder"]}
    qpproj.write_text(json.dumps(data), encoding="utf-8")
    slide, tile, _ = QuPathProjectSource(project).images()
    assert slide.error and "rotated" in slide.error and slide.mpp == 0.25
    assert tile.error is None


# ------------------------------------------------------------------------- backups pruned by predict


def _predict_with_a_stub(project: Path, monkeypatch, keep: int, fail: str | None = None) -> list[tuple[str, str]]:
    """``predict`` into the fake project (tile.png, slide.tif) with a stand-in model; the messages it gave."""
    from pdseg_qupath.core.events import Events
    from pdseg_qupath.learn.inference import ImagePrediction
    from pdseg_qupath.learn.options import IOConfig, PredictOptions
    from pdseg_qupath.sources.qupath.project import QuPathProjectSource
    from pdseg_qupath.tasks import predict as task

    model = types.SimpleNamespace(name="stub", model_id="0123456789abcdef", io=IOConfig(0.5, 32, 8),
                                  class_map=types.SimpleNamespace(names=["Tumor"]), features={})
    monkeypatch.setattr(task, "open_predictor", lambda *a, **k: types.SimpleNamespace(
        model=model, label="stub", extractor=types.SimpleNamespace(precision="fp32", summary=lambda: "fp32 features")))

    class Slide:
        mpp, width, height = 0.5, 64, 48

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(task, "open_slide", lambda *a, **k: Slide())
    monkeypatch.setattr(task, "predict_image", lambda slide, predictor, **k: ImagePrediction(
        "x", [Annotation(box(0, 0, 8, 8), "Tumor")], [], None, 1, 0.0, None))
    messages: list[tuple[str, str]] = []

    class Log(Events):
        def message(self, text: str, level: str = "info") -> None:
            messages.append((level, text))

    with QuPathProjectSource(project, writable=True) as src:
        if fail:
            real = src.write_predictions

            def write(image, anns):
                if image.name == fail:
                    raise PdsegError(f"{image.name}: refused")
                return real(image, anns)

            monkeypatch.setattr(src, "write_predictions", write)
        task.predict(src, "stub-model", images=["slide.tif", "tile.png"],
                     options=PredictOptions(image_mpp=0.5, keep_backups=keep), events=Log())
    return messages


def test_predict_prunes_old_backups_after_a_successful_write_back(project, monkeypatch):
    old = [f"2025010{d}-090000" for d in range(1, 5)]
    _backups(project, {name: {"1": name} for name in old[:-1]} | {old[-1]: {"1": old[-1], "3": "gone.svs"}})
    (project / "pdseg" / "notes.txt").write_text("mine")

    messages = _predict_with_a_stub(project, monkeypatch, keep=2)
    left = [f.name for f in backup_folders(project)]
    assert len(left) == 2 and left[0] == old[-1]  # the newest two: the last old one and this session's
    assert (project / "pdseg" / "backups" / left[1] / "data" / "1" / "data.qpdata").read_text() == "original"
    assert (project / "pdseg" / "notes.txt").read_text() == "mine"
    notes = [t for lvl, t in messages if "older backup folder" in t]
    assert notes == ["pdseg/backups: deleted 3 older backup folder(s) (20250101-090000 … 20250103-090000); kept 2: "
                     "the newest 2 and the newest one holding each image (--keep-backups 0 keeps all)"]
    assert [lvl for lvl, t in messages if t in notes] == ["note"]

    # a later run with --keep-backups 1 still keeps the only backup of image 3 (gone.svs, never written since)
    _predict_with_a_stub(project, monkeypatch, keep=1)
    assert [f.name for f in backup_folders(project)][0] == old[-1] and len(backup_folders(project)) == 2


def test_predict_keeps_every_backup_with_zero_or_after_a_failed_write_back(project, monkeypatch):
    old = [f"2025010{d}-090000" for d in range(1, 5)]
    _backups(project, {name: {"1": name} for name in old})
    messages = _predict_with_a_stub(project, monkeypatch, keep=1, fail="tile.png")
    assert [f.name for f in backup_folders(project)][:4] == old and len(backup_folders(project)) == 5
    assert not [t for _, t in messages if "older backup folder" in t]
    assert any(lvl == "error" and "not written back" in t for lvl, t in messages)
    _predict_with_a_stub(project, monkeypatch, keep=0)
    assert [f.name for f in backup_folders(project)][:4] == old and len(backup_folders(project)) == 6
