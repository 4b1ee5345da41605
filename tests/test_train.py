"""Training: model folder contents, reproducibility, resume after interruption, and bad-input handling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from shapely.geometry import Point

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.learn.augment import AugmentConfig, augment, dihedral
from pdseg_qupath.learn.cache import BatchRunner, pixels_per_view, stratified_pixels, uniform_pixels
from pdseg_qupath.learn.modelio import load_model

from _helpers import fake_images
from _loop_data import feature, make_folder, make_image, small_options, train_tiny


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    return train_tiny(data, tmp_path_factory.mktemp("run") / "model", epochs=3)


def test_model_folder_and_record(trained):
    out = trained.model_dir
    assert {p.name for p in out.iterdir()} >= {"head.safetensors", "model.json", "training_curve.png"}
    assert not (out / ".pdseg-train").exists(), "resume state is removed after a finished run"
    meta = json.loads((out / "model.json").read_text())
    assert meta["class_map"]["classes"][0]["name"] == "Background"
    assert [c["name"] for c in meta["class_map"]["classes"]] == ["Background", "Nucleus"]
    assert meta["mpp"] == 0.5 and meta["tile_size"] == 32 and meta["overlap"] == 8
    assert meta["backbone"]["spec"] == "random:tiny" and meta["backbone"]["random_weights"] is True
    assert "RANDOM WEIGHTS" in meta["backbone"]["label"]
    assert meta["features"]["channels"] == meta["head"]["in_channels"]
    assert meta["features"]["precision"] == "fp32"  # the tests pin fp32 (conftest)
    assert meta["training"]["validation"] == "image"
    # the default ensemble of 3 heads: each trains on one image and stops early on the other, and the
    # second head holds out the image the first one trained on, so between them both images are trained on
    assert meta["head"]["members"] == 3 and meta["format_version"] == 2
    heads = meta["training"]["ensemble"]
    assert [h["seed"] for h in heads] == [0, 7919, 2 * 7919]
    for h in heads:
        assert len(h["train_images"]) == 1 and len(h["val_images"]) == 1
        assert set(h["train_images"] + h["val_images"]) == {"img0.png", "img1.png"}
    assert heads[0]["val_images"] != heads[1]["val_images"]
    # each head's own prior shift (its own training image and pixels), the first one's as the run's
    assert heads[0]["logit_adjustment"] == meta["training"]["prior"]["logit_adjustment"]
    assert heads[0]["logit_adjustment"] != heads[1]["logit_adjustment"]
    assert sorted(meta["training"]["train_images"]) == sorted(meta["training"]["val_images"]) == ["img0.png", "img1.png"]
    assert (out / "training_curve_2.png").is_file() and (out / "training_curve_3.png").is_file()
    # the objects the training image's labels came from (all drawn by hand here: no predictions among them)
    assert meta["training"]["labels"]["user"] > 0
    assert meta["training"]["labels"]["corrected"] == meta["training"]["labels"]["untouched"] == 0
    assert len(meta["training"]["history"]) == 3
    row = meta["training"]["history"][0]
    assert set(row["per_class"]) == {"Background", "Nucleus"}
    assert 0 <= row["accuracy"] <= 1 and row["loss"] > 0
    cache = meta["training"]["cache"]
    assert cache["bytes"] == (cache["pixels_train"] + cache["pixels_val"]) * cache["bytes_per_pixel"]
    assert cache["bytes"] <= cache["budget_mb"] * 2**20
    assert cache["class_pixels_train"]["Nucleus"] > 0
    model = load_model(out)
    assert model.class_map.names == ["Background", "Nucleus"]


def test_same_seed_same_metrics(trained, data, tmp_path):
    again = train_tiny(data, tmp_path / "again", epochs=3)
    assert again.history == trained.history
    a = load_model(trained.model_dir).head.state_dict()
    b = load_model(again.model_dir).head.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_features_train_a_model_that_says_so(data, tmp_path, monkeypatch):
    """What a CPU with bf16 instructions does by default: the model records bf16 and predicts."""
    from pdseg_qupath.backbone.features import PRECISION_ENV
    from pdseg_qupath.learn.predictor import Predictor

    monkeypatch.setenv(PRECISION_ENV, "bf16")
    res = train_tiny(data, tmp_path / "m", epochs=1, ensemble=1)
    assert json.loads((res.model_dir / "model.json").read_text())["features"]["precision"] == "bf16"
    pred = Predictor(load_model(res.model_dir), device="cpu")
    assert pred.extractor.precision == "bf16"
    logits = pred.logits(np.zeros((1, 32, 32, 3), dtype=np.uint8), [(0, 0)])
    assert logits.shape == (1, 2, 32, 32) and np.isfinite(logits).all()


def test_interrupted_run_resumes_to_the_same_result(trained, data, tmp_path, monkeypatch):
    import pdseg_qupath.outputs.plots as report

    real = report.write_training_curve
    calls = {"n": 0}

    def crash_after_two(history, *a, **kw):
        calls["n"] += 1
        real(history, *a, **kw)
        if len(history) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_training_curve", crash_after_two)
    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        train_tiny(data, out, epochs=3)
    assert len(list((out / ".pdseg-train").glob("checkpoint-*.pt"))) == 1
    assert not (out / "model.json").exists()
    monkeypatch.setattr(report, "write_training_curve", real)
    resumed = train_tiny(data, out, epochs=3)
    assert resumed.resumed
    assert resumed.history == trained.history


def test_image_without_annotations_and_moved_image_are_reported(data, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(data, src)
    make_image(src, "unannotated", seed=5, annotate=False)
    (src / "moved.geojson").write_text((src / "img0.geojson").read_text())
    res = train_tiny(src, tmp_path / "m", epochs=1)
    text = " ".join(res.messages)
    assert "unannotated.png: no classified annotations" in text
    assert "moved" in text and "skipped" in text
    assert set(res.train_images + res.val_images) == {"img0.png", "img1.png"}


def test_class_without_pixels(data, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(data, src)
    # a "Tumor" annotation far smaller than a pixel: in the class map, but never rasterized
    extra = [feature(Point(40.0, 40.0).buffer(0.05, 4), "Tumor")]  # between pixel centres
    make_image(src, "img0", seed=0, extra_features=extra)
    res = train_tiny(src, tmp_path / "m", epochs=1)
    assert res.class_map.names == ["Background", "Nucleus", "Tumor"]
    assert any("'Tumor' has no labelled pixels" in m for m in res.messages)
    assert res.best["per_class"]["Tumor"]["pixels"] == 0


def test_unknown_class_and_single_class_are_clear_errors(data, tmp_path):
    from pdseg_qupath.sources.inputs import open_source
    from pdseg_qupath.tasks.train import train as train_model

    with pytest.raises(PdsegError, match="unknown class"):
        train_model(open_source(data), tmp_path / "m", backbone="random:tiny", classes=["Nucleus", "Tumour"],
                    image_mpp=0.5, epochs=1, device="cpu")
    with pytest.raises(PdsegError, match="at least two"):
        train_model(open_source(data), tmp_path / "m", backbone="random:tiny", classes=["Nucleus"],
                    image_mpp=0.5, epochs=1, device="cpu")


def test_no_annotations_at_all(tmp_path):
    make_image(tmp_path / "src", "a", annotate=False)
    with pytest.raises(PdsegError, match="no image of the source has classified annotations"):
        train_tiny(tmp_path / "src", tmp_path / "m", epochs=1)


def test_missing_pixel_size_names_the_option(data, tmp_path):
    from pdseg_qupath.sources.inputs import open_source
    from pdseg_qupath.tasks.train import train as train_model

    with pytest.raises(PdsegError, match="--image-mpp"):
        train_model(open_source(data), tmp_path / "m", backbone="random:tiny", epochs=1, device="cpu")


def test_validation_images_option(data, tmp_path):
    res = train_tiny(data, tmp_path / "m", epochs=1, val_fraction=0.5)
    assert res.val_mode == "image"
    from pdseg_qupath.learn.sampling import split_images
    from pdseg_qupath.sources.inputs import open_source

    with pytest.raises(PdsegError, match="--val-images"):
        split_images([], ["nope.png"], 0.2, np.random.default_rng(0))
    assert open_source(data)  # the folder still opens


# ------------------------------------------------------------------------------------- components


def test_dihedral_transforms_image_and_labels_alike():
    img = np.arange(4 * 5 * 3).reshape(4, 5, 3)
    lab = img[..., 0]
    seen = set()
    for k in range(8):
        ti, tl = dihedral(img, k), dihedral(lab, k)
        assert np.array_equal(ti[..., 0], tl)
        seen.add(ti.tobytes())
    assert len(seen) == 8


def test_augment_keeps_labels_and_changes_stain():
    rng = np.random.default_rng(0)
    img = np.full((16, 16, 3), (200, 120, 170), dtype=np.uint8)
    lab = np.zeros((16, 16), dtype=np.uint8)
    lab[:4] = 1
    out, ol = augment(img, lab, rng, AugmentConfig(geometric=True, stain_sigma=0.2, stain_bias=0.1))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert sorted(np.unique(ol)) == [0, 1] and (ol == 1).sum() == 64
    assert not np.array_equal(out, img)


def test_stratified_sampling_favours_no_class_and_never_picks_ignore():
    lab = np.full((32, 32), 255, dtype=np.uint8)
    lab[:2, :] = 1  # 64 px of a rare class
    lab[8:, :] = 0  # 768 px of a common one
    idx = stratified_pixels(lab, 100, 2, np.random.default_rng(0))
    picked = lab.reshape(-1)[idx]
    assert len(idx) == 100 and (picked != 255).all()
    assert (picked == 1).sum() == 50 and (picked == 0).sum() == 50
    idx = stratified_pixels(lab, 400, 2, np.random.default_rng(0))
    assert (lab.reshape(-1)[idx] == 1).sum() == 64  # the rare class gives all it has, the rest fill up
    assert len(idx) == 400
    assert len(uniform_pixels(lab, 10_000, np.random.default_rng(0))) == 832


def test_cache_budget_bounds_pixels():
    per = pixels_per_view(cache_mb=1, channels=256, n_views=100, cap=4096)
    assert per * 100 * (2 * 256 + 8) <= 2**20
    assert pixels_per_view(cache_mb=1000, channels=8, n_views=1, cap=512) == 512


def test_out_of_memory_halves_the_batch_and_loses_nothing():
    seen = []

    def fn(batch):
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen.append(list(batch))
        return [x * 10 for x in batch]

    backoffs = []
    runner = BatchRunner(8, on_backoff=backoffs.append)
    assert runner(fn, list(range(7))) == [x * 10 for x in range(7)]
    assert backoffs == [4, 2] and runner.batch_size == 2
    assert [x for b in seen for x in b] == list(range(7))

    def always(batch):
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(PdsegError, match="out of GPU memory even at batch size 1"):
        BatchRunner(2)(always, [1, 2, 3])
    with pytest.raises(ValueError):
        BatchRunner(2)(lambda b: (_ for _ in ()).throw(ValueError("other")), [1])


def test_kept_features_are_reused_by_a_run_with_other_head_options(data, tmp_path):
    first = train_tiny(data, tmp_path / "m", epochs=1, keep_features=True)
    shards = list((tmp_path / "m" / ".pdseg-train").glob("features-*/*.safetensors"))
    assert shards and not list((tmp_path / "m" / ".pdseg-train").glob("checkpoint-*"))
    second = train_tiny(data, tmp_path / "m", epochs=1, keep_features=True, lr=1e-3, hidden=(32, 16))
    assert second.resumed and second.cache["pixels_train"] == first.cache["pixels_train"]
    third = train_tiny(data, tmp_path / "m", epochs=1, tiles_per_class=3)
    assert not third.resumed and not (tmp_path / "m" / ".pdseg-train").exists()


def test_prior_correction_is_recorded_and_folded_into_the_head(trained):
    import math

    from pdseg_qupath.learn.fit import logit_adjustment
    from pdseg_qupath.learn.options import TrainOptions

    adj = logit_adjustment(np.array([0.75, 0.25, 0.0]), np.array([50.0, 50.0, 10.0]))
    assert adj[0] == pytest.approx(math.log(0.75 / (50 / 110)))
    assert adj[1] == pytest.approx(math.log(0.25 / (50 / 110)))
    assert adj[2] == 0.0  # a class absent from the annotations is left alone
    half = logit_adjustment(np.array([0.75, 0.25, 0.0]), np.array([50.0, 50.0, 10.0]), 0.5)
    assert half.tolist() == pytest.approx((0.5 * adj).tolist())  # a strength scales the shift
    assert logit_adjustment(np.array([0.75, 0.25]), np.array([50.0, 50.0]), 0.0) is None
    assert TrainOptions(prior_correction=True).prior_correction == 1.0  # the old on/off still reads
    assert TrainOptions(prior_correction=False).prior_correction == 0.0
    record = json.loads((trained.model_dir / "model.json").read_text())["training"]
    prior = record["prior"]
    shares = prior["annotated_share"]
    assert shares["Background"] > shares["Nucleus"] > 0 and sum(shares.values()) == pytest.approx(1, abs=1e-4)
    assert prior["logit_adjustment"][1] < 0 < prior["logit_adjustment"][0]
    assert prior["strength"] == record["options"]["prior_correction"]
    sampled = np.array([prior["sampled_share"][n] for n in shares])
    full = logit_adjustment(np.array(list(shares.values())), sampled)
    assert prior["logit_adjustment"] == pytest.approx((prior["strength"] * full).tolist(), abs=1e-3)


def test_context_head_trains_on_whole_maps_and_predicts(data, tmp_path):
    from pdseg_qupath.learn.predictor import Predictor

    res = train_tiny(data, tmp_path / "m", epochs=2, head="context", keep_features=True)
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["head"]["kind"] == "context" and meta["head"]["dilations"] == [1, 2, 4, 8]
    assert meta["head"]["rgb_skip"] is True and meta["training"]["options"]["head"] == "context"
    assert meta["features"]["blocks"] == [0, 1]  # tiny's default is (0, 1): from the coarsest already
    cache = meta["training"]["cache"]
    assert cache["form"] == "maps" and cache["views_train"] == res.cache["views_train"] > 0
    assert cache["bytes"] == (cache["views_train"] + cache["views_val"]) * cache["bytes_per_view"]
    assert cache["class_pixels_train"]["Nucleus"] > 0
    assert any("receptive field" in m for m in res.messages)  # 8-px overlap on 32-px tiles
    model = load_model(tmp_path / "m")
    assert model.head.config.kind == "context"
    tiles = np.full((2, 32, 32, 3), 200, np.uint8)
    logits = Predictor(model, device="cpu").logits(tiles, [(0, 0), (32, 0)])
    assert logits.shape == (2, 2, 32, 32) and np.isfinite(logits).all()
    again = train_tiny(data, tmp_path / "m", epochs=2, head="context", keep_features=True)
    assert again.resumed and again.history == res.history  # map shards reload bit for bit


def test_texture_head_trains_resumes_and_predicts(data, tmp_path):
    from pdseg_qupath.learn.head import head_members
    from pdseg_qupath.learn.predictor import Predictor

    res = train_tiny(data, tmp_path / "m", epochs=2, head="context", keep_features=True)  # on by default
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["head"]["texture"] is True and meta["training"]["options"]["texture"] is None  # the head's default
    model = load_model(tmp_path / "m")
    for member in head_members(model.head):  # statistics of the training tiles' maps, not the defaults
        assert member.config.texture and not torch.equal(member.tstd, torch.ones(78))
    tiles = np.full((2, 32, 32, 3), 200, np.uint8)
    tiles[1, 8:24, 8:24] = (120, 60, 140)
    logits = Predictor(model, device="cpu").logits(tiles, [(0, 0), (32, 0)])
    assert logits.shape == (2, 2, 32, 32) and np.isfinite(logits).all()
    again = train_tiny(data, tmp_path / "m", epochs=2, head="context", keep_features=True)
    assert again.resumed and again.history == res.history
    plain = train_tiny(data, tmp_path / "p", epochs=2, head="context", texture=False, keep_features=True)
    assert plain.history != res.history  # the maps change what the head learns
    with pytest.raises(PdsegError, match="--texture needs the context head"):
        train_tiny(data, tmp_path / "q", epochs=1, head="pixel", texture=True)


def test_context_head_cache_budget_keeps_every_tile_before_augmented_copies(data, tmp_path):
    from pdseg_qupath.learn.cache import bytes_per_map
    from pdseg_qupath.learn.predictor import load_extractor

    per_view = bytes_per_map(load_extractor("random:tiny", "cpu")[1].channels, 32, 4)
    # 8 validation views + 16 of the 2 x 12 training views: every tile once, 4 of them augmented once
    res = train_tiny(data, tmp_path / "m", epochs=1, head="context", cache_mb=24 * per_view / 2**20, ensemble=1)
    assert any("holds all 12 training tiles but only 4 of their 12 augmented views" in m for m in res.messages)
    assert sorted(res.plan.views) == [1] * 8 + [2] * 4 and len(res.plan.tiles) == 12
    assert res.cache["views_train"] == 16 and res.cache["bytes"] <= 24 * per_view
    # 8 + 6: 6 of the 12 tiles, one view each
    res = train_tiny(data, tmp_path / "n", epochs=1, head="context", cache_mb=14 * per_view / 2**20, ensemble=1)
    assert any("holds the feature maps of 6 of 12 training tiles, one view each" in m for m in res.messages)
    assert res.cache["views_train"] == 6 and res.plan.views == [1] * 6
    with pytest.raises(PdsegError, match="too small for the context head"):
        train_tiny(data, tmp_path / "o", epochs=1, head="context", cache_mb=8.5 * per_view / 2**20, ensemble=1)


def test_automatic_split_is_stratified_by_class():
    from pdseg_qupath.learn.sampling import image_classes, split_images

    # the case: 8 images, "Normal" on 3 of them, a plain random split often held out 2 of the 3
    imgs = fake_images([{"Tumor", "Stroma", "Normal"}] * 3 + [{"Tumor", "Stroma"}] * 5)
    for seed in range(20):
        train, val = split_images(imgs, None, 0.2, np.random.default_rng(seed))
        assert len(val) == 2 and sorted(train + val) == list(range(8))
        assert sum(1 for i in val if "Normal" in image_classes(imgs[i])) == 1
    # a class on one image only stays in training; every class on two or more images is validated
    imgs = fake_images([{"A", "B"}, {"A"}, {"A", "C"}, {"A", "C"}, {"A", "B", "D"}])
    for seed in range(20):
        train, val = split_images(imgs, None, 0.4, np.random.default_rng(seed))
        seen = set().union(*(image_classes(imgs[i]) for i in val))
        assert set().union(*(image_classes(imgs[i]) for i in train)) == {"A", "B", "C", "D"}
        assert {"B", "C"} <= seen and 4 not in val
    # nothing can be held out without losing a class: no image split
    assert split_images(fake_images([{"A"}, {"B"}]), None, 0.5, np.random.default_rng(0)) == ([0, 1], [])


def test_class_missing_from_validation_is_warned(data, tmp_path):
    from pdseg_qupath.sources.inputs import open_source
    from pdseg_qupath.tasks.train import train as train_model

    src = tmp_path / "src"
    shutil.copytree(data, src)
    make_image(src, "plain", seed=7, n_nuclei=0)  # Background only
    res = train_model(open_source(src), tmp_path / "m", backbone="random:tiny", mpp=0.5, image_mpp=0.5, epochs=1,
                      device="cpu", val_images=["plain.png"], options=small_options())
    # every head validates on the image the user chose: one warning, with the single split's advice
    blind = [m for m in res.messages if "'Nucleus' has no annotation in the validation images" in m]
    assert len(blind) == 1 and "choose --val-images" in blind[0] and "heads" not in blind[0], blind
    auto = train_model(open_source(src), tmp_path / "n", backbone="random:tiny", mpp=0.5, image_mpp=0.5, epochs=1,
                       device="cpu", options=small_options(val_fraction=0.3))
    assert auto.val_images != ["plain.png"] and not any("validation images" in m for m in auto.messages)


def test_both_heads_tap_the_backbones_default_blocks():
    """Blocks 1, 2 beat 0–2 for the context head too (docs/ACCURACY.md, "Which up blocks")."""
    from pdseg_qupath.learn.predictor import load_extractor

    assert load_extractor("random:small", "cpu")[1].blocks == (1, 2)
    assert load_extractor("random:small", "cpu", blocks=[0, 1, 2])[1].blocks == (0, 1, 2)


def test_run_interrupted_in_a_later_head_resumes_there_and_ends_the_same(trained, data, tmp_path, monkeypatch):
    import pdseg_qupath.outputs.plots as report

    real = report.write_training_curve

    def crash_in_head_2(history, path, *a, **kw):
        real(history, path, *a, **kw)
        if path.name == "training_curve_2.png" and len(history) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_training_curve", crash_in_head_2)
    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        train_tiny(data, out, epochs=3)
    assert len(list((out / ".pdseg-train").glob("checkpoint-*.pt"))) == 2  # head 1 done, head 2 at epoch 2
    monkeypatch.setattr(report, "write_training_curve", real)
    resumed = train_tiny(data, out, epochs=3)
    assert resumed.resumed and not (out / ".pdseg-train").exists()
    assert resumed.model.training["ensemble"] == trained.model.training["ensemble"]
    a, b = trained.model.head.state_dict(), resumed.model.head.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _large_image_wins(real):
    """``real`` (a tile sampler) with every draw over several images landing on img0 only."""
    def draw(imgs, which, *a):
        tiles = real(imgs, which, *a)
        return [t for t in tiles if imgs[t.image].record.name == "img0.png"] if len(which) > 1 else tiles

    return draw


def test_a_head_whose_images_drew_no_tiles_gets_its_own(data, tmp_path, monkeypatch):
    """A small annotated region next to a large one can draw none of the shared training tiles; the head that
    trains on it alone would learn from nothing (NaN feature statistics: a model that predicts nothing)."""
    import pdseg_qupath.tasks.train as train_mod

    monkeypatch.setattr(train_mod, "sample_tiles", _large_image_wins(train_mod.sample_tiles))
    res = train_tiny(data, tmp_path / "m", epochs=1)
    heads = res.model.training["ensemble"]
    assert ["img1.png"] in [h["train_images"] for h in heads]
    assert all(torch.isfinite(v).all() for v in res.model.head.state_dict().values())


def test_retraining_with_fewer_heads_leaves_no_curves_of_the_old_ones(data, tmp_path):
    out = tmp_path / "m"
    train_tiny(data, out, epochs=1, ensemble=3)
    assert (out / "training_curve_3.png").is_file()
    (out / "training_curve_notes.png").write_bytes(b"x")  # not a head's curve: left alone
    train_tiny(data, out, epochs=1, ensemble=2)
    assert (out / "training_curve_2.png").is_file() and not (out / "training_curve_3.png").exists()
    assert (out / "training_curve_notes.png").is_file()


def test_a_head_whose_validation_images_drew_no_tiles_gets_its_own(data, tmp_path, monkeypatch):
    """Validation tiles are drawn from all held-out images together: a small image next to a large one can draw
    none, and its head would then have been 'validated' on its training tiles, without early stopping."""
    import pdseg_qupath.tasks.train as train_mod

    monkeypatch.setattr(train_mod, "grid_tiles", _large_image_wins(train_mod.grid_tiles))
    res = train_tiny(data, tmp_path / "m", epochs=1)
    heads = res.model.training["ensemble"]
    assert ["img1.png"] in [h["val_images"] for h in heads]
    assert all(h["best"]["val_loss"] is not None for h in heads), heads


def test_map_cache_with_a_capacity_fills_one_allocation_and_matches_concatenation():
    from pdseg_qupath.learn.cache import MapCache

    rng = np.random.default_rng(0)

    def shard(n: int, first: int) -> MapCache:
        part = MapCache(3)
        for i in range(n):
            part.add_map(torch.randn(3, 4, 4), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
                         rng.integers(0, 3, (16, 16), dtype=np.uint8), first + i)
        return part

    parts = [shard(5, 0), shard(4, 5), shard(2, 9)]
    plain, filled = MapCache(3), MapCache(3, capacity=11)
    for p in parts:
        plain.extend(p)
        filled.extend(p)
    a, b = plain.tensors(), filled.tensors()
    assert all(torch.equal(a[k], b[k]) for k in a) and filled.views == 11 and len(filled) == len(plain)
    assert b["features"].untyped_storage().data_ptr() == filled._full["features"].untyped_storage().data_ptr()  # no copy
    with pytest.raises(ValueError, match="holds 11 views"):
        filled.extend(shard(1, 11))
