"""``train --context-view F``: every tile with an F× zoomed-out view of its surroundings (learn/context.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.grid import Window
from pdseg_qupath.learn.augment import AugmentConfig, augment
from pdseg_qupath.learn.context import ContextFeatures, fuse, read_tile
from pdseg_qupath.learn.modelio import load_model
from pdseg_qupath.learn.options import IOConfig, TrainOptions

from _loop_data import make_folder, train_tiny


class ArraySlide:
    """A slide over an array at downsample 1: reads outside the image are white, as a slide pads them."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels

    def read(self, win: Window) -> np.ndarray:
        assert win.downsample == 1
        h, w = self.pixels.shape[:2]
        out = np.full((win.height, win.width, 3), 255, np.uint8)
        x0, y0 = max(win.x, 0), max(win.y, 0)
        x1, y1 = min(win.x + win.width, w), min(win.y + win.height, h)
        if x1 > x0 and y1 > y0:
            out[y0 - win.y : y1 - win.y, x0 - win.x : x1 - win.x] = self.pixels[y0:y1, x0:x1]
        return out


@pytest.mark.parametrize("factor", [2, 4])
def test_the_views_features_land_on_the_tiles_cells(factor):
    # A view feature map whose value is its own cell's x (or y) coordinate: after fusing, tile cell i must
    # read the view coordinate of its centre, c0 + i/f - (f-1)/(2f), c0 = (f-1)h/(2f) the tile's first cell.
    h = 16
    coord = torch.arange(h, dtype=torch.float32)
    view = torch.stack([coord.view(1, h).expand(h, h), coord.view(h, 1).expand(h, h)])[None]
    tile = torch.randn(1, 5, h, h)
    out = fuse(tile, view, factor)
    assert out.shape == (1, 7, h, h) and torch.equal(out[:, :5], tile)
    want = (factor - 1) * h / (2 * factor) + torch.arange(h) / factor - (factor - 1) / (2 * factor)
    assert torch.allclose(out[0, 5], want.view(1, h).expand(h, h))
    assert torch.allclose(out[0, 6], want.view(h, 1).expand(h, h))


def test_read_tile_centres_the_view_on_the_tile():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)
    slide = ArraySlide(pixels)
    x, y, t = 100, 60, 32
    one = read_tile(slide, x, y, t, 1.0)
    assert one.shape == (t, t, 3) and np.array_equal(one, pixels[y:y + t, x:x + t])
    both = read_tile(slide, x, y, t, 1.0, factor=2)
    assert both.shape == (t, t, 6) and np.array_equal(both[..., :3], one)
    around = pixels[y - 16:y + 48, x - 16:x + 48].astype(np.float32)  # the 64 px centred on the tile
    assert np.array_equal(both[..., 3:], np.rint(around.reshape(32, 2, 32, 2, 3).mean((1, 3))).astype(np.uint8))
    edge = read_tile(slide, 0, 0, t, 1.0, factor=4)  # the view reaches 48 px past the image: padding
    assert (edge[:12, :12, 3:] == 255).all() and not (edge[16:, 16:, 3:] == 255).all()


def test_tile_and_view_get_the_same_augmentation():
    rng = np.random.default_rng(1)
    tile = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (32, 32), dtype=np.uint8)
    both, lab2 = augment(np.concatenate([tile, tile], -1), labels, np.random.default_rng(7), AugmentConfig())
    alone, lab1 = augment(tile, labels, np.random.default_rng(7), AugmentConfig())
    assert np.array_equal(both[..., :3], both[..., 3:]) and np.array_equal(both[..., :3], alone)
    assert np.array_equal(lab1, lab2) and not np.array_equal(alone, tile)


def test_options_refuse_other_factors():
    with pytest.raises(PdsegError, match="--context-view 3: use one of 1, 2, 4"):
        TrainOptions(context_view=3)
    with pytest.raises(PdsegError, match="--context-view"):
        TrainOptions(context_view=True)
    with pytest.raises(PdsegError, match="multiple of 32 px"):
        IOConfig(0.5, 48, 8, 4, 4)
    assert IOConfig(0.5, 48, 8, 4, 2).context == 2


@pytest.fixture(scope="module")
def context_model(tmp_path_factory) -> tuple[Path, Path]:
    src = make_folder(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("run") / "m"
    train_tiny(src, out, epochs=2, head="context", context_view=2, ensemble=1, keep_features=True)
    return src, out


def test_a_context_model_records_its_view_and_twice_the_channels(context_model):
    from pdseg_qupath.learn.predictor import Predictor, load_extractor

    src, out = context_model
    meta = json.loads((out / "model.json").read_text())
    plain = load_extractor("random:tiny", "cpu")[1].channels
    assert meta["context_view"] == 2 and meta["training"]["options"]["context_view"] == 2
    assert meta["features"]["channels"] == meta["head"]["in_channels"] == 2 * plain
    model = load_model(out)
    assert model.io.context == 2
    predictor = Predictor(model, device="cpu")
    assert isinstance(predictor.extractor, ContextFeatures)
    tiles = np.full((2, 32, 32, 6), 200, np.uint8)
    tiles[1, ..., 3:] = (120, 60, 140)  # another view: another prediction
    logits = predictor.logits(tiles, [(0, 0), (0, 0)])
    assert logits.shape == (2, 2, 32, 32) and np.isfinite(logits).all() and not np.allclose(logits[0], logits[1])
    with pytest.raises(PdsegError, match="needs each tile with its view"):
        predictor.logits(np.full((1, 32, 32, 3), 200, np.uint8), [(0, 0)])


def test_a_context_model_predicts_a_slide_and_resumes(context_model, tmp_path):
    from pdseg_qupath.sources.inputs import open_source
    from pdseg_qupath.tasks.evaluate import evaluate

    src, kept = context_model
    out = tmp_path / "m"
    shutil.copytree(kept, out)  # this test retrains it
    m = evaluate(open_source(src), out, tmp_path / "report", image_mpp=0.5, device="cpu", include_training=True)
    assert 0.0 <= m["macro_dice"] <= 1.0 and m["per_class"]
    before = json.loads((out / "model.json").read_text())["training"]["history"]
    again = train_tiny(src, out, epochs=2, head="context", context_view=2, ensemble=1, keep_features=True)
    assert again.resumed and again.history == before  # the shards of tile-and-view features reload
    other = train_tiny(src, out, epochs=2, head="context", context_view=1, ensemble=1, keep_features=True)
    assert not other.resumed  # features of the tile alone are other features: extracted anew


def test_auto_search_is_refused_with_a_context_view(tmp_path):
    src = make_folder(tmp_path / "src")
    with pytest.raises(PdsegError, match="cannot yet be combined with --context-view"):
        train_tiny(src, tmp_path / "m", epochs=1, head="context", context_view=2, t="auto")
