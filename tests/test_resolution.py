"""The work resolution against the one the backbone's weights learned H&E at (train's note)."""

from __future__ import annotations

import types

from pdseg_qupath.backbone.folder import load_folder, save_backbone
from pdseg_qupath.backbone.model import LEARNED_MPP
from pdseg_qupath.backbone.spec import load_backbone
from pdseg_qupath.tasks.train import resolution_note


def test_learned_resolution_comes_from_the_pretrain_record(tmp_path):
    bb = load_backbone("random:tiny")
    assert bb.learned_mpp is None  # random weights learned nothing
    bb.random_weights = False  # stands in for trained weights: only the record matters here
    save_backbone(bb, tmp_path / "fine", record={"settings": {"mpp": 1.2}})
    save_backbone(bb, tmp_path / "plain", record={})
    save_backbone(bb, tmp_path / "odd", record={"settings": {"mpp": "1.2"}})
    assert load_folder(tmp_path / "fine").learned_mpp == 1.2
    assert load_folder(tmp_path / "plain").learned_mpp == LEARNED_MPP == 0.5
    assert load_folder(tmp_path / "odd").learned_mpp == LEARNED_MPP  # not a number: the default stays
    assert load_backbone("small").learned_mpp == 0.5  # the shipped weights, pretrained at 0.5 µm/px


def test_note_only_when_far_from_the_learned_resolution():
    bb = types.SimpleNamespace(spec="small", learned_mpp=0.5)
    assert resolution_note(0.5, bb) is None and resolution_note(0.7, bb) is None and resolution_note(0.34, bb) is None
    note = resolution_note(1.2, bb)
    assert note and "1.2 µm/px" in note and "--mpp 0.5" in note and "small" in note
    assert resolution_note(0.25, bb) and "--mpp 0.5" in resolution_note(0.25, bb)
    assert resolution_note(8.0, types.SimpleNamespace(spec="random:small", learned_mpp=None)) is None
