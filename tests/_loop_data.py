"""Small synthetic H&E-like images with QuPath GeoJSON, and a tiny trained model, for the loop tests.

Images are pink "stroma" with purple "nuclei" (disks); the GeoJSON has a Background rectangle and one
Nucleus polygon per disk, as QuPath would export them. Everything uses the ``tiny`` backbone config
(32-px tiles, milliseconds per tile) so the tests stay fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from shapely.geometry import Point, box, mapping

PINK = (236, 170, 200)
PURPLE = (90, 50, 140)


def make_image(folder: Path, name: str, size: tuple[int, int] = (96, 96), seed: int = 0, n_nuclei: int = 9,
               annotate: bool = True, background_box: tuple[float, float, float, float] | None = None,
               extra_features: list[dict] | None = None) -> Path:
    """Write ``folder/name.png`` (+ ``name.geojson`` unless ``annotate`` is False); return the PNG."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = np.empty((h, w, 3), dtype=np.float32)
    img[:] = PINK
    img += rng.normal(0, 6, img.shape)
    yy, xx = np.mgrid[0:h, 0:w]
    feats = []
    bg = background_box or (0, 0, w, h)
    feats.append(_feature(box(*bg), "Background", (200, 200, 200)))
    for _ in range(n_nuclei):
        m = min(8.0, w / 2, h / 2)
        cx, cy = rng.uniform(m, w - m), rng.uniform(m, h - m)
        r = rng.uniform(3.5, 6.5)
        inside = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
        img[inside] = np.array(PURPLE) + rng.normal(0, 6, (int(inside.sum()), 3))
        feats.append(_feature(Point(cx, cy).buffer(r, 16), "Nucleus", (160, 90, 160)))
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"{name}.png"
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(png)
    if annotate:
        fc = {"type": "FeatureCollection", "features": feats + list(extra_features or [])}
        (folder / f"{name}.geojson").write_text(json.dumps(fc))
    return png


def _feature(geom, cls: str, color) -> dict:
    return {
        "type": "Feature",
        "geometry": mapping(geom),
        "properties": {"objectType": "annotation", "classification": {"name": cls, "color": list(color)}},
    }


def feature(geom, cls: str, color=(10, 200, 10)) -> dict:
    return _feature(geom, cls, color)


def small_options(**kw):
    """TrainOptions for the tiny backbone: few tiles, one view, small cache, quick epochs."""
    from pdseg_qupath.learn.options import TrainOptions

    base = dict(tiles_per_class=6, views=2, pixels_per_tile=256, overlap=8, max_val_tiles=8, batch_pixels=512,
                patience=50, head="pixel")  # the pixel head keeps these loop tests fast; the context head has its own
    base.update(kw)
    return TrainOptions(**base)


def make_folder(root: Path, n: int = 2, size=(96, 96)) -> Path:
    for i in range(n):
        make_image(root, f"img{i}", size=size, seed=i)
    return root


def train_tiny(src_dir: Path, out: Path, epochs: int = 3, seed: int = 0, **opts):
    from pdseg_qupath.sources.inputs import open_source
    from pdseg_qupath.tasks.train import train as train_model

    source = open_source(src_dir)
    return train_model(source, out, backbone="random:tiny", mpp=0.5, image_mpp=0.5, epochs=epochs,
                       device="cpu", seed=seed, options=small_options(**opts))
