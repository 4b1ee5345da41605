from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import tiffslide
from PIL import Image

from pdseg_qupath.core import slide as slide_mod
from pdseg_qupath.core.errors import MissingPixelSizeError, PdsegError
from pdseg_qupath.core.grid import Window, grid_size
from pdseg_qupath.core.slide import open_slide, probe
from pdseg_qupath.core.tissue import tissue_mask

CMU = Path(__file__).resolve().parents[1] / "examples" / "CMU-1-Small-Region.svs"
W0, H0, MPP0 = 640, 512, 0.25


def _base_image() -> np.ndarray:
    """Smooth gradients: resampling errors stay small, so pixel checks can be tight."""
    yy, xx = np.mgrid[0:H0, 0:W0]
    return np.dstack([(xx * 255 // W0), (yy * 255 // H0), np.full_like(xx, 100)]).astype(np.uint8)


def _levels() -> list[np.ndarray]:
    """Level k = level 0 reduced by 2**k, with the blue channel set to 10*k to tell the levels apart."""
    base = _base_image()
    out = []
    for k in range(3):
        f = 2**k
        lvl = base.reshape(H0 // f, f, W0 // f, f, 3).mean(axis=(1, 3)).round().astype(np.uint8)
        lvl[..., 2] = 10 * k
        out.append(lvl)
    return out


@pytest.fixture
def pyramid(tmp_path: Path) -> Path:
    """A 3-level tiled TIFF at 0.25 µm/px; reduced levels as pages with subfiletype=1 (OpenSlide style)."""
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tw:
        for k, lvl in enumerate(_levels()):
            px_per_cm = 1e4 / (MPP0 * 2**k)
            tw.write(
                lvl, tile=(64, 64), photometric="rgb", compression="zlib",
                subfiletype=0 if k == 0 else 1, resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
            )
    return path


def test_tiffslide_reports_mpp_of_written_pyramid(pyramid: Path, tmp_path: Path) -> None:
    with tiffslide.TiffSlide(pyramid) as ts:
        assert ts.properties["tiffslide.mpp-x"] == pytest.approx(MPP0)
        assert ts.level_count == 3
    um = tmp_path / "um.tif"  # resolution unit µm (tifffile's non-standard 5)
    tifffile.imwrite(um, _levels()[0], resolution=(1 / 0.5, 1 / 0.5), resolutionunit=tifffile.RESUNIT.MICROMETER)
    assert probe(um) == (W0, H0, pytest.approx(0.5))


def test_probe(pyramid: Path, tmp_path: Path) -> None:
    assert probe(pyramid) == (W0, H0, pytest.approx(MPP0))
    png = tmp_path / "a.png"
    Image.fromarray(_base_image()).save(png)
    assert probe(png) == (W0, H0, None)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, _base_image())  # no resolution tags
    assert probe(plain) == (W0, H0, None)
    dpi72 = tmp_path / "dpi72.tif"  # a writer's screen default is not a calibration
    tifffile.imwrite(dpi72, _base_image(), resolution=(72, 72), resolutionunit="INCH")
    assert probe(dpi72)[2] is None
    with pytest.raises(PdsegError, match="missing.svs"):
        probe(tmp_path / "missing.svs")


def test_open_slide_pixel_size_precedence(pyramid: Path, tmp_path: Path) -> None:
    with open_slide(pyramid) as s:
        assert (s.width, s.height, s.mpp, s.name) == (W0, H0, MPP0, "pyramid.tif")
    with open_slide(pyramid, mpp=0.3, fallback_mpp=0.9) as s:
        assert s.mpp == 0.3  # the project's calibration overrides the file
    with open_slide(pyramid, fallback_mpp=0.9) as s:
        assert s.mpp == MPP0  # the file's own value beats --image-mpp
    png = tmp_path / "tile.png"
    Image.fromarray(_base_image()).save(png)
    with open_slide(png, fallback_mpp=0.5) as s:
        assert s.mpp == 0.5
    with pytest.raises(MissingPixelSizeError, match="--image-mpp") as e:
        open_slide(png)
    assert "tile.png" in str(e.value)
    with pytest.raises(PdsegError, match="cannot be a real pixel size"):
        open_slide(png, fallback_mpp=0)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(PdsegError, match="nope.tif"):
        open_slide(tmp_path / "nope.tif", fallback_mpp=0.5)
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"this is not an image" * 10)
    with pytest.raises(PdsegError, match="junk.svs"):
        open_slide(junk, fallback_mpp=0.5)
    with pytest.raises(PdsegError, match="junk.svs"):
        probe(junk)


@pytest.mark.parametrize(
    "mpp, level",
    [(0.25, 0), (0.3, 0), (0.499, 1), (0.5, 1), (0.6, 1), (1.0, 2), (1.7, 2), (0.1, 0)],
)
def test_reads_coarsest_level_not_finer_than_request(pyramid: Path, mpp: float, level: int) -> None:
    with open_slide(pyramid) as s:
        d = mpp / s.mpp
        assert s.best_level(d) == level
        px = s.read(Window(3, 2, 40, 30, d))
        assert px.shape == (30, 40, 3) and px.dtype == np.uint8
        # the blue channel encodes the level that was read (0.499 µm/px is within the 1 % tolerance of level 1)
        assert np.abs(px[..., 2].astype(int) - 10 * level).max() <= 1


def test_records_level_read(pyramid: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    orig = slide_mod.Slide._read_level_box

    def spy(self, level, *box):  # type: ignore[no-untyped-def]
        calls.append(level)
        return orig(self, level, *box)

    monkeypatch.setattr(slide_mod.Slide, "_read_level_box", spy)
    with open_slide(pyramid) as s:
        s.read(Window(0, 0, 64, 64, 0.5 / s.mpp))
        assert set(calls) == {1}
        calls.clear()
        s.read(Window(0, 0, 64, 64, 1.0))
        assert set(calls) == {0}


def test_read_exact_grids_match_level_pixels(pyramid: Path) -> None:
    levels = _levels()
    with open_slide(pyramid) as s:
        np.testing.assert_array_equal(s.read(Window(10, 20, 100, 50, 1.0)), levels[0][20:70, 10:110])
        np.testing.assert_array_equal(s.read(Window(5, 7, 64, 33, 2.0)), levels[1][7:40, 5:69])
        np.testing.assert_array_equal(s.read(Window(0, 0, W0 // 4, H0 // 4, 4.0)), levels[2])


def test_read_resamples_by_area(tmp_path: Path) -> None:
    """A single-level image read at downsample 2 equals the 2×2 block means (box filter)."""
    img = _base_image()
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb", resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    with open_slide(path) as s:
        got = s.read(Window(0, 0, W0 // 2, H0 // 2, 2.0)).astype(int)
    want = img.reshape(H0 // 2, 2, W0 // 2, 2, 3).mean(axis=(1, 3))
    assert np.abs(got - want).max() <= 1
    # a non-integer downsample keeps the gradient where it belongs (pixel centres map to level 0)
    with open_slide(path) as s:
        d = 4 / 3
        px = s.read(Window(30, 0, 50, 10, d)).astype(int)
    centres = (np.arange(30, 80) + 0.5) * d
    assert np.abs(px[5, :, 0] - (centres - 0.5) * 255 / W0).max() <= 1.5


def test_read_pads_outside_white(pyramid: Path) -> None:
    with open_slide(pyramid) as s:
        px = s.read(Window(-10, -10, 30, 30, 1.0))
        assert (px[:10] == 255).all() and (px[:, :10] == 255).all()
        np.testing.assert_array_equal(px[10:, 10:], _levels()[0][:20, :20])
        far = s.read(Window(W0 // 2 - 5, 0, 20, 8, 2.0))  # level 1 is W0/2 wide
        assert (far[:, 5:] == 255).all() and not (far[:, :5] == 255).all()


def test_large_reads_in_chunks_match_single_read(pyramid: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_slide(pyramid) as s:
        win = Window(3, 1, 150, 120, 1.5)
        whole = s.read(win)
        monkeypatch.setattr(slide_mod, "_CHUNK", 40)
        chunked = s.read(win)
    assert np.abs(whole.astype(int) - chunked.astype(int)).max() <= 1


def test_png_grey_and_rgba(tmp_path: Path) -> None:
    img = _base_image()
    Image.fromarray(img).save(tmp_path / "rgb.png")
    Image.fromarray(img[..., 0]).save(tmp_path / "grey.png")
    rgba = np.dstack([img, np.zeros(img.shape[:2], np.uint8)])
    rgba[:, : W0 // 2, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(img).save(tmp_path / "q.jpg", quality=95)
    win = Window(0, 0, W0, H0, 1.0)
    with open_slide(tmp_path / "rgb.png", fallback_mpp=0.5) as s:
        np.testing.assert_array_equal(s.read(win), img)
    with open_slide(tmp_path / "grey.png", fallback_mpp=0.5) as s:
        px = s.read(win)
        assert (px[..., 0] == img[..., 0]).all() and (px[..., 2] == img[..., 0]).all()
    with open_slide(tmp_path / "rgba.png", fallback_mpp=0.5) as s:
        px = s.read(win)
        np.testing.assert_array_equal(px[:, : W0 // 2], img[:, : W0 // 2])
        assert (px[:, W0 // 2 :] == 255).all()  # transparent means white, as on glass
    with open_slide(tmp_path / "q.jpg", fallback_mpp=0.5) as s:
        assert np.abs(s.read(win).astype(int) - img).mean() < 3


def test_thumbnail(pyramid: Path) -> None:
    with open_slide(pyramid) as s:
        th = s.thumbnail(1.0)
    assert th.shape == (H0 // 4, W0 // 4, 3)
    np.testing.assert_array_equal(th, _levels()[2])


def test_tissue_mask_on_real_slide() -> None:
    with open_slide(CMU) as s:
        assert s.mpp == pytest.approx(0.499)
        mask, d = tissue_mask(s, mpp=8.0)
    assert d == pytest.approx(8.0 / 0.499)
    assert mask.dtype == bool and mask.shape == grid_size(2220, 2967, d)[::-1]
    assert 0.2 < mask.mean() < 0.9
    assert not mask[:4].any()  # the top rows are glass
    # Loose, pale dermis about 700 µm from the top-left corner: left out by the (20, 60) range used before.
    assert mask[84:91, 84:91].all()


def test_tissue_mask_synthetic(tmp_path: Path) -> None:
    img = np.full((400, 400, 3), 245, np.uint8)
    img[100:300, 50:250] = (200, 120, 180)  # pink tissue
    img[10, 390] = (200, 120, 180)  # an isolated speck is cleaned away
    Image.fromarray(img).save(tmp_path / "t.png")
    with open_slide(tmp_path / "t.png", fallback_mpp=1.0) as s:
        mask, d = tissue_mask(s, mpp=4.0)
    assert d == 4.0 and mask.shape == (100, 100)
    assert mask[30:70, 15:60].all() and not mask[:20].any() and not mask[80:].any()


def test_pale_tissue_beside_dense_tissue_is_tissue(tmp_path: Path) -> None:
    """Glass, dense tissue and pale tissue (saturation about 26, like necrosis on a low-magnification section):
    Otsu alone would cut between the dense and the pale tissue; the clamp keeps the pale part."""
    rng = np.random.default_rng(0)
    img = np.full((400, 600, 3), 244, np.uint8)
    img[50:350, 50:250] = (190, 110, 170)  # dense tissue
    img[50:350, 250:450] = (234, 210, 226)  # pale tissue
    img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)  # scanner noise
    Image.fromarray(img).save(tmp_path / "t.png")
    with open_slide(tmp_path / "t.png", fallback_mpp=1.0) as s:
        mask, _ = tissue_mask(s, mpp=4.0)
    assert mask[15:85, 15:60].all() and mask[15:85, 65:110].all()  # both kinds of tissue
    assert not mask[:, 115:].any() and not mask[:10].any()  # the glass


def test_tissue_mask_when_no_glass_is_visible() -> None:
    """A field full of tissue (gbm40 tile) is tissue, not split into nuclei versus stroma by Otsu."""
    gbm = Path(__file__).parent / "fixtures" / "gbm40" / "01.png"
    with open_slide(gbm, fallback_mpp=0.5) as s:
        mask, _ = tissue_mask(s, mpp=2.0)
    assert mask.mean() > 0.9
