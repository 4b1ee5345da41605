"""``train --t auto --blocks auto``: image-wise cross-validation chooses the feature settings."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.learn import autotune
from pdseg_qupath.learn.options import TrainOptions

from _helpers import fake_images
from _loop_data import make_folder, train_tiny


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("src"), n=4)


@pytest.fixture
def quick_cv(monkeypatch):
    """A cheap search: few tiles per class and one head epoch per fold."""
    monkeypatch.setattr(autotune, "CV_TILES_PER_CLASS", 4)
    monkeypatch.setattr(autotune, "CV_EPOCHS", 1)


def test_group_folds_keep_images_whole_and_spread_rare_classes():
    imgs = fake_images([{"Tumor", "Stroma", "Normal"}] * 3 + [{"Tumor", "Stroma"}] * 6)
    for seed in range(10):
        folds = autotune.group_folds(imgs, list(range(9)), 4, np.random.default_rng(seed))
        flat = [i for f in folds for i in f]
        assert sorted(flat) == list(range(9)), "every image in exactly one fold"
        assert sorted(len(f) for f in folds) == [2, 2, 2, 3]
        normal = [sum(1 for i in f if i < 3) for f in folds]
        assert max(normal) == 1, f"the 3 images with Normal go to 3 different folds, got {normal}"


def test_grid_and_channel_slices_match_a_narrower_extraction():
    from pdseg_qupath.learn.predictor import load_extractor

    bb, _ = load_extractor("random:tiny", "cpu")
    cands = autotune.grid(bb.config, TrainOptions(t="auto", blocks="auto", head="context"), 1000)
    assert (cands[0].t, cands[0].blocks) == ((50,), (0, 1)), "the default comes first"
    assert {c.t for c in cands} == {(25,), (50,), (100,)} and {c.blocks for c in cands} == {(0, 1), (1,)}
    small = autotune.grid(SimpleNamespace(name="small", default_t=5, default_blocks=(1, 2)),
                          TrainOptions(t=100, blocks="auto"), 1000)
    assert [(c.t, c.blocks) for c in small] == [((100,), (1, 2)), ((100,), (0, 1, 2))]
    # a candidate's channels, sliced from the union pass, are the features a narrower pass gives
    from pdseg_qupath.learn.predictor import features_for

    tiles = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    union = features_for(bb, "cpu", (25, 50), (0, 1)).extract(tiles, origins=[(0, 0), (32, 8)])
    for cand in (autotune.Candidate((50,), (1,)), autotune.Candidate((25,), (0, 1))):
        narrow = features_for(bb, "cpu", cand.t, cand.blocks).extract(tiles, origins=[(0, 0), (32, 8)])
        idx = autotune.channel_index(bb.config.up_block_channels(), [25, 50], [0, 1], cand)
        assert torch.allclose(union[:, idx], narrow, atol=1e-4)


@pytest.mark.slow
def test_auto_search_is_recorded_and_the_saved_model_uses_its_choice(data, tmp_path, quick_cv, monkeypatch):
    from pdseg_qupath.learn.modelio import load_model
    from pdseg_qupath.learn.predictor import Predictor

    real = autotune._fold_score
    seen = []

    def spy(tr, te, images, train_idx, *a, **kw):
        # images, not tiles, are the unit: no held-out row comes from a training image of its fold
        assert set(tr["image"].tolist()) <= set(train_idx)
        assert not set(te["image"].tolist()) & set(train_idx)
        seen.append(int(tr["features"].shape[1]))
        return real(tr, te, images, train_idx, *a, **kw)

    monkeypatch.setattr(autotune, "_fold_score", spy)
    monkeypatch.setattr(autotune, "T_GRID", {"tiny": (50, 25)})
    res = train_tiny(data, tmp_path / "m", epochs=1, t="auto", blocks="auto")
    rec = json.loads((tmp_path / "m" / "model.json").read_text())["training"]["auto"]
    assert rec["requested"] == {"t": "auto", "blocks": "auto"} and rec["fallback"] is None
    assert rec["method"]["folds"] == 4 and sorted(n for f in rec["method"]["fold_images"] for n in f) == \
        ["img0.png", "img1.png", "img2.png", "img3.png"]
    cands = rec["candidates"]
    assert len(cands) == 4 and len(seen) == 16 and all(len(c["fold_scores"]) == 4 for c in cands)
    assert seen[:4] == [96] * 4 and seen[4:8] == [32] * 4, "each candidate sees its own channels (t 50: 0,1 then 1)"
    for c in cands:
        assert c["mean"] == pytest.approx(np.mean([s for s in c["fold_scores"] if s is not None]), abs=1e-4)
    best = max(c["mean"] for c in cands)
    chosen = next(c for c in cands if c["mean"] == best)  # the first best: the default wins ties
    assert rec["choice"] == {"t": chosen["t"], "blocks": chosen["blocks"]}
    assert rec["estimate"] == chosen["mean"]
    assert res.model.features["t"] == chosen["t"] and res.model.features["blocks"] == chosen["blocks"]
    pred = Predictor(load_model(tmp_path / "m"), device="cpu")
    assert list(pred.extractor.t) == chosen["t"] and list(pred.extractor.blocks) == chosen["blocks"]


def test_a_better_candidate_is_chosen_and_predicted_with(data, tmp_path, quick_cv, monkeypatch):
    from pdseg_qupath.learn.modelio import load_model
    from pdseg_qupath.learn.predictor import Predictor

    # a stand-in score that prefers block 1 alone (32 channels) at any t
    monkeypatch.setattr(autotune, "_fold_score", lambda tr, *a, **kw: 0.9 if tr["features"].shape[1] == 32 else 0.5)
    monkeypatch.setattr(autotune, "T_GRID", {"tiny": (50, 100)})
    res = train_tiny(data, tmp_path / "m", epochs=1, t="auto", blocks="auto")
    rec = res.model.training["auto"]
    assert [(c["t"], c["blocks"]) for c in rec["candidates"]] == [([50], [0, 1]), ([50], [1]), ([100], [0, 1]),
                                                                   ([100], [1])]
    assert rec["choice"] == {"t": [50], "blocks": [1]}, "of equal scores the first (the default t) is kept"
    assert res.model.features["blocks"] == [1] and res.model.head.config.in_channels == 32
    assert Predictor(load_model(tmp_path / "m"), device="cpu").extractor.blocks == (1,)


def test_best_mean_wins_and_ties_keep_the_default():
    C = autotune.Candidate
    assert autotune.best([C((5,), (0,), [0.5, 0.5]), C((25,), (0,), [0.4, 0.6])]) == 0
    assert autotune.best([C((5,), (0,), [0.5, 0.5]), C((25,), (0,), [0.4, 0.7]), C((9,), (0,), [0.55])]) == 1
    assert autotune.best([C((5,), (0,), [None]), C((25,), (0,), [0.1, None])]) == 1
    assert C((5,), (0,), [0.2, None, 0.4]).mean == pytest.approx(0.3)


def test_a_given_t_is_not_overridden(data, tmp_path, quick_cv, monkeypatch):
    monkeypatch.setattr(autotune, "_fold_score", lambda tr, *a, **kw: 0.9 if tr["features"].shape[1] == 32 else 0.5)
    res = train_tiny(data, tmp_path / "m", epochs=1, t=[100], blocks="auto")
    rec = res.model.training["auto"]
    assert rec["requested"] == {"t": [100], "blocks": "auto"}
    assert {tuple(c["t"]) for c in rec["candidates"]} == {(100,)}
    assert res.model.features["t"] == [100] and res.model.features["blocks"] == [1]


def test_one_labelled_image_falls_back_to_the_defaults(data, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    for f in ("img0.png", "img0.geojson"):
        (one / f).write_bytes((data / f).read_bytes())
    res = train_tiny(one, tmp_path / "o", epochs=1, t="auto", blocks="auto", views=1)
    rec = res.model.training["auto"]
    lines = [m for m in res.messages if "cross-validation" in m]
    assert len(lines) == 1 and "1 labelled image" in lines[0] and "defaults are used" in lines[0]
    assert rec["fallback"] == lines[0] and rec["choice"] == {"t": [50], "blocks": [0, 1]}
    assert res.model.features["t"] == [50] and res.model.features["blocks"] == [0, 1]


def test_bad_auto_values_are_one_line_errors():
    from pdseg_qupath.cli import _int_list_or_auto

    with pytest.raises(PdsegError, match="or auto"):
        TrainOptions(t="often")
    assert _int_list_or_auto("Auto", "--t") == "auto" and _int_list_or_auto("5,25", "--t") == [5, 25]
    assert _int_list_or_auto(None, "--t") is None


def test_the_search_table_is_shown_through_events():
    from io import StringIO

    from rich.console import Console

    from pdseg_qupath.ui import ConsoleEvents

    s = autotune.Search({"t": "auto", "blocks": "auto"},
                        [autotune.Candidate((5,), (0, 1, 2), [0.6, 0.7]), autotune.Candidate((25,), (1, 2), [0.7, 0.8])],
                        choice=1, fold_images=[["a.png"], ["b.png"]], tiles=8)
    buf = StringIO()
    ConsoleEvents(Console(file=buf, width=120), plain=True).show("autotune", s.record())
    text = buf.getvalue()
    assert "2 folds" in text and "0.650" in text and "0.750" in text
    assert next(ln for ln in text.splitlines() if "chosen" in ln).split()[:2] == ["25", "1,2"]
    assert s.summary().startswith("expected macro Dice ≈ 0.750 (image-wise CV, 2 folds)")
