"""Pretraining: a tiny config trains from a fixture, reloads, extracts features, resumes bit-exactly."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pdseg_qupath.backbone.features import LDMFeatures
from pdseg_qupath.backbone.folder import MANIFEST, save_backbone
from pdseg_qupath.backbone.model import build_backbone
from pdseg_qupath.backbone.spec import SHIPPED_WEIGHTS, load_backbone
from pdseg_qupath.core.errors import MissingPixelSizeError, PdsegError
from pdseg_qupath.core.stain import hed_jitter, hed_to_rgb, rgb_to_hed
from pdseg_qupath.learn import pretrain as pt
from pdseg_qupath.learn.pretrain_data import collect_images, sample_pool
from pdseg_qupath.tasks.pretrain import pretrain

FIXTURE = Path(__file__).parent / "fixtures" / "pretrain"
TINY = dict(config="tiny", steps_ae=4, steps_unet=3, batch_size=4, image_mpp=0.5, pool_size=16,
            heldout=4, checkpoint_every=100)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions are slower with two threads on a shared 2-core machine; restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pre") / "tiny"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec = pretrain([FIXTURE], out, **TINY)
    finally:
        torch.set_num_threads(n)
    return out, rec


def test_tiny_pretrain_reloads_and_extracts_features(tiny_run: tuple[Path, dict]) -> None:
    out, rec = tiny_run
    bb = load_backbone(out, verify=True)
    assert not bb.random_weights and bb.config.name == "tiny"
    manifest = json.loads((out / MANIFEST).read_text())
    assert rec["sha256"] == manifest["sha256"] == bb.sha256
    feats = LDMFeatures(bb).extract(np.asarray(Image.open(FIXTURE / "cmu1_crop.png"))[None, :32, :32])
    assert feats.shape == (1, LDMFeatures(bb).channels, 8, 8) and torch.isfinite(feats).all()
    # The weights changed from the seeded random init, and both stages left a record.
    rand = build_backbone("tiny")
    assert not torch.equal(rand.unet.conv_in.weight, bb.unet.conv_in.weight)
    assert not torch.equal(rand.vq.encoder.conv_in.weight, bb.vq.encoder.conv_in.weight)
    assert rec["ae"]["steps"] == 4 and rec["unet"]["steps"] == 3
    assert len(rec["history"]["ae_loss"]) == 4 and len(rec["history"]["unet_loss"]) == 3
    assert 5 < rec["ae"]["psnr_db"] < 60 and rec["ae"]["psnr_on"] == "4 held-out tiles"
    assert rec["data"]["train_tiles"] == 16 and rec["data"]["images"] == 1
    assert rec["latent"]["normalised"] and np.allclose(rec["latent"]["after_std"], 1, atol=1e-3)
    assert rec["command"].startswith("pdseg-qupath pretrain") and "--steps-ae 4" in rec["command"]
    for png in ("loss_ae.png", "loss_unet.png", "reconstructions.png"):
        assert Image.open(out / "pretrain" / png).size[0] > 50
    assert not out.with_name(out.name + ".pretrain-state").exists()  # checkpoint cleaned up


@pytest.mark.slow
def test_resume_after_interrupt_is_bit_identical(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    straight, rec_a = tiny_run
    out = tmp_path / "resumed"
    for stop in (("ae", 2), ("unet", 1)):
        def hook(stage: str, step: int, stop: tuple[str, int] = stop) -> None:
            if (stage, step) == stop:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            pretrain([FIXTURE], out, on_step=hook, resume=True, **TINY)
        assert (tmp_path / "resumed.pretrain-state" / pt.CHECKPOINT).is_file()
        assert not (out / MANIFEST).exists()
    rec_b = pretrain([FIXTURE], out, resume=True, **TINY)
    assert rec_b["sha256"] == rec_a["sha256"]
    assert rec_b["history"]["ae_loss"] == rec_a["history"]["ae_loss"]


def test_fine_tune_from_existing_backbone_keeps_its_latent_space(tiny_run: tuple[Path, dict],
                                                                   tmp_path: Path) -> None:
    src, _ = tiny_run
    kw = {**TINY, "steps_ae": 0, "steps_unet": 2}
    del kw["config"]
    rec = pretrain([FIXTURE], tmp_path / "ft", from_spec=str(src), **kw)
    assert rec["from"] == str(src) and rec["config"] == "tiny"
    assert rec["latent"]["normalised"] is False and rec["unet"]["lr"] == 5e-5
    # The starting backbone's held-out ε-loss is measured before the first step (the fine-tune's baseline);
    # a run from random weights has no such point.
    first_step, start_loss = rec["history"]["unet_heldout"][0]
    assert first_step == 0 and rec["unet"]["heldout_eps_loss_start"] == start_loss > 0
    assert rec["unet"]["heldout_eps_loss"] != start_loss
    assert all(k > 0 for k, _ in tiny_run[1]["history"]["unet_heldout"])
    a, b = load_backbone(src), load_backbone(tmp_path / "ft")
    assert all(torch.equal(p, q) for p, q in zip(a.vq.parameters(), b.vq.parameters()))
    assert not torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)
    with pytest.raises(PdsegError, match="differs"):
        pretrain([FIXTURE], tmp_path / "x", from_spec=str(src), **{**kw, "config": "small"})


def test_a_fine_tune_that_keeps_the_autoencoder_keeps_its_fast_encoder(tiny_run: tuple[Path, dict],
                                                                      tmp_path: Path) -> None:
    import shutil

    from pdseg_qupath.backbone import fast_encoder as fe

    src = tmp_path / "with-fast"
    shutil.copytree(tiny_run[0], src)
    start = load_backbone(src)
    torch.manual_seed(0)
    fe.save_fast_encoder(fe.FastEncoder(width=16, blocks=1, factor=start.config.vq_factor,
                                        out_ch=start.config.latent_channels), start, src, {"note": "test"})
    kw = {**TINY, "steps_ae": 0, "steps_unet": 2}
    del kw["config"]
    rec = pretrain([FIXTURE], tmp_path / "ft", from_spec=str(src), **kw)
    assert rec["fast_encoder"].startswith("kept")
    ft = load_backbone(tmp_path / "ft")
    assert ft.sha256 != start.sha256 and fe.teacher_digest(ft) == fe.teacher_digest(start)  # new UNet, same encoder
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    fast = LDMFeatures(ft, device="cpu", encoder="auto")
    assert fast.encoder == "fast"
    assert torch.equal(fe.load_fast_encoder(ft)(torch.ones(1, 3, 32, 32)),
                       fe.load_fast_encoder(start)(torch.ones(1, 3, 32, 32)))
    assert json.loads((tmp_path / "ft" / "pretrain" / "record.json").read_text())["fast_encoder"] == rec["fast_encoder"]
    # Retraining the autoencoder changes the latents: no fast encoder, and the record says why.
    rec = pretrain([FIXTURE], tmp_path / "ft-ae", from_spec=str(src), **{**kw, "steps_ae": 2})
    assert rec["fast_encoder"].startswith("no fast encoder: the autoencoder changed")
    assert fe.fast_encoder_folder(load_backbone(tmp_path / "ft-ae")) is None
    assert LDMFeatures(load_backbone(tmp_path / "ft-ae"), device="cpu", encoder="auto").encoder == "vq"
    assert fast.extract(x).shape[1] == LDMFeatures(ft, device="cpu", encoder="vq").extract(x).shape[1]


def test_from_small_starts_from_the_shipped_weights() -> None:
    plan = pt.plan_run([str(FIXTURE)], config=None, from_spec="small", mpp=1.2, image_mpp=1.2, steps_ae=0,
                       steps_unet=10, batch_size=None, device="cpu", seed=0, pool_size=16, heldout=4, ae_crop=None,
                       unet_crop=None, lr_ae=None, lr_unet=None, stain_sigma=0.15, stain_bias=0.03)
    shipped = json.loads((SHIPPED_WEIGHTS / "small" / MANIFEST).read_text())["sha256"]
    assert plan.start is not None and plan.start.sha256 == shipped and not plan.start.random_weights
    assert not plan.fresh and plan.config.name == "small" and plan.settings.lr_unet == 5e-5
    assert torch.equal(plan.start.unet.conv_in.weight, load_backbone("small").unet.conv_in.weight)


def test_half_precision_folder_loads_as_fp32(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = tiny_run
    a = load_backbone(src)
    half = save_backbone(copy.deepcopy(a).to(torch.float16), tmp_path / "half", {"weights_dtype": "float16"})
    b = load_backbone(half, verify=True)
    assert b.unet.conv_in.weight.dtype == torch.float32 and not b.random_weights
    assert json.loads((half / MANIFEST).read_text())["record"]["weights_dtype"] == "float16"
    tile = np.asarray(Image.open(FIXTURE / "cmu1_crop.png"))[None, :32, :32]
    fa, fb = LDMFeatures(a).extract(tile), LDMFeatures(b).extract(tile)
    assert ((fa - fb).norm() / fa.norm()) < 1e-2
    assert (half / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size < 0.6 * (
        src / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size


def test_refuses_to_overwrite_or_silently_restart(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = tiny_run
    with pytest.raises(PdsegError, match="already exists"):
        pretrain([FIXTURE], out, **TINY)
    assert pretrain([FIXTURE], out, resume=True, **TINY)["ae"]["steps"] == 4  # finished: no-op
    new = tmp_path / "b"

    def stop(stage: str, step: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain([FIXTURE], new, on_step=stop, **TINY)
    with pytest.raises(PdsegError, match="--resume"):
        pretrain([FIXTURE], new, **TINY)
    with pytest.raises(PdsegError, match="steps_ae"):
        pretrain([FIXTURE], new, resume=True, **{**TINY, "steps_ae": 5})


def test_latent_normalisation_keeps_reconstructions() -> None:
    bb = build_backbone("tiny")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = pt._encode(bb.vq, x)
    before = pt._reconstruct(bb.vq, x)
    mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
    pt._bake_normalisation(bb.vq, mean, std)
    z2 = pt._encode(bb.vq, x)
    assert torch.allclose(z2.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z2.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)
    assert torch.allclose(pt._reconstruct(bb.vq, x), before, atol=1e-5)


def test_pool_is_tissue_only_seeded_and_held_out_apart(tmp_path: Path) -> None:
    tissue = np.asarray(Image.open(FIXTURE / "cmu1_crop.png").convert("RGB"))
    img = np.full((192, 384, 3), 250, np.uint8)  # right half: glass
    img[:, :192] = tissue
    Image.fromarray(img).save(tmp_path / "half.png")
    refs = collect_images([tmp_path])
    a = sample_pool(refs, mpp=0.5, tile=32, n_train=40, n_heldout=4, seed=3, image_mpp=0.5)
    b = sample_pool(refs, mpp=0.5, tile=32, n_train=40, n_heldout=4, seed=3, image_mpp=0.5)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.heldout, b.heldout)
    glassy = (a.train.min(axis=-1) >= 245).mean(axis=(1, 2))  # fraction of glass pixels per tile
    assert glassy.max() <= 0.5 and 30 <= a.images[0]["tissue_cells"] <= 36  # of 72 cells: left half only
    # No training tile may share pixels with a held-out cell: no held-out tile reappears in training.
    for h in a.heldout:
        assert not any(np.array_equal(h[:8, :8], t[y:y + 8, x:x + 8]) for t in a.train
                       for y in range(0, 25, 8) for x in range(0, 25, 8))


def test_sources_errors(tmp_path: Path) -> None:
    with pytest.raises(PdsegError, match="no such"):
        collect_images([tmp_path / "missing.svs"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(PdsegError, match="no images"):
        collect_images([tmp_path / "empty"])
    with pytest.raises(MissingPixelSizeError, match="--image-mpp"):
        sample_pool(collect_images([FIXTURE]), mpp=0.5, tile=32, n_train=2, n_heldout=0, seed=0)


def test_hed_jitter_is_mild_and_invertible() -> None:
    rgb = np.asarray(Image.open(FIXTURE / "cmu1_crop.png").convert("RGB"))[:64, :64]
    assert np.array_equal(hed_to_rgb(rgb_to_hed(rgb)), rgb)
    batch = np.stack([rgb] * 4)
    out = hed_jitter(batch, np.random.default_rng(0))
    again = hed_jitter(batch, np.random.default_rng(0))
    assert np.array_equal(out, again)
    diffs = [np.abs(o.astype(int) - rgb).mean() for o in out]
    assert 0 < min(diffs) and max(diffs) < 12 and len(set(np.round(diffs, 6))) == 4
    white = hed_jitter(np.full((3, 4, 4, 3), 255, np.uint8), np.random.default_rng(1))
    assert white.min() >= 245


def rec_dtype(manifest: dict) -> str:
    return manifest["record"].get("weights_dtype", "float32")


def test_shipped_small_weights_load_and_match_their_sha256() -> None:
    folder = SHIPPED_WEIGHTS / "small"
    manifest = json.loads((folder / MANIFEST).read_text())
    total = 0
    for rel, info in manifest["files"].items():
        data = (folder / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"], rel
        total += len(data)
    assert total < 20e6
    assert rec_dtype(manifest) == "float16"
    bb = load_backbone("small", verify=True)
    assert not bb.random_weights and bb.sha256 == manifest["sha256"]
    rec = manifest["record"]
    assert rec["config"] == "small" and rec["ae"]["psnr_db"] > 20
    assert "gbm40" not in json.dumps(rec["data"]).lower()  # never pretrained on the evaluation set
    tile = np.asarray(Image.open(FIXTURE / "cmu1_crop.png").convert("RGB"))[None, :64, :64]
    feats = LDMFeatures(bb).extract(tile)
    assert feats.shape[-2:] == (16, 16) and torch.isfinite(feats).all()
