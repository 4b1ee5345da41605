"""QuPath GeoJSON reader/writer: every input form QuPath reads, repairs, skips, and lossless round trips."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapely.geometry import MultiPolygon, Point, Polygon

from pdseg_qupath.core.annotations import Annotation, default_color
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.sources.qupath.geojson import (
    annotation_to_feature,
    parse_geojson,
    read_geojson,
    write_geojson,
)

FIX = Path(__file__).parent / "fixtures" / "geojson"
GBM = Path(__file__).parent / "fixtures" / "gbm40"


def by_id(objects: list[Annotation]) -> dict[str, Annotation]:
    return {a.id: a for a in objects}


# ------------------------------------------------------------------------------------------- input forms


def test_feature_collection_qupath06_all_properties() -> None:
    objs, rep = read_geojson(FIX / "qupath06.geojson")
    assert (rep.read, rep.skipped, rep.repaired) == (3, 0, 0)
    a = by_id(objs)["0f3a9a8e-6a1d-4c5e-9a5b-2f1c3e4d5a61"]
    assert a.classification == "Stroma" and a.color == (150, 200, 150)
    assert a.object_color == (10, 20, 30)
    assert a.name == "Stroma with a hole" and a.locked is True
    assert a.measurements["Area µm^2"] == 2400.5 and math.isnan(a.measurements["Score"])
    assert a.metadata == {"author": "pathologist A", "reviewed": "true"}
    assert isinstance(a.geometry, Polygon) and len(a.geometry.interiors) == 1
    assert a.geometry.area == pytest.approx(100 * 100 - 20 * 20)

    derived = by_id(objs)["7c1d2e3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"]
    assert derived.classification == "Tumor: Positive"  # names joined as QuPath's toString() does
    assert derived.color == (200, 0, 0)  # RGBA: alpha dropped
    assert isinstance(derived.geometry, MultiPolygon) and len(derived.geometry.geoms) == 2
    assert derived.locked is False and derived.name is None and derived.object_color is None

    det = by_id(objs)["11111111-2222-4333-8444-555555555555"]
    assert det.object_type == "detection" and det.classification == "Nucleus"


def test_bare_array_and_legacy_forms() -> None:
    objs, rep = read_geojson(FIX / "legacy_array.json")
    assert rep.read == 4 and rep.skipped == 0
    necrosis, other, derived, core = objs
    # v0.2 stored the object type in "id": it is a type, not an id, so a fresh UUID is made
    assert necrosis.object_type == "annotation" and uuid.UUID(necrosis.id).version == 4
    assert necrosis.classification == "Necrosis" and necrosis.color == (50, 50, 50)  # packed negative ARGB
    assert necrosis.measurements == {"Area": 100.0, "Perimeter": 40.0}  # list of {name, value}
    assert necrosis.locked is False
    assert other.classification == "Other" and other.color is None  # plain string class
    assert other.object_color == (255, 0, 0)  # packed int object colour
    assert other.object_type == "annotation"  # from the "type" alias
    assert derived.object_type == "detection"  # legacy id "PathDetectionObject"
    assert derived.classification == "Tumor: Positive" and derived.color == (204, 51, 51)
    assert core.object_type == "tmaCore" and core.name == "A-1"
    # a ring given without its closing point is closed
    assert necrosis.geometry.area == pytest.approx(100.0)


def test_single_feature_without_id_or_type() -> None:
    objs, rep = read_geojson(FIX / "single_feature.geojson")
    assert rep.read == 1
    (a,) = objs
    assert a.object_type == "annotation" and a.classification == "Immune cells" and a.name == "cluster"
    assert uuid.UUID(a.id).version == 4
    # ids are unique per read, not shared by accident
    assert read_geojson(FIX / "single_feature.geojson")[0][0].id != a.id


def test_hierarchy_export_flattens_children_and_skips_root() -> None:
    objs, rep = read_geojson(FIX / "hierarchy.geojson")
    ids = [a.id[-1] for a in objs]
    assert ids == ["1", "2", "3", "4"]  # parent before children, root itself not an object
    assert rep.read == 4 and rep.skipped == 0
    assert [a.object_type for a in objs] == ["annotation", "annotation", "cell", "annotation"]
    assert objs[0].classification == "Region*"


def test_bare_geometry_and_non_geojson_rejected() -> None:
    with pytest.raises(PdsegError, match="bare Polygon geometry"):
        parse_geojson({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}, "x.geojson")
    with pytest.raises(PdsegError, match="x.json: not GeoJSON"):
        parse_geojson({"classes": ["Tumor"]}, "x.json")
    with pytest.raises(PdsegError, match="not GeoJSON"):
        parse_geojson("Tumor", "x.json")
    with pytest.raises(PdsegError, match="'features' is not a list"):
        parse_geojson({"type": "FeatureCollection", "features": {}}, "x.json")


def test_broken_json_names_file_line_and_column(tmp_path: Path) -> None:
    with pytest.raises(PdsegError) as e:
        read_geojson(FIX / "broken.geojson")
    msg = str(e.value)
    assert "broken.geojson" in msg and "line 3, column 35" in msg
    empty = tmp_path / "empty.geojson"
    empty.write_text("")
    with pytest.raises(PdsegError, match="empty.geojson: invalid JSON at line 1, column 1"):
        read_geojson(empty)
    with pytest.raises(PdsegError, match="missing.geojson: file not found"):
        read_geojson(tmp_path / "missing.geojson")
    binary = tmp_path / "slide.geojson"
    binary.write_bytes(b"\xff\xd8\xff\xe0 JPEG")
    with pytest.raises(PdsegError, match="slide.geojson: not UTF-8"):
        read_geojson(binary)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "bom.geojson"
    p.write_bytes(b"\xef\xbb\xbf" + (FIX / "single_feature.geojson").read_bytes())
    assert len(read_geojson(p)[0]) == 1


# ---------------------------------------------------------------------------------- repairs and skips


def test_bowtie_is_repaired_and_counted() -> None:
    objs, rep = read_geojson(FIX / "bowtie.geojson")
    assert rep.repaired == 1 and rep.skipped_empty == 1 and rep.read == 2
    bowtie = next(a for a in objs if a.name == "bowtie")
    assert bowtie.geometry.is_valid and isinstance(bowtie.geometry, MultiPolygon)
    assert bowtie.geometry.area == pytest.approx(50.0)  # two triangles of 25 px²
    assert bowtie.classification == "Tumor"
    repaired_msg = next(m for m in rep.messages if "repaired" in m)
    assert "b0b0b0b0-0000-4000-8000-000000000001" in repaired_msg and "bowtie" in repaired_msg
    assert "Self-intersection" in repaired_msg  # shapely's explain_validity reason
    assert any("flat" in m and "no area" in m for m in rep.messages)


def test_points_lines_and_empties_are_skipped_and_counted() -> None:
    objs, rep = read_geojson(FIX / "points_lines.geojson")
    assert rep.skipped_points == 3  # Point, MultiPoint, collection of a point
    assert rep.skipped_lines == 2
    assert rep.skipped_empty == 1
    assert rep.read == 1 and len(objs) == 1
    (mixed,) = objs
    assert mixed.name == "mixed" and isinstance(mixed.geometry, Polygon) and mixed.geometry.area == 16.0
    assert any("mixed" in m and "line and point parts dropped" in m for m in rep.messages)
    assert len(rep.messages) == 7


def test_structurally_wrong_features_are_skipped_not_raised() -> None:
    objs, rep = read_geojson(FIX / "malformed.geojson")
    assert [a.id for a in objs] == ["good"]
    assert rep.skipped_other == 5
    text = "\n".join(rep.messages)
    for fragment in ("no-geometry", "string-coords", "not a finite number", "flat-coords",
                     "CircularString", "feature 5 skipped: not a JSON object"):
        assert fragment in text
    good = objs[0]
    assert not good.geometry.has_z  # z dropped: QuPath's plane is 2-D
    assert good.color is None and "class colour 'red'" in text
    assert good.measurements == {"a": 1.0} and "2 measurement(s)" in text


def test_every_message_names_the_source() -> None:
    _, rep = read_geojson(FIX / "malformed.geojson")
    assert rep.messages and all(m.startswith(str(FIX / "malformed.geojson")) for m in rep.messages)


# ---------------------------------------------------------------------------------------------- writing


def test_written_form_is_what_qupath_writes(tmp_path: Path) -> None:
    a = Annotation(Polygon([(0, 0), (4, 0), (4, 4)]), "Tumor", (200, 0, 0), name="pdseg Tumor",
                   measurements={"pdseg area µm²": 4, "p": float("nan")})
    b = Annotation(Polygon([(0, 0), (4, 0), (4, 4)]), None, id="not-a-uuid")
    out = tmp_path / "sub" / "out.geojson"
    write_geojson(out, [a, b])
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["type"] == "FeatureCollection"
    fa, fb = data["features"]
    assert fa["type"] == "Feature" and fa["id"] == a.id
    assert fa["properties"] == {
        "objectType": "annotation",
        "name": "pdseg Tumor",
        "classification": {"name": "Tumor", "color": [200, 0, 0]},
        "measurements": {"pdseg area µm²": 4.0, "p": "NaN"},
    }
    assert all(isinstance(c, float) for ring in fa["geometry"]["coordinates"] for pt in ring for c in pt)
    assert fb["properties"] == {"objectType": "annotation"}  # unclassified, unlocked: keys omitted
    assert str(uuid.UUID(fb["id"])) == fb["id"]  # foreign id mapped to a stable UUID
    write_geojson(out, [b])
    assert json.loads(out.read_text())["features"][0]["id"] == fb["id"]
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # temp file replaced


def test_derived_class_written_as_names() -> None:
    f = annotation_to_feature(Annotation(Polygon([(0, 0), (1, 0), (1, 1)]), "Tumor: Positive", (1, 2, 3)))
    assert f["properties"]["classification"] == {"names": ["Tumor", "Positive"], "color": [1, 2, 3]}
    f = annotation_to_feature(Annotation(Polygon([(0, 0), (1, 0), (1, 1)]), "Tumor"))
    assert f["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}  # QuPath default


@pytest.mark.parametrize("name", ["qupath06.geojson", "legacy_array.json", "hierarchy.geojson", "bowtie.geojson"])
def test_round_trip_is_lossless(tmp_path: Path, name: str) -> None:
    first, _ = read_geojson(FIX / name)
    out = tmp_path / "rt.geojson"
    write_geojson(out, first)
    second, rep = read_geojson(out)
    assert rep.skipped == 0 and rep.repaired == 0 and len(second) == len(first)
    for a, b in zip(first, second):
        assert (a.id, a.name, a.classification, a.object_color, a.locked, a.object_type, a.metadata) == (
            b.id, b.name, b.classification, b.object_color, b.locked, b.object_type, b.metadata)
        # QuPath cannot parse a {name} class without a colour, so a missing one is written as the default
        assert b.color == (a.color or (default_color(a.classification) if a.classification else None))
        assert a.measurements.keys() == b.measurements.keys()
        for k, v in a.measurements.items():
            assert (math.isnan(v) and math.isnan(b.measurements[k])) or v == b.measurements[k]
        assert a.geometry.geom_type == b.geometry.geom_type
        assert a.geometry.equals(b.geometry)
        if isinstance(a.geometry, Polygon):
            assert len(a.geometry.interiors) == len(b.geometry.interiors)


def test_write_is_atomic_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "keep.geojson"
    out.write_text("original")
    bad = Annotation(Polygon([(0, 0), (1, 0), (1, 1)]), "Tumor", measurements={"x": object()})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        write_geojson(out, [bad])
    assert out.read_text() == "original"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.geojson"]


# --------------------------------------------------------------------------------------------- real data


def test_real_gbm40_tile() -> None:
    raw = json.loads((GBM / "01.geojson").read_text())
    n_nuclei = sum(f["properties"]["classification"]["name"] == "Nucleus" for f in raw["features"])
    objs, rep = read_geojson(GBM / "01.geojson")
    assert rep.skipped == 0 and rep.repaired == 0
    classes = [a.classification for a in objs]
    assert classes.count("Background") == 1 and classes.count("Nucleus") == n_nuclei == 102
    background = objs[classes.index("Background")]
    assert background.geometry.bounds == (0.0, 0.0, 512.0, 512.0) and background.color == (200, 200, 200)
    assert all(a.object_type == "annotation" and a.geometry.is_valid for a in objs)
    assert len({a.id for a in objs}) == len(objs)


# ------------------------------------------------------------------------------------ property: round trip

_names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
_rgb = st.tuples(*[st.integers(0, 255)] * 3)


@st.composite
def _areas(draw: st.DrawFn) -> Polygon | MultiPolygon:
    """Polygons with optional holes, or MultiPolygons of separated parts, at non-integer coordinates."""
    n = draw(st.integers(1, 3))
    parts = []
    for i in range(n):
        cx, cy = 1000.0 * i + draw(st.floats(0, 500)), draw(st.floats(0, 5000))
        r = draw(st.floats(20, 240))  # centres are >= 500 apart, so parts never touch
        shell = Point(cx, cy).buffer(r, quad_segs=draw(st.integers(1, 6)))
        if draw(st.booleans()):
            shell = shell.difference(Point(cx, cy).buffer(r / 3, quad_segs=2))
        parts.append(shell)
    return parts[0] if n == 1 else MultiPolygon(parts)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    geom=_areas(),
    cls=st.one_of(st.none(), _names, st.lists(_names, min_size=2, max_size=3).map(": ".join)),  # derived too
    color=_rgb,
    obj_color=st.one_of(st.none(), _rgb),
    name=st.one_of(st.none(), _names),
    locked=st.booleans(),
    meas=st.dictionaries(_names, st.floats(allow_nan=True, allow_infinity=True), max_size=3),
    meta=st.dictionaries(_names, _names, max_size=2),
)
def test_round_trip_property(  # type: ignore[no-untyped-def]
    tmp_path: Path, geom, cls, color, obj_color, name, locked, meas, meta
) -> None:
    a = Annotation(geom, cls, color if cls else None, name=name, locked=locked, measurements=meas,
                   metadata=meta, object_color=obj_color)
    out = tmp_path / "p.geojson"
    write_geojson(out, [a])
    (b,), rep = read_geojson(out)
    assert rep.read == 1 and rep.skipped == 0 and rep.repaired == 0
    assert (b.id, b.classification, b.color, b.name, b.locked, b.metadata, b.object_color) == (
        a.id, a.classification, a.color, a.name, a.locked, a.metadata, a.object_color)
    assert b.measurements.keys() == meas.keys()
    assert all(v == b.measurements[k] or (math.isnan(v) and math.isnan(b.measurements[k])) for k, v in meas.items())
    assert b.geometry.geom_type == a.geometry.geom_type and b.geometry.equals(a.geometry)


def test_writer_refuses_geometry_that_is_not_valid_geojson(tmp_path: Path) -> None:
    """A NaN coordinate would be written as bare NaN, which no GeoJSON reader accepts; the old file survives."""
    from shapely.geometry import Polygon

    from pdseg_qupath.core.annotations import Annotation
    from pdseg_qupath.sources.qupath.geojson import write_geojson

    target = tmp_path / "out.geojson"
    target.write_text("old")
    bad = Annotation(geometry=Polygon([(0, 0), (float("nan"), 5), (5, 5)]), classification="Tumor")
    with pytest.raises(PdsegError, match="invalid GeoJSON"):
        write_geojson(target, [bad])
    assert target.read_text() == "old"
