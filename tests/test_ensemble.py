"""Ensembles of heads (``train --ensemble K``): the averaging, the model folder, the splits, each head's data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _helpers import fake_images
from pdseg_qupath.core.annotations import ClassMap
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.learn.cache import MapCache, PixelCache, Rows
from pdseg_qupath.learn.fit import fit_head, new_head
from pdseg_qupath.learn.head import FCNHead, HeadConfig, HeadEnsemble, head_members
from pdseg_qupath.learn.modelio import SegModel, load_model, save_model
from pdseg_qupath.learn.options import IOConfig, TrainOptions
from pdseg_qupath.learn.sampling import Tile, split_images
from pdseg_qupath.tasks.train import TilePlan, member_data


def _heads(n: int, kind: str = "context", channels: int = 6) -> list[FCNHead]:
    out = []
    for k in range(n):
        torch.manual_seed(k)
        h = FCNHead(HeadConfig.build(kind, channels, 3, stride=4)).eval()
        with torch.no_grad():
            for p in h.parameters():
                p.normal_(0, 0.5)
        out.append(h)
    return out


def test_ensemble_predicts_the_mean_of_its_heads_probabilities():
    heads = _heads(3)
    ens = HeadEnsemble(heads).eval()
    f, rgb = torch.randn(2, 6, 8, 8), torch.rand(2, 3, 32, 32) * 255
    with torch.no_grad():
        mean = torch.stack([torch.softmax(h(f, rgb), 1) for h in heads]).mean(0)
        got = torch.softmax(ens(f, rgb), 1)
    assert torch.allclose(got, mean, atol=1e-6)
    assert not torch.allclose(got, torch.softmax(heads[0](f, rgb), 1), atol=1e-3)  # the heads do differ
    assert ens.config == heads[0].config and head_members(ens) == heads and head_members(heads[0]) == [heads[0]]
    with pytest.raises(ValueError, match="one config"):
        HeadEnsemble([heads[0], _heads(1, "pixel")[0]])
    with pytest.raises(ValueError):
        HeadEnsemble(heads[:1])


def _model(head) -> SegModel:
    return SegModel(head, ClassMap.from_json({"classes": [{"index": i, "name": n, "color": [i * 80, 40, 40]} for i, n in enumerate("ABC")]}), IOConfig(0.5, 32, 8),
                    {"spec": "random:tiny", "random_weights": True}, {"t": [5], "blocks": [0, 1]})


def test_an_ensemble_model_folder_round_trips_and_says_its_format(tmp_path):
    ens = HeadEnsemble(_heads(3))
    save_model(_model(ens), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["format_version"] == 2 and meta["head"]["members"] == 3
    back = load_model(tmp_path / "m")
    assert isinstance(back.head, HeadEnsemble) and len(back.head.members) == 3
    f, rgb = torch.randn(1, 6, 8, 8), torch.rand(1, 3, 32, 32) * 255
    with torch.no_grad():
        assert torch.equal(back.head(f, rgb), ens.eval()(f, rgb))
    # one head keeps the format every earlier pdseg reads
    save_model(_model(_heads(1)[0]), tmp_path / "one")
    meta1 = json.loads((tmp_path / "one" / "model.json").read_text())
    assert meta1["format_version"] == 1 and "members" not in meta1["head"]
    assert isinstance(load_model(tmp_path / "one").head, FCNHead)
    # a member count that does not fit the weights is a clear error, not a half-loaded model
    meta["head"]["members"] = 2
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PdsegError, match="do not fit the head"):
        load_model(tmp_path / "m")
    for bad in ("three", 2.9, True, 0, 1e400):  # never rounded or taken as 1
        meta["head"]["members"] = bad
        (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
        with pytest.raises(PdsegError, match="malformed"):
            load_model(tmp_path / "m")


def test_later_heads_hold_out_images_the_earlier_ones_trained_on():
    imgs = fake_images([{"Gland", "Other"}] * 8)
    rng = np.random.default_rng(0)
    held: set[int] = set()
    vals = []
    for _ in range(3):
        train, val = split_images(imgs, None, 0.2, rng, avoid=held)
        assert sorted(train + val) == list(range(8)) and len(val) == 2
        vals.append(set(val))
        held |= set(val)
    assert len(held) == 6, vals  # three disjoint pairs: 6 of the 8 images validate some head
    # when every image has been held out, the avoided ones are used again rather than none
    train, val = split_images(imgs, None, 0.5, np.random.default_rng(1), avoid=set(range(8)))
    assert len(val) == 4


def test_each_head_trains_off_its_validation_images_and_stops_on_them():
    tiles = [Tile(0, 0, 0), Tile(1, 0, 0), Tile(2, 0, 0), Tile(2, 32, 0)]
    val_tiles = [Tile(1, 0, 0), Tile(2, 0, 0)]

    def cache(tile_ids):
        c = PixelCache(4)
        for t in tile_ids:
            c.features.append(torch.full((5, 4), float(t), dtype=torch.float16))
            c.rgb.append(torch.zeros((5, 3), dtype=torch.uint8))
            c.labels.append(torch.zeros(5, dtype=torch.uint8))
            c.tile.append(torch.full((5,), t, dtype=torch.int32))
        return c

    train, val = cache(range(4)), cache(range(2))
    plan = TilePlan([0, 1, 2], [1, 2], tiles, val_tiles, "image", members=[([0, 2], [1]), ([0, 1], [2])])
    tr, va = member_data(plan, 0, train.tensors(), val.tensors())
    assert sorted({tiles[i].image for i in tr["tile"].tolist()}) == [0, 2]
    assert {val_tiles[i].image for i in va["tile"].tolist()} == {1}
    tr, va = member_data(plan, 1, train.tensors(), val.tensors())
    assert sorted({tiles[i].image for i in tr["tile"].tolist()}) == [0, 1] and len(tr["labels"]) == 10
    assert {val_tiles[i].image for i in va["tile"].tolist()} == {2}
    # held-out tiles instead of images: every head shares the run's split
    tile_plan = TilePlan([0], [], tiles, val_tiles, "tile", members=[([0], [])] * 2)
    tr, va = member_data(tile_plan, 1, train.tensors(), val.tensors())
    assert len(tr["labels"]) == 20 and len(va["labels"]) == 10


def test_whole_views_are_indexed_not_copied_and_train_the_same_head():
    """A member's views of a MapCache are Rows of the shared tensors; a head fitted on them is bit-identical
    to one fitted on a copy of those views (what member_data made before)."""
    g = torch.Generator().manual_seed(0)
    tiles = [Tile(i % 3, 32 * i, 0) for i in range(9)]
    val_tiles = [Tile(0, 0, 32), Tile(1, 0, 32), Tile(2, 0, 32)]

    def cache(tile_ids):
        c = MapCache(6)
        for t in tile_ids:
            lab = torch.randint(0, 3, (16, 16), generator=g).to(torch.uint8).numpy()
            lab[:4] = 255
            rgb = torch.randint(0, 256, (16, 16, 3), generator=g).to(torch.uint8).numpy()
            c.add_map(torch.randn(6, 4, 4, generator=g), rgb, lab, t)
        return c

    train, val = cache(range(9)), cache(range(3))
    plan = TilePlan([0, 1, 2], [], tiles, val_tiles, "image", members=[([0, 1], [2]), ([1, 2], [0])])
    tr, va = member_data(plan, 1, train.tensors(), val.tensors())
    assert isinstance(tr["features"], Rows) and tr["features"].base is train.tensors()["features"]  # no copy
    keep = torch.tensor([tiles[int(t)].image != 0 for t in train.tensors()["tile"]])
    copy_tr = {k: v[keep] for k, v in train.tensors().items()}
    assert len(tr["labels"]) == 6 and tr["features"].shape == copy_tr["features"].shape
    assert tr["features"].ndim == 4 and tr["features"].dtype == torch.float16
    for i in (0, 5, slice(1, 4), [4, 0, 2]):
        assert torch.equal(tr["features"][i], copy_tr["features"][i])
    assert torch.equal(va["labels"][0], val.tensors()["labels"][0]) and len(va["labels"]) == 1
    keep_va = torch.tensor([val_tiles[int(t)].image == 0 for t in val.tensors()["tile"]])
    copy_va = {k: v[keep_va] for k, v in val.tensors().items()}

    names = ["A", "B", "C"]
    opts = TrainOptions(head="context", pixels_per_tile=64)
    heads = []
    for data, vdata in ((tr, va), (copy_tr, copy_va)):
        head = new_head(HeadConfig.build("context", 6, 3, stride=4), data["features"], 3)
        fit = fit_head(head, data, vdata, names, opts, epochs=3, seed=3, device="cpu", weight=None,
                       adjust=None, resume=None, messages=[])
        heads.append(fit.head.state_dict())
    assert heads[0].keys() == heads[1].keys()
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_ensemble_option_is_checked():
    assert TrainOptions().ensemble == 3
    for bad in (0, 17, 2.5, True):
        with pytest.raises(PdsegError, match="--ensemble"):
            TrainOptions(ensemble=bad)


def test_a_head_without_pixels_of_a_class_is_warned_and_one_without_any_is_refused():
    from pdseg_qupath.core.events import SILENT
    from pdseg_qupath.tasks.train import _check_member

    cmap = _model(_heads(1)[0]).class_map
    messages: list[str] = []
    _check_member(cmap, np.array([5, 3, 2]), np.array([4, 0, 1]), 1, 3, messages, SILENT)
    assert len(messages) == 1 and "head 2 of 3" in messages[0] and "'B'" in messages[0] and "'C'" not in messages[0]
    _check_member(cmap, np.array([5, 0, 2]), np.array([4, 0, 1]), 0, 3, messages, SILENT)  # no head has B: warned once
    assert len(messages) == 1
    with pytest.raises(PdsegError, match="head 3 of 3 has no labelled pixels"):
        _check_member(cmap, np.array([5, 3, 2]), np.array([0, 0, 0]), 2, 3, messages, SILENT)
