from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from shapely.geometry import box, shape

from pdseg_qupath.core.annotations import IGNORE, Annotation, ClassInfo, ClassMap
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.grid import Window, grid_size
from pdseg_qupath.core.names import qupath_export_basename
from pdseg_qupath.core.raster import AnnotationIndex
from pdseg_qupath.core.slide import open_slide
from pdseg_qupath.outputs import masks as export_mod
from pdseg_qupath.outputs.masks import (
    export_image_masks,
    format_downsample,
    parse_tile_name,
    tile_name,
    write_classes_json,
)
from pdseg_qupath.outputs.overlay import render_overlay

GBM = Path(__file__).parent / "fixtures" / "gbm40"
CM = ClassMap((ClassInfo("Background", (200, 200, 200)), ClassInfo("Nucleus", (0, 0, 200))))


def load_geojson(path: Path) -> list[Annotation]:
    """Minimal reader, independent of the product's, so the test checks export and not the reader."""
    feats = json.loads(path.read_text())["features"]
    return [Annotation(shape(f["geometry"]), f["properties"]["classification"]["name"]) for f in feats]


@pytest.fixture(scope="module")
def gbm() -> list[Annotation]:
    return load_geojson(GBM / "01.geojson")


def pil_reference(anns: list[Annotation], size: tuple[int, int], scale: int = 16) -> np.ndarray:
    """Independent rasterization: PIL polygons painted large to small on a 16× finer canvas, sampled at our
    pixel centres. (PIL also fills the pixels an edge passes through; supersampling shrinks that to 1/16 px.)"""
    img = Image.new("L", (size[0] * scale, size[1] * scale), IGNORE)
    draw = ImageDraw.Draw(img)
    for a in sorted(anns, key=lambda a: -a.geometry.area):
        for p in getattr(a.geometry, "geoms", [a.geometry]):
            draw.polygon([(x * scale, y * scale) for x, y in p.exterior.coords], fill=CM.index(a.classification))
    return np.asarray(img)[scale // 2 :: scale, scale // 2 :: scale]


def centre_reference(anns: list[Annotation], size: tuple[int, int]) -> np.ndarray:
    """Independent pixel-centre rule: matplotlib's point-in-polygon test at (i + 0.5, j + 0.5)."""
    from matplotlib.path import Path as MplPath

    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    pts = np.c_[xx.ravel() + 0.5, yy.ravel() + 0.5]
    out = np.full(size[0] * size[1], IGNORE, np.uint8)
    for a in sorted(anns, key=lambda a: -a.geometry.area):
        out[MplPath(np.asarray(a.geometry.exterior.coords)).contains_points(pts)] = CM.index(a.classification)
    return out.reshape(size[1], size[0])


def test_gbm40_single_png_matches_independent_rasterization(gbm: list[Annotation], tmp_path: Path) -> None:
    stats = export_image_masks((512, 512), 0.5, gbm, CM, tmp_path, "01.png", mpp=0.5)
    assert [p.name for p in stats.files] == ["01.png"]
    img = Image.open(tmp_path / "01.png")
    assert img.mode == "L" and img.size == (512, 512)
    ours = np.asarray(img)
    ref = pil_reference(gbm, (512, 512))
    a, b = ours == 1, ref == 1
    iou = (a & b).sum() / (a | b).sum()
    assert iou >= 0.99, iou
    np.testing.assert_array_equal(ours, centre_reference(gbm, (512, 512)))  # no holes in gbm40
    assert set(np.unique(ours)) == {0, 1}  # the Background rectangle labels everything else
    assert stats.pixels["Nucleus"] == a.sum() and stats.pixels["Background"] == (ours == 0).sum()
    assert stats.ignored_pixels == 0 and stats.annotations_used == len(gbm)
    assert stats.area_mm2()["Nucleus"] == pytest.approx(a.sum() * 0.25e-6)


def test_gbm40_tiles_named_like_qupath_and_stitch_to_single_shot(gbm: list[Annotation], tmp_path: Path) -> None:
    d = 1.5  # 0.75 µm/px on a 0.5 µm/px image: a 342 px grid, tiles of 128
    stats = export_image_masks((512, 512), 0.5, gbm, CM, tmp_path, "01.png", mpp=0.75, tile_size=128)
    names = sorted(p.name for p in stats.files)
    assert stats.grid == (342, 342) and stats.tiles_total == 9 and stats.tiles_skipped == 0
    assert "01 [d=1.5,x=0,y=0,w=192,h=192].png" in names
    assert "01 [d=1.5,x=384,y=192,w=128,h=192].png" in names  # last column clipped to the image
    whole = AnnotationIndex(gbm, CM).rasterize(Window(0, 0, 342, 342, d))
    stitched = np.full_like(whole, 99)
    for p in stats.files:
        base, dd, (x, y, w, h) = parse_tile_name(p.name)  # type: ignore[misc]
        assert base == "01" and dd == 1.5
        tile = np.asarray(Image.open(p))
        gx, gy = round(x / d), round(y / d)
        stitched[gy : gy + tile.shape[0], gx : gx + tile.shape[1]] = tile
    np.testing.assert_array_equal(stitched, whole)
    assert sum(stats.pixels.values()) + stats.ignored_pixels == 342 * 342


def test_only_annotated_tiles_are_written(tmp_path: Path) -> None:
    anns = [Annotation(box(10, 10, 50, 50), "Nucleus"), Annotation(box(900, 900, 1000, 1000), "Ignore*")]
    stats = export_image_masks((1000, 1000), 0.25, anns, CM, tmp_path, "s.svs", mpp=0.25, tile_size=256)
    assert [p.name for p in stats.files] == ["s [x=0,y=0,w=256,h=256].png"]
    assert stats.tiles_total == 16 and stats.tiles_skipped == 15  # the all-ignore tile carries no label
    assert stats.pixels == {"Background": 0, "Nucleus": 1600}
    tile = np.asarray(Image.open(stats.files[0]))
    assert tile.shape == (256, 256) and (tile[10:50, 10:50] == 1).all() and (tile == 1).sum() == 1600


def test_export_allocates_one_tile_at_a_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    orig = AnnotationIndex.rasterize

    def spy(self, window):  # type: ignore[no-untyped-def]
        seen.append(window.shape)
        return orig(self, window)

    monkeypatch.setattr(AnnotationIndex, "rasterize", spy)
    anns = [Annotation(box(0, 0, 4000, 3000), "Background"), Annotation(box(100, 100, 300, 300), "Nucleus")]
    ticks: list[tuple[int, int]] = []
    stats = export_image_masks((4000, 3000), 0.25, anns, CM, tmp_path, "big", mpp=0.5, tile_size=512,
                               on_tile=lambda i, n: ticks.append((i, n)))
    assert stats.grid == (2000, 1500) and len(stats.files) == 12
    assert max(h * w for h, w in seen) <= 512 * 512
    assert ticks[-1] == (12, 12) and len(ticks) == 12
    assert stats.pixels["Nucleus"] == 100 * 100


def test_unknown_classes_reported(tmp_path: Path) -> None:
    anns = [Annotation(box(0, 0, 10, 10), "Nucleus"), Annotation(box(0, 0, 10, 10), "Tumor"), Annotation(box(0, 0, 5, 5), None)]
    stats = export_image_masks((20, 20), 1.0, anns, CM, tmp_path, "x.tif", mpp=1.0)
    assert stats.skipped_unknown == {"Tumor": 1, "(unclassified)": 1}
    assert stats.pixels["Nucleus"] == 100 and stats.ignored_pixels == 300
    assert json.loads(json.dumps(stats.to_json()))["skipped_unknown"]["Tumor"] == 1


def test_stale_tiles_from_an_earlier_export_are_reported(tmp_path: Path) -> None:
    anns = [Annotation(box(0, 0, 100, 100), "Nucleus")]
    first = export_image_masks((600, 600), 1.0, anns, CM, tmp_path, "a.svs", mpp=1.0, tile_size=256)
    assert first.stale_files == []
    second = export_image_masks((600, 600), 1.0, anns, CM, tmp_path, "a.svs", mpp=2.0, tile_size=256)
    assert [p.name for p in second.files] == ["a [d=2,x=0,y=0,w=512,h=512].png"]
    assert [p.name for p in second.stale_files] == ["a [x=0,y=0,w=256,h=256].png"]
    assert not list(tmp_path.glob(".pdseg-*"))  # no temporary files left behind


def test_names() -> None:
    assert qupath_export_basename("CMU-1.svs") == "CMU-1" and qupath_export_basename("x.ome.tiff") == "x"
    assert qupath_export_basename('a:b?"c.png') == "abc" and qupath_export_basename("slide 1.2") == "slide 1.2"
    assert [format_downsample(v) for v in (1.0, 2.0, 1.5, 1 / 3, 1.996, 4.000004)] == ["1", "2", "1.5", "0.33333", "1.996", "4"]
    win = Window(3, 2, 100, 100, 2.5)
    assert tile_name("s", win, (10_000, 10_000)) == "s [d=2.5,x=8,y=5,w=250,h=250].png"
    assert tile_name("s", Window(0, 0, 10, 10, 1.0), (5, 7)) == "s [x=0,y=0,w=5,h=7].png"
    assert parse_tile_name("s [d=2.5,x=8,y=5,w=250,h=250].png") == ("s", 2.5, (8, 5, 250, 250))
    assert parse_tile_name("s.png") is None


def test_classes_json(tmp_path: Path) -> None:
    path = write_classes_json(tmp_path / "out", CM, 0.5)
    data = json.loads(path.read_text())
    assert data["mpp"] == 0.5 and data["ignore"] == 255
    assert ClassMap.from_json(data) == CM


def test_overlay(gbm: list[Annotation], tmp_path: Path) -> None:
    """The masks overlay is drawn like every overlay: classes filled at 30 %, outlined, with a legend."""
    with open_slide(GBM / "01.png", fallback_mpp=0.5) as s:
        stats = export_image_masks((512, 512), 0.5, gbm, CM, tmp_path, "01.png", mpp=0.5, overlay_reader=s.read)
        rgb = s.read(Window(0, 0, 512, 512, 1.0)).astype(float)
    assert stats.overlay == tmp_path / "overlays" / "01.png" and stats.overlay.exists()
    ov = np.asarray(Image.open(stats.overlay)).astype(float)
    assert ov.shape == (512, 512, 3)
    lab = AnnotationIndex(gbm, CM).rasterize(Window(0, 0, 512, 512, 1.0))
    below_legend = np.zeros(lab.shape, bool)
    below_legend[80:] = True
    edge = np.zeros(lab.shape, bool)
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, 1:] != lab[:, :-1]
    edge[1:] |= lab[1:] != lab[:-1]
    edge[:-1] |= lab[1:] != lab[:-1]
    for k, color in enumerate(c.color for c in CM.classes):
        inside = (lab == k) & ~edge & below_legend
        want = rgb * 0.7 + np.array(color) * 0.3
        assert inside.sum() > 100 and np.abs(ov[inside] - want[inside]).max() <= 1
        assert (ov[(lab == k) & edge & below_legend] == color).all()  # outlines in the class colour


def test_overlay_of_a_label_map_leaves_ignored_pixels_clear(tmp_path: Path) -> None:
    with open_slide(GBM / "01.png", fallback_mpp=0.5) as s:
        rgb = s.read(Window(0, 0, 512, 512, 1.0))
    labels = np.full((512, 512), IGNORE, np.uint8)
    labels[:, :256] = 1
    ov = np.asarray(Image.open(render_overlay(rgb, labels, CM, tmp_path / "ov2.png"))).astype(float)
    np.testing.assert_array_equal(ov[:, 257:], rgb[:, 257:])
    assert np.abs(ov[100:, :255] - rgb[100:, :255]).mean() > 10


def test_atomic_write_leaves_no_partial_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "keep.png").write_bytes(b"old mask")

    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(PdsegError, match="disk full.*old file is unchanged"):
        export_image_masks((10, 10), 1.0, [Annotation(box(0, 0, 5, 5), "Nucleus")], CM, tmp_path, "keep", mpp=1.0)
    assert (tmp_path / "keep.png").read_bytes() == b"old mask"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png"]


def test_grid_matches_grid_size() -> None:
    assert grid_size(512, 512, 1.5) == (342, 342)
    assert export_mod.tile_region(Window(256, 0, 86, 86, 1.5), (512, 512)) == (384, 0, 128, 129)
