from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio.features
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from shapely.geometry import LineString, Point, Polygon, box

from pdseg_qupath.core.annotations import IGNORE, Annotation, ClassInfo, ClassMap
from pdseg_qupath.core.grid import Window, iter_windows
from pdseg_qupath.core.raster import CLIP_MIN_VERTICES, UNCLASSIFIED, AnnotationIndex, vectorize

from _helpers import rasterize

CM = ClassMap((ClassInfo("Tumor", (200, 0, 0)), ClassInfo("Stroma", (150, 200, 150)), ClassInfo("Other", (255, 200, 0))))
DOWNSAMPLES = [1.0, 2.0, 0.5, 1.5, 4 / 3, 3.7, 0.3]


def ann(geom, cls):  # type: ignore[no-untyped-def]
    return Annotation(geometry=geom, classification=cls)


# -- round trip -----------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    labels=arrays(np.uint8, st.tuples(st.integers(1, 32), st.integers(1, 32)), elements=st.sampled_from([0, 1, 2, IGNORE])),
    d=st.sampled_from(DOWNSAMPLES),
    x=st.integers(-40, 40),
    y=st.integers(-40, 40),
)
def test_vectorize_then_rasterize_is_identity(labels: np.ndarray, d: float, x: int, y: int) -> None:
    win = Window(x, y, labels.shape[1], labels.shape[0], d)
    polys = vectorize(labels, CM, win)
    assert set(polys) == {CM.classes[k].name for k in np.unique(labels) if k != IGNORE}
    assert all(g.is_valid for g in polys.values())
    back = rasterize([ann(g, name) for name, g in polys.items()], CM, win)
    np.testing.assert_array_equal(back, labels)


def _star(cx: float, cy: float, r: float, n: int, seed: int) -> Polygon:
    rng = np.random.default_rng(seed)
    ang = np.sort(rng.uniform(0, 2 * math.pi, n))
    rad = r * rng.uniform(0.4, 1.0, n)
    return Polygon(np.c_[cx + rad * np.cos(ang), cy + rad * np.sin(ang)])


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(3, 12),
    r=st.floats(3.0, 40.0),
    d1=st.sampled_from([0.5, 1.0, 1.3]),
    d2=st.sampled_from([2.0, 2.5, 4.0]),
)
def test_area_agrees_across_resolutions(seed: int, n: int, r: float, d1: float, d2: float) -> None:
    """Areas (level-0 px²) at two resolutions agree with the polygon within the pixel-boundary error.

    Only pixels whose square the boundary crosses can be wrong. A segment of length L crosses at most
    √2·L/d + 2 grid cells of size d, so the error is at most d² · Σ(√2·L/d + 2) = √2·d·P + 2·n·d².
    """
    poly = _star(50.0, 50.0, r, n, seed)
    if not poly.is_valid or poly.area == 0:
        return
    ref = poly.area
    segs = len(poly.exterior.coords) - 1
    areas = []
    for d in (d1, d2):
        w = math.ceil(100 / d)
        lab = rasterize([ann(poly, "Tumor")], CM, Window(0, 0, w, w, d))
        area = (lab == 0).sum() * d * d
        bound = math.sqrt(2) * d * poly.length + 2 * segs * d * d
        assert abs(area - ref) <= bound
        areas.append((area, bound))
    assert abs(areas[0][0] - areas[1][0]) <= areas[0][1] + areas[1][1]


# -- painting rules ------------------------------------------------------------------------------


def test_smaller_annotations_paint_on_top_whatever_the_order() -> None:
    big, small = box(0, 0, 20, 20), box(5, 5, 10, 10)
    win = Window(0, 0, 20, 20)
    for anns in ([ann(big, "Stroma"), ann(small, "Tumor")], [ann(small, "Tumor"), ann(big, "Stroma")]):
        lab = rasterize(anns, CM, win)
        assert (lab[5:10, 5:10] == 0).all()
        assert (lab == 1).sum() == 400 - 25


def test_holes_keep_what_was_below() -> None:
    donut = Polygon([(0, 0), (20, 0), (20, 20), (0, 20)], [[(5, 5), (15, 5), (15, 15), (5, 15)]])
    win = Window(0, 0, 30, 30)
    lab = rasterize([ann(donut, "Tumor")], CM, win)
    assert (lab[5:15, 5:15] == IGNORE).all() and (lab[0:5, 0:20] == 0).all() and (lab[20:] == IGNORE).all()
    # a larger stroma region underneath shows through the hole
    lab = rasterize([ann(donut, "Tumor"), ann(box(0, 0, 30, 30), "Stroma")], CM, win)
    assert (lab[5:15, 5:15] == 1).all() and (lab[0:5, 0:20] == 0).all() and (lab[25:] == 1).all()


def test_ignore_paints_255_like_a_class() -> None:
    win = Window(0, 0, 20, 20)
    anns = [ann(box(0, 0, 20, 20), "Tumor"), ann(box(0, 0, 10, 20), "Ignore*"), ann(box(2, 2, 4, 4), "Stroma")]
    lab = rasterize(anns, CM, win)
    assert (lab[:, 10:] == 0).all()
    assert (lab[:, :10] == IGNORE).sum() == 200 - 4  # ignore over tumour, the small stroma on top of it
    assert (lab[2:4, 2:4] == 1).all()


def test_unknown_unclassified_and_arealess_are_skipped_and_counted() -> None:
    anns = [
        ann(box(0, 0, 5, 5), "Tumor"),
        ann(box(0, 0, 9, 9), "Necrosis"),
        ann(box(0, 0, 9, 9), "Necrosis"),
        ann(box(0, 0, 9, 9), None),
        ann(Point(3, 3), "Tumor"),
        ann(LineString([(0, 0), (9, 9)]), "Stroma"),
    ]
    index = AnnotationIndex(anns, CM)
    assert len(index) == 1
    assert index.skipped_unknown == {"Necrosis": 2, UNCLASSIFIED: 1}
    assert index.skipped_no_area == 2
    lab = index.rasterize(Window(0, 0, 10, 10))
    assert (lab == 0).sum() == 25 and (lab == IGNORE).sum() == 75


def test_pixel_centre_rule() -> None:
    # covers pixel 0's centre (0.5) but only grazes pixel 1 (centre 1.5): pixel 1 stays unlabelled
    lab = rasterize([ann(box(0, 0, 1.4, 1.0), "Tumor")], CM, Window(0, 0, 3, 1))
    assert lab.tolist() == [[0, IGNORE, IGNORE]]


def test_query_touches_only_annotations_near_the_window() -> None:
    anns = [ann(box(100 * i, 0, 100 * i + 50, 50), "Tumor") for i in range(20)]
    index = AnnotationIndex(anns, CM)
    assert len(index.query(Window(0, 0, 120, 60))) == 2
    assert len(index.query(Window(500, 500, 10, 10))) == 0
    assert not index.intersects(Window(60, 0, 30, 30)) and index.intersects(Window(40, 0, 30, 30))


# -- tiling --------------------------------------------------------------------------------------


def _scene(seed: int) -> list[Annotation]:
    rng = np.random.default_rng(seed)
    anns = [ann(_star(*rng.uniform(0, 200, 2), rng.uniform(5, 60), 9, seed + i), ["Tumor", "Stroma", "Other", "Ignore*"][i % 4])
            for i in range(40)]
    return [a for a in anns if a.geometry.is_valid]


@pytest.mark.parametrize("d", [1.0, 1.5, 0.7])
def test_tiles_stitch_to_the_whole_window(d: float) -> None:
    index = AnnotationIndex(_scene(3), CM)
    w = h = math.ceil(200 / d)
    whole = index.rasterize(Window(0, 0, w, h, d))
    stitched = np.full((h, w), 77, np.uint8)
    for t in iter_windows(w, h, 37, 0, d):
        stitched[t.y : t.y + t.height, t.x : t.x + t.width] = index.rasterize(t)
    np.testing.assert_array_equal(stitched, whole)
    assert len(np.unique(whole)) == 4


def test_clipping_large_outlines_does_not_change_pixels() -> None:
    circle = Point(100, 100).buffer(90, quad_segs=400)  # far more vertices than the clip threshold
    assert shapely.get_num_coordinates(circle) > CLIP_MIN_VERTICES
    inner = Point(100, 100).buffer(30, quad_segs=300).difference(Point(100, 100).buffer(10))
    anns = [ann(circle, "Stroma"), ann(inner, "Tumor")]
    index = AnnotationIndex(anns, CM)
    d = 1.25
    w = h = 160
    direct = rasterio.features.rasterize(
        [(circle, 1), (inner, 0)], out_shape=(h, w), fill=IGNORE, transform=Window(0, 0, w, h, d).transform, dtype="uint8"
    )
    for t in iter_windows(w, h, 23, 0, d):
        np.testing.assert_array_equal(index.rasterize(t), direct[t.y : t.y + t.height, t.x : t.x + t.width])


# -- vectorize options ---------------------------------------------------------------------------


def test_vectorize_coordinates_are_level0() -> None:
    lab = np.full((10, 10), IGNORE, np.uint8)
    lab[2:4, 3:8] = 1
    polys = vectorize(lab, CM, Window(100, 50, 10, 10, 2.0))
    assert list(polys) == ["Stroma"]
    assert polys["Stroma"].bounds == (206.0, 104.0, 216.0, 108.0)
    assert polys["Stroma"].area == 5 * 2 * 4


def test_vectorize_simplify_and_min_area() -> None:
    lab = np.full((64, 64), IGNORE, np.uint8)
    yy, xx = np.mgrid[0:64, 0:64]
    lab[(yy - 30) ** 2 + (xx - 30) ** 2 < 20**2] = 0  # a disc with a staircase outline
    lab[60:62, 60:62] = 0  # a 4 px speck
    lab[0:3, 60:63] = 7  # not in the class map: not vectorized
    win = Window(0, 0, 64, 64, 1.0)
    raw = vectorize(lab, CM, win)["Tumor"]
    assert raw.geom_type == "MultiPolygon" and len(raw.geoms) == 2
    simple = vectorize(lab, CM, win, simplify=1.0)["Tumor"]
    assert shapely.get_num_coordinates(simple) < shapely.get_num_coordinates(raw) / 2
    assert simple.area == pytest.approx(raw.area, rel=0.05)
    big_only = vectorize(lab, CM, win, min_area_um2=2.0, mpp=0.5)["Tumor"]  # 4 px = 1 µm² < 2 µm²
    assert big_only.geom_type == "Polygon" and big_only.area == pytest.approx(raw.area - 4)
    assert vectorize(lab, CM, win, min_area_um2=1e6, mpp=0.5) == {}
    with pytest.raises(ValueError, match="mpp"):
        vectorize(lab, CM, win, min_area_um2=2.0)


def test_vectorize_keeps_holes_and_empty_input() -> None:
    lab = np.zeros((9, 9), np.uint8)
    lab[3:6, 3:6] = IGNORE
    g = vectorize(lab, CM, Window(0, 0, 9, 9))["Tumor"]
    assert g.geom_type == "Polygon" and len(g.interiors) == 1 and g.area == 81 - 9
    assert vectorize(np.full((4, 4), IGNORE, np.uint8), CM, Window(0, 0, 4, 4)) == {}
    with pytest.raises(ValueError, match="shape"):
        vectorize(lab, CM, Window(0, 0, 8, 9))
