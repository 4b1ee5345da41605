"""The fast encoder: found beside a backbone's weights, checked before use, chosen on a CPU, recorded in the
model and followed by predict; the shipped one for `small` stays close to the VQ encoder's features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pdseg_qupath.backbone import fast_encoder as fe
from pdseg_qupath.backbone.features import LDMFeatures
from pdseg_qupath.backbone.folder import save_backbone
from pdseg_qupath.backbone.model import build_backbone
from pdseg_qupath.backbone.spec import load_backbone
from pdseg_qupath.core.errors import PdsegError

from _loop_data import make_folder, small_options


@pytest.fixture(scope="module")
def tiny_with_fast(tmp_path_factory) -> Path:
    """A tiny backbone folder (not flagged random) with a (randomly initialised) fast encoder beside it."""
    root = tmp_path_factory.mktemp("bb") / "tiny"
    src = build_backbone("tiny")
    save_backbone(src, root, {"trained_on": "test"}, random_weights=False)
    bb = load_backbone(root)
    torch.manual_seed(0)
    cfg = bb.config
    fe.save_fast_encoder(fe.FastEncoder(width=16, blocks=1, factor=cfg.vq_factor, out_ch=cfg.latent_channels),
                         bb, root, {"note": "test"})
    return root


def _tiles(n: int = 2, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_auto_is_fast_on_cpu_and_the_pass_uses_it(tiny_with_fast, monkeypatch):
    monkeypatch.delenv(fe.ENCODER_ENV, raising=False)
    bb = load_backbone(tiny_with_fast)
    fast = LDMFeatures(bb, device="cpu", encoder="auto")
    vq = LDMFeatures(bb, device="cpu", encoder="vq")
    assert fast.encoder == "fast" and vq.encoder == "vq" and fast.channels == vq.channels
    assert "fast encoder" in fast.summary() and "fast encoder" not in vq.summary()
    x = _tiles()
    a, b = fast.extract(x), vq.extract(x)
    assert a.shape == b.shape and torch.isfinite(a).all()
    assert not torch.allclose(a, b)  # a random fast encoder makes other latents than the VQ encoder
    # the same as handing the loaded module over by hand
    same = LDMFeatures(bb, device="cpu", encoder=fe.load_fast_encoder(bb)).extract(x)
    assert torch.equal(a, same)


def test_env_and_reference_choose_vq(tiny_with_fast, monkeypatch):
    bb = load_backbone(tiny_with_fast)
    monkeypatch.setenv(fe.ENCODER_ENV, "vq")
    assert LDMFeatures(bb, device="cpu", encoder="auto").encoder == "vq"
    assert LDMFeatures(bb, device="cpu", encoder="fast").encoder == "fast"  # asked for by name
    monkeypatch.setenv(fe.ENCODER_ENV, "nonsense")
    with pytest.raises(PdsegError, match="PDSEG_ENCODER"):
        LDMFeatures(bb, device="cpu", encoder="auto")
    monkeypatch.delenv(fe.ENCODER_ENV)
    assert LDMFeatures(bb, device="cpu", encoder="auto", reference=True).encoder == "vq"


def test_backbones_without_one_use_vq_and_refuse_fast(monkeypatch):
    monkeypatch.delenv(fe.ENCODER_ENV, raising=False)
    bb = build_backbone("tiny")
    assert LDMFeatures(bb, device="cpu", encoder="auto").encoder == "vq"
    with pytest.raises(PdsegError, match="no fast encoder"):
        LDMFeatures(bb, device="cpu", encoder="fast")
    with pytest.raises(PdsegError, match="auto, vq or fast"):
        LDMFeatures(bb, device="cpu", encoder="turbo")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_or_foreign_weights_are_refused(tiny_with_fast, tmp_path):
    root = _copy(tiny_with_fast, tmp_path / "bb")
    w = root / fe.FOLDER / fe.WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(PdsegError, match="sha256 does not match"):
        LDMFeatures(load_backbone(root), device="cpu", encoder="fast")

    root = _copy(tiny_with_fast, tmp_path / "bb2")
    cfg_path = root / fe.FOLDER / fe.CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, teacher_sha256="0" * 64)))
    with pytest.raises(PdsegError, match="distilled from a VQ encoder with weights 000000000000"):
        LDMFeatures(load_backbone(root), device="cpu", encoder="fast")
    cfg_path.write_text(json.dumps(dict(cfg, scaling_factor=0.5)))
    with pytest.raises(PdsegError, match="latent scaling factor 0.5"):
        LDMFeatures(load_backbone(root), device="cpu", encoder="fast")
    first = {k: v for k, v in cfg.items() if k not in ("teacher_sha256", "scaling_factor")}  # the first format
    cfg_path.write_text(json.dumps(first))
    assert LDMFeatures(load_backbone(root), device="cpu", encoder="fast").encoder == "fast"
    cfg_path.write_text(json.dumps(dict(first, backbone_sha256="0" * 64)))
    with pytest.raises(PdsegError, match="distilled from backbone weights 000000000000"):
        LDMFeatures(load_backbone(root), device="cpu", encoder="fast")

    cfg_path.write_text(json.dumps(dict(cfg, arch={"width": "48; rm -rf /"})))
    with pytest.raises(PdsegError, match="positive integers"):
        LDMFeatures(load_backbone(root), device="cpu", encoder="fast")
    cfg_path.write_text("{not json")
    with pytest.raises(PdsegError, match="unreadable"):
        LDMFeatures(load_backbone(root), device="cpu", encoder="fast")


def _nudged(bb, part: str):
    """A copy of ``bb`` with one weight of its ``unet`` or ``vq`` changed."""
    import copy

    out = copy.deepcopy(bb)
    with torch.no_grad():
        next(getattr(out, part).parameters()).add_(0.01)
    return out


def test_it_belongs_to_the_first_stage_not_to_the_unet(tiny_with_fast, tmp_path):
    """Another UNet over the same VQ weights (a fine-tune with --steps-ae 0) may use it; other VQ weights may not."""
    import shutil

    bb = load_backbone(tiny_with_fast)
    save_backbone(_nudged(bb, "unet"), tmp_path / "ft", {"trained_on": "test"}, random_weights=False)
    ft = load_backbone(tmp_path / "ft")
    assert ft.sha256 != bb.sha256 and fe.teacher_digest(ft) == fe.teacher_digest(bb)
    assert fe.carry_fast_encoder(bb, tmp_path / "ft").startswith("kept")
    assert LDMFeatures(load_backbone(tmp_path / "ft"), device="cpu", encoder="auto").encoder == "fast"

    save_backbone(_nudged(bb, "vq"), tmp_path / "ae", {"trained_on": "test"}, random_weights=False)
    msg = fe.carry_fast_encoder(bb, tmp_path / "ae")
    assert msg.startswith("no fast encoder: the autoencoder changed") and "--steps-ae 0" in msg
    assert fe.fast_encoder_folder(load_backbone(tmp_path / "ae")) is None
    shutil.copytree(tiny_with_fast / fe.FOLDER, tmp_path / "ae" / fe.FOLDER)  # copied in by hand: refused
    with pytest.raises(PdsegError, match="distilled from a VQ encoder with weights"):
        LDMFeatures(load_backbone(tmp_path / "ae"), device="cpu", encoder="fast")
    assert "no fast encoder" in fe.carry_fast_encoder(build_backbone("tiny"), tmp_path / "ae")


def test_train_records_the_encoder_and_predict_follows_it(tiny_with_fast, tmp_path, monkeypatch):
    from pdseg_qupath.learn.modelio import load_model
    from pdseg_qupath.learn.predictor import Predictor
    from pdseg_qupath.sources.inputs import open_source
    from pdseg_qupath.tasks.train import train

    monkeypatch.delenv(fe.ENCODER_ENV, raising=False)
    data = make_folder(tmp_path / "data")
    res = train(open_source(data), tmp_path / "m", backbone=str(tiny_with_fast), mpp=0.5, image_mpp=0.5,
                epochs=1, device="cpu", options=small_options(ensemble=1))
    model_json = json.loads((res.model_dir / "model.json").read_text())
    assert model_json["features"]["encoder"] == "fast"
    # predict follows the model even where auto would say otherwise
    monkeypatch.setenv(fe.ENCODER_ENV, "vq")
    pred = Predictor(load_model(res.model_dir), device="cpu")
    assert pred.extractor.encoder == "fast"
    # a model from before the field existed used the VQ encoder
    del model_json["features"]["encoder"]
    (res.model_dir / "model.json").write_text(json.dumps(model_json))
    assert Predictor(load_model(res.model_dir), device="cpu").extractor.encoder == "vq"


def test_shipped_small_fast_encoder_stays_close_to_the_vq_encoder():
    """The shipped weights load, verify against their recorded sha256 and backbone, and on real H&E give
    features within 10 % (relative) of the VQ encoder's; a random fast encoder is nowhere near."""
    from PIL import Image

    bb = load_backbone("small")
    assert fe.fast_encoder_folder(bb) is not None, "the shipped `small` should carry fast_encoder/"
    he = Path(__file__).parent / "fixtures" / "gbm40" / "01.png"  # a brain tumour tile it never trained on
    x = np.ascontiguousarray(np.asarray(Image.open(he).convert("RGB"))[None, 128:384, 128:384])
    vq = LDMFeatures(bb, device="cpu", encoder="vq", precision="fp32").extract(x)
    fast = LDMFeatures(bb, device="cpu", encoder="fast", precision="fp32").extract(x)
    rel = float((fast - vq).norm() / vq.norm())
    torch.manual_seed(1)
    cfg = json.loads((fe.fast_encoder_folder(bb) / fe.CONFIG_NAME).read_text())
    rand = LDMFeatures(bb, device="cpu", encoder=fe.FastEncoder(**cfg["arch"]), precision="fp32").extract(x)
    rel_rand = float((rand - vq).norm() / vq.norm())
    assert rel < 0.10 < rel_rand, (rel, rel_rand)
