"""Resolution-aware slide reading: any grid :class:`~pdseg_qupath.core.grid.Window` from the best pyramid level.

Whole-slide formats (SVS, generic tiled TIFF, ...) are read lazily through tiffslide, tile by tile, so a
read costs memory for the window only. Plain PNG/JPEG images are decoded once (tiffslide's fallback, else
PIL); they record no pixel size, so the caller must supply one (``--image-mpp``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pdseg_qupath.core.errors import MissingPixelSizeError, PdsegError
from pdseg_qupath.core.grid import Window, grid_size

LEVEL_TOLERANCE = 0.01
"""A level whose downsample exceeds the requested one by at most 1 % still counts as "not coarser"
(pyramid levels of odd-sized images have downsamples like 2.002)."""

MAX_PLAUSIBLE_MPP = 50.0
"""Recorded pixel sizes above this (µm/px) are writer defaults such as 72 or 96 dpi, not a calibration."""

_CHUNK = 4096
"""Largest source extent (px per side) resampled at once, so huge windows are read in bounded pieces."""

MAX_IMAGE_PIXELS_ENV = "PDSEG_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 400_000_000
"""Plain images (PNG, JPEG...) are decoded whole, so their size is capped (400 Mpx, ~1.2 GB as RGB, e.g.
20,000 × 20,000 px): a tiny compressed file must not cost gigabytes (a decompression bomb). Whole-slide
TIFFs are read tile by tile and are not capped. Raise it with the environment variable
``PDSEG_MAX_IMAGE_PIXELS``."""


def max_image_pixels() -> int:
    """The cap on a plain image's pixels: ``PDSEG_MAX_IMAGE_PIXELS`` if set, else 400 million."""
    import os

    raw = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(float(raw))
    except (ValueError, OverflowError):
        raise PdsegError(f"{MAX_IMAGE_PIXELS_ENV}={raw!r}: expected a number of pixels, e.g. 1000000000") from None
    if value < 1:
        raise PdsegError(f"{MAX_IMAGE_PIXELS_ENV}={raw!r}: must be a positive number of pixels")
    return value


def _check_plain_image_size(path: Path) -> None:
    """Refuse a plain image larger than :func:`max_image_pixels`, from its header, before decoding it."""
    limit = max_image_pixels()
    Image.MAX_IMAGE_PIXELS = limit  # Pillow's own guard, at the same size
    try:
        with Image.open(path) as img:  # the header only
            w, h = img.size
    except Image.DecompressionBombError:
        w = h = None
    except Exception:
        return  # not an image Pillow knows: the readers say so
    if w is None or w * h > limit:
        size = f"{w} × {h} px ({w * h / 1e6:.0f} Mpx)" if w else "too large"
        raise PdsegError(f"{path}: image is {size}, more than the {limit / 1e6:g} Mpx a plain image may have "
                         "(it is decoded whole: a decompression-bomb guard). Save it as a tiled TIFF, or raise "
                         f"the limit: {MAX_IMAGE_PIXELS_ENV}=<pixels>")


MIN_MPP, MAX_MPP = 0.01, 1000.0
"""The pixel sizes (µm/px) pdseg accepts anywhere: beyond them no light-microscope image exists, and a
wrong value would silently ask for absurd amounts of memory (1e-5 µm/px: 112 GiB) or for no tiles at all."""


def check_mpp(value: Any, what: str) -> float:
    """``value`` as a pixel size in µm/px, or a :class:`PdsegError` naming ``what`` (an option or a file)."""
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise PdsegError(f"{what}: {value!r} is not a pixel size in µm/px (e.g. 0.5 for 20x)") from None
    if not (math.isfinite(v) and MIN_MPP <= v <= MAX_MPP):
        raise PdsegError(f"{what}: {value!r} µm/px cannot be a real pixel size (expected {MIN_MPP:g} to "
                         f"{MAX_MPP:g}, e.g. 0.25 for 40x, 0.5 for 20x)")
    return v


def _mpp_xy(props: dict[str, Any]) -> list[float]:
    vals = []
    for key in ("tiffslide.mpp-x", "tiffslide.mpp-y"):
        try:
            v = float(props.get(key))  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            continue
        if math.isfinite(v) and v > 0:
            vals.append(v)
    return vals


def _tiffslide_mpp(props: dict[str, Any]) -> float | None:
    """The recorded µm/px (mean of x and y); None when absent, or not a real pixel size (writer defaults
    such as 72 dpi, or values below :data:`MIN_MPP`), so that ``--image-mpp`` applies."""
    vals = _mpp_xy(props)
    if not vals:
        return None
    mpp = sum(vals) / len(vals)
    return mpp if MIN_MPP <= mpp <= MAX_PLAUSIBLE_MPP else None


def _non_square_note(path: Path, props: dict[str, Any]) -> list[str]:
    vals = _mpp_xy(props)
    if len(vals) == 2 and abs(vals[0] - vals[1]) > 0.01 * max(vals):
        return [f"{path.name}: pixels are not square ({vals[0]:g} × {vals[1]:g} µm/px); pdseg works with their "
                f"mean, {sum(vals) / 2:g} µm/px, so areas and shapes are approximate"]
    return []


def _open_backend(path: Path) -> tuple[Any, str]:
    """(handle, kind): a tiffslide object (kind 'tiffslide') or a decoded PIL image (kind 'pil')."""
    import tiffslide
    from tifffile import TiffFileError

    if not path.exists():
        raise PdsegError(f"{path}: no such file. Check the path, or the image URI in the QuPath project.")
    if path.is_dir():
        raise PdsegError(f"{path}: is a folder, not an image file")
    try:
        return tiffslide.TiffSlide(path), "tiffslide"
    except TiffFileError:
        pass
    except Exception as e:  # a TIFF that tiffslide cannot interpret
        raise PdsegError(f"{path}: cannot read this TIFF slide ({e})") from e
    _check_plain_image_size(path)
    try:
        nts = tiffslide.NotTiffSlide(path)
        if nts.properties.get("tiffslide.series-axes") in ("YXS", "YX", "CYX") and nts.level_dimensions:
            return nts, "tiffslide"
    except Exception:  # e.g. a grey PNG that tiffslide's fallback mislabels: PIL reads it
        pass
    try:
        img = Image.open(path)
        img.load()
        return img, "pil"
    except Exception as e:
        raise PdsegError(
            f"{path}: not a readable image (supported: TIFF-based slides such as .svs/.tif, and PNG/JPEG)"
        ) from e


def probe(path: str | Path) -> tuple[int, int, float | None]:
    """Level-0 (width, height) and recorded µm/px (``None`` if none), without decoding pixels."""
    import tiffslide
    from tifffile import TiffFileError

    p = Path(path)
    if not p.is_file():
        raise PdsegError(f"{p}: no such file. Check the path, or the image URI in the QuPath project.")
    try:
        with tiffslide.TiffSlide(p) as ts:
            w, h = ts.dimensions
            return int(w), int(h), _tiffslide_mpp(ts.properties)
    except TiffFileError:
        pass
    except Exception as e:
        raise PdsegError(f"{p}: cannot read this TIFF slide ({e})") from e
    _check_plain_image_size(p)
    try:
        with Image.open(p) as img:  # reads the header only
            w, h = img.size
            return int(w), int(h), None
    except Exception as e:
        raise PdsegError(
            f"{p}: not a readable image (supported: TIFF-based slides such as .svs/.tif, and PNG/JPEG)"
        ) from e


def _to_rgb8(arr: np.ndarray) -> np.ndarray:
    """Any H×W×C array (grey, grey+alpha, RGB, RGBA; 8 or 16 bit) as uint8 RGB, alpha composited on white."""
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.integer):
            arr = (arr.astype(np.float32) * (255.0 / np.iinfo(arr.dtype).max)).round().astype(np.uint8)
        else:
            arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    c = arr.shape[2]
    if c in (2, 4):
        alpha = arr[..., -1:].astype(np.float32) / 255.0
        col = arr[..., :-1].astype(np.float32)
        arr = (col * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
        c -= 1
    if c == 1:
        return np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


class Slide:
    """An open image: level-0 size, its µm/px and resolution-aware reads of grid windows."""

    def __init__(self, path: Path, handle: Any, kind: str, mpp: float) -> None:
        self.path = path
        self.name = path.name
        self.mpp = float(mpp)
        self.notes: list[str] = []
        """Warnings about the image (e.g. non-square pixels), for the task to report."""
        self._h = handle
        self._kind = kind
        if kind == "tiffslide":
            dims = [tuple(map(int, d)) for d in handle.level_dimensions]
            self._axes = handle.properties.get("tiffslide.series-axes", "YXS")
        else:
            if handle.mode not in ("RGB", "RGBA", "L", "LA", "I;16"):
                handle = self._h = handle.convert("RGBA" if "A" in handle.getbands() else "RGB")
            dims = [tuple(handle.size)]
            self._axes = "YXS"
        self.width, self.height = dims[0]
        self.level_dimensions: list[tuple[int, int]] = dims  # type: ignore[assignment]
        self.level_downsamples: list[tuple[float, float]] = [
            (self.width / w, self.height / h) for w, h in dims
        ]

    # -- pyramid -----------------------------------------------------------------------------------
    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is ≤ ``downsample`` (within :data:`LEVEL_TOLERANCE`)."""
        mean = [(dx + dy) / 2 for dx, dy in self.level_downsamples]
        ok = [i for i, m in enumerate(mean) if m <= downsample * (1 + LEVEL_TOLERANCE)]
        return max(ok, key=lambda i: mean[i], default=0)

    def _read_level_box(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] of a level (in bounds) as uint8 RGB."""
        if self._kind == "pil":
            arr = np.asarray(self._h.crop((x0, y0, x1, y1)))
            if arr.ndim == 2:
                arr = arr[..., None]
            return _to_rgb8(arr)
        zarr_arr = self._h.zarr_group[str(level)]
        if self._axes == "YXS":
            arr = np.asarray(zarr_arr[y0:y1, x0:x1])
        elif self._axes == "CYX":
            arr = np.asarray(zarr_arr[:, y0:y1, x0:x1]).transpose(1, 2, 0)
        elif self._axes == "YX":
            arr = np.asarray(zarr_arr[y0:y1, x0:x1])[..., None]
        else:
            raise PdsegError(f"{self.path}: unsupported image layout {self._axes!r} (expected RGB or grey)")
        return _to_rgb8(arr)

    def _read_padded(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Like :meth:`_read_level_box` but any box; parts outside the level are white."""
        lw, lh = self.level_dimensions[level]
        out = np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, lw), min(y1, lh)
        if cx1 > cx0 and cy1 > cy0:
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = self._read_level_box(level, cx0, cy0, cx1, cy1)
        return out

    # -- reading -----------------------------------------------------------------------------------
    def read(self, window: Window) -> np.ndarray:
        """RGB uint8 pixels of ``window`` (exactly ``window.shape``), resampled from the best level."""
        level = self.best_level(window.downsample)
        dx, dy = self.level_downsamples[level]
        fx, fy = window.downsample / dx, window.downsample / dy  # source px per output px
        bx = max(1, int(_CHUNK / max(fx, 1.0)))
        by = max(1, int(_CHUNK / max(fy, 1.0)))
        if window.width <= bx and window.height <= by:
            return self._read_one(window, level)
        out = np.empty((window.height, window.width, 3), dtype=np.uint8)
        for y in range(0, window.height, by):
            for x in range(0, window.width, bx):
                sub = Window(window.x + x, window.y + y, min(bx, window.width - x), min(by, window.height - y),
                             window.downsample)
                out[y : y + sub.height, x : x + sub.width] = self._read_one(sub, level)
        return out

    def _read_one(self, window: Window, level: int) -> np.ndarray:
        dx, dy = self.level_downsamples[level]
        ax0, ay0, ax1, ay1 = window.level0_bounds
        lx0, ly0, lx1, ly1 = ax0 / dx, ay0 / dy, ax1 / dx, ay1 / dy
        ix0, iy0 = round(lx0), round(ly0)
        exact = (
            abs(lx0 - ix0) < 1e-6 and abs(ly0 - iy0) < 1e-6
            and abs((lx1 - lx0) - window.width) < 1e-6 and abs((ly1 - ly0) - window.height) < 1e-6
        )
        if exact:  # grid pixels are level pixels: no resampling
            return self._read_padded(level, ix0, iy0, ix0 + window.width, iy0 + window.height)
        m = 1  # one source pixel of context so interpolation at the edges sees real neighbours
        sx0, sy0 = math.floor(lx0) - m, math.floor(ly0) - m
        sx1, sy1 = math.ceil(lx1) + m, math.ceil(ly1) + m
        src = Image.fromarray(self._read_padded(level, sx0, sy0, sx1, sy1))
        reducing = (lx1 - lx0) > window.width or (ly1 - ly0) > window.height
        resample = Image.Resampling.BOX if reducing else Image.Resampling.BILINEAR
        img = src.resize(
            (window.width, window.height), resample, box=(lx0 - sx0, ly0 - sy0, lx1 - sx0, ly1 - sy0)
        )
        return np.asarray(img)

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp`` µm/px (RGB uint8), read from the best level."""
        d = mpp / self.mpp
        w, h = grid_size(self.width, self.height, d)
        return self.read(Window(0, 0, w, h, d))

    # -- lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        try:
            self._h.close()
        except Exception:
            pass

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({self.name!r}, {self.width}x{self.height}, {self.mpp:g} µm/px, {len(self.level_dimensions)} levels)"


def open_slide(path: str | Path, *, mpp: float | None = None, fallback_mpp: float | None = None) -> Slide:
    """Open an image; µm/px from ``mpp`` (e.g. the QuPath project), else the file, else ``fallback_mpp``.

    Raises :class:`MissingPixelSizeError` when none of the three gives one: pixel sizes are never guessed.
    """
    p = Path(path)
    mpp = None if mpp is None else check_mpp(mpp, f"{p}: recorded pixel size")
    fallback_mpp = None if fallback_mpp is None else check_mpp(fallback_mpp, "--image-mpp")
    handle, kind = _open_backend(p)
    recorded = _tiffslide_mpp(handle.properties) if kind == "tiffslide" else None
    chosen = mpp if mpp is not None else recorded if recorded is not None else fallback_mpp
    if chosen is None:
        try:
            handle.close()
        except Exception:
            pass
        raise MissingPixelSizeError(str(p))
    try:
        slide = Slide(p, handle, kind, chosen)
        if kind == "tiffslide" and mpp is None and recorded is not None:
            slide.notes += _non_square_note(p, handle.properties)
        return slide
    except PdsegError:
        raise
    except Exception as e:
        raise PdsegError(f"{p}: cannot read this image ({e})") from e
