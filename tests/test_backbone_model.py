"""Backbone configs, building, the diffusers-format folder, spec resolution and labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

from pdseg_qupath.backbone import hub, spec
from pdseg_qupath.backbone.config import CONFIGS
from pdseg_qupath.backbone.folder import save_backbone
from pdseg_qupath.backbone.model import RANDOM_LABEL, build_backbone, describe
from pdseg_qupath.backbone.spec import load_backbone
from pdseg_qupath.core.errors import PdsegError


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_paper_unet_has_400_92_m_parameters() -> None:
    bb = build_backbone("pathsegdiff-brca-20x", "meta")
    assert round(_params(bb.unet) / 1e6, 2) == 400.92
    assert bb.unet.device.type == "meta"
    assert len(bb.unet.state_dict()) == 688 and len(bb.vq.state_dict()) == 205
    assert [type(b).__name__ for b in bb.unet.down_blocks] == [
        "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    heads = {m.heads for m in bb.unet.modules() if type(m).__name__ == "Attention"}
    assert heads == {1}  # num_heads 1 (diffusers reads attention_head_dim as the head count)


def test_zoomldm_same_unet_and_vq() -> None:
    z, p = CONFIGS["zoomldm"], CONFIGS["pathsegdiff-brca-20x"]
    assert z.unet == p.unet and z.vq == p.vq and z.scheduler == p.scheduler
    bb = build_backbone("zoomldm", "meta")
    assert bb.conditioner.num_tokens == 65
    assert bb.null_context(2, "meta").shape == (2, 65, 512)


@pytest.mark.parametrize("name,low,high", [("small", 5e6, 8e6), ("base", 40e6, 80e6), ("tiny", 0, 2e6)])
def test_sizes_of_smaller_configs(name: str, low: float, high: float) -> None:
    bb = build_backbone(name, "meta")
    assert low <= _params(bb.unet) + _params(bb.vq) <= high


def test_small_config_shape() -> None:
    c = CONFIGS["small"]
    assert c.vq["block_out_channels"] == [32, 64, 64] and c.vq_factor == 4 and c.latent_channels == 3
    assert c.vq["mid_block_add_attention"] is False and c.conditioner is None
    assert c.unet["block_out_channels"] == [64, 128, 128]
    assert c.unet["down_block_types"] == ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"]


def test_schedule_is_compvis_linear() -> None:
    """CompVis 'linear' = linspace(sqrt b0, sqrt b1)^2 = diffusers 'scaled_linear'; diffusers' own
    'linear' would be off by more than 0.1 in alpha-bar."""
    s = build_backbone("tiny").scheduler
    betas = np.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), abar, rtol=1e-5)
    wrong = DDPMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="linear").alphas_cumprod.numpy()
    assert np.abs(wrong - abar).max() > 0.1


def test_random_weights_are_seeded_and_labelled() -> None:
    a, b = load_backbone("random:tiny"), build_backbone("tiny")
    assert torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)
    assert a.random_weights and RANDOM_LABEL in describe(a)
    assert RANDOM_LABEL == "RANDOM WEIGHTS (for tests/benchmarks only)"


def test_config_name_without_shipped_weights_is_random(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(spec, "SHIPPED_WEIGHTS", tmp_path)
    bb = load_backbone("tiny")
    assert bb.random_weights and bb.spec == "tiny" and RANDOM_LABEL in describe(bb)


def test_shipped_weights_are_used(monkeypatch, tmp_path: Path) -> None:
    src = build_backbone("tiny")
    save_backbone(src, tmp_path / "tiny", {"trained_on": "test"}, random_weights=False)
    monkeypatch.setattr(spec, "SHIPPED_WEIGHTS", tmp_path)
    bb = load_backbone("tiny")
    assert not bb.random_weights and RANDOM_LABEL not in describe(bb)
    assert bb.sha256 and bb.sha256[:12] in describe(bb)


def test_save_load_round_trip(tmp_path: Path) -> None:
    src = build_backbone("tiny-cond")
    out = save_backbone(src, tmp_path / "bb", {"note": "round trip"})
    assert {p.name for p in out.iterdir()} == {"unet", "vqvae", "scheduler", "conditioner", "pdseg_backbone.json"}
    manifest = json.loads((out / "pdseg_backbone.json").read_text())
    assert manifest["record"] == {"note": "round trip"} and manifest["config_name"] == "tiny-cond"
    assert manifest["random_weights"] is True and len(manifest["sha256"]) == 64
    bb = load_backbone(str(out))
    assert bb.random_weights and RANDOM_LABEL in describe(bb)  # random stays flagged after saving
    for a, b in [(src.unet, bb.unet), (src.vq, bb.vq), (src.conditioner, bb.conditioner)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert bb.config == src.config
    # diffusers reads the same folder directly
    UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    VQModel.from_pretrained(out, subfolder="vqvae")
    assert load_backbone(out, verify=True).sha256 == bb.sha256


def test_save_never_overwrites(tmp_path: Path) -> None:
    src = build_backbone("tiny")
    save_backbone(src, tmp_path / "bb")
    with pytest.raises(PdsegError, match="not empty"):
        save_backbone(src, tmp_path / "bb")
    save_backbone(src, tmp_path / "bb", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bb"]  # no temp or backup left behind


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    return save_backbone(build_backbone("tiny"), tmp_path / "bb")


def test_truncated_weights_name_the_file(saved: Path) -> None:
    w = saved / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(PdsegError, match=r"unet/diffusion_pytorch_model.safetensors.*truncated"):
        load_backbone(saved)


def test_corrupt_weights_name_the_file(saved: Path) -> None:
    w = saved / "vqvae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[:8] = b"\xff" * 8  # header length now absurd; same size, so only parsing catches it
    w.write_bytes(bytes(data))
    with pytest.raises(PdsegError, match=r"vqvae/diffusion_pytorch_model.safetensors"):
        load_backbone(saved)


def test_flipped_byte_caught_on_load(saved: Path) -> None:
    w = saved / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    load_backbone(saved, verify=False)  # sizes match: only the checksum tells
    with pytest.raises(PdsegError, match="sha256 does not match"):
        load_backbone(saved)


@pytest.mark.parametrize("rel", ["unet/config.json", "pdseg_backbone.json", "scheduler/scheduler_config.json"])
def test_missing_config_names_the_file(saved: Path, rel: str) -> None:
    (saved / rel).unlink()
    with pytest.raises(PdsegError, match=rel.replace(".", r"\.")):
        load_backbone(saved)


def test_invalid_json_names_the_file(saved: Path) -> None:
    (saved / "vqvae" / "config.json").write_text("{not json")
    with pytest.raises(PdsegError, match=r"vqvae/config\.json.*not valid JSON"):
        load_backbone(saved)


def test_unknown_spec_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(PdsegError, match="pathsegdiff-brca-20x"):
        load_backbone("no-such-model")
    with pytest.raises(PdsegError, match="unknown backbone config"):
        load_backbone("random:nope")
    f = tmp_path / "model.ckpt"
    f.write_bytes(b"x")
    with pytest.raises(PdsegError, match="convert-backbone"):
        load_backbone(str(f))


def _no_network(exc):
    def raise_(*a, **k):
        raise exc
    return raise_


@pytest.mark.parametrize("kind", ["offline", "gated", "missing"])
def test_hub_failures_say_what_to_download(monkeypatch, tmp_path: Path, kind: str) -> None:
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    resp = SimpleNamespace(headers={}, request=None, status_code=403)
    exc = {"offline": lambda: LocalEntryNotFoundError("no connection"),
           "gated": lambda: GatedRepoError("gated", response=resp),
           "missing": lambda: RepositoryNotFoundError("404", response=resp)}[kind]()
    monkeypatch.setenv("PDSEG_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", _no_network(exc))
    with pytest.raises(PdsegError) as e:
        load_backbone("StonyBrook-CVLab/ZoomLDM")
    msg = str(e.value)
    assert "hf download StonyBrook-CVLab/ZoomLDM --local-dir DIR" in msg
    assert "convert-backbone" in msg and "--backbone DIR" in msg
    assert {"offline": "offline", "gated": "accept its terms", "missing": "no such repo"}[kind] in msg


def test_hub_repo_with_several_models_asks_to_pick(monkeypatch, tmp_path: Path) -> None:
    import huggingface_hub

    monkeypatch.setenv("PDSEG_CACHE", str(tmp_path))
    files = ["README.md", "brca/weights.ckpt", "brca/config.yaml", "naip/weights.ckpt", "naip/config.yaml"]
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo: files)
    with pytest.raises(PdsegError, match="StonyBrook-CVLab/ZoomLDM:brca or StonyBrook-CVLab/ZoomLDM:naip"):
        load_backbone("StonyBrook-CVLab/ZoomLDM")


def test_hub_diffusers_folder(monkeypatch, tmp_path: Path) -> None:
    import huggingface_hub

    snap = tmp_path / "snap"
    save_backbone(build_backbone("tiny"), snap / "sub")
    monkeypatch.setenv("PDSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                        lambda self, repo: ["sub/pdseg_backbone.json", "sub/unet/config.json"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **k: str(snap))
    bb = load_backbone("someone/pdseg-tiny:sub")
    assert bb.spec == "someone/pdseg-tiny:sub" and bb.config.name == "tiny"


def test_context_shapes() -> None:
    bb = build_backbone("tiny-cond")
    null = bb.null_context(3)
    assert null.shape == (3, 2, 32)
    torch.testing.assert_close(null[0, 0], bb.conditioner.patch_fc.bias)  # zeroed embeddings -> biases
    assert torch.count_nonzero(build_backbone("tiny").null_context(2)) == 0
    with pytest.raises(PdsegError, match="expected"):
        bb.context(2, torch.zeros(2, 2, 7))
    assert hub.cache_root().name == "backbones"


def test_zoomldm_block_is_a_standard_prenorm_vit_block() -> None:
    """Our torchvision-named ViT block computes what nn.TransformerEncoderLayer(norm_first) does."""
    from pdseg_qupath.backbone.conditioning import _EncoderBlock

    torch.manual_seed(0)
    mine = _EncoderBlock(32, 4, 64).eval()
    ref = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", layer_norm_eps=1e-6,
                                           batch_first=True, norm_first=True).eval()
    names = {"self_attn.": "self_attention.", "linear1.": "mlp.0.", "linear2.": "mlp.3.",
             "norm1.": "ln_1.", "norm2.": "ln_2."}
    sd = {}
    for k, v in ref.state_dict().items():
        for a, b in names.items():
            if k.startswith(a):
                sd[b + k[len(a):]] = v
    mine.load_state_dict(sd, strict=True)
    x = torch.randn(2, 65, 32)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-5)


def test_zoomldm_tokens_centre_small_grids() -> None:
    torch.manual_seed(0)
    from pdseg_qupath.backbone.conditioning import ZoomLDMEmbedder

    e = ZoomLDMEmbedder(input_channels=8, hidden_channels=16, output_channels=16, vit_mlp_dim=32,
                        num_layers=1, num_heads=2)
    feat = torch.randn(1, 8, 2, 2)
    tok = e._tokens(feat)
    assert tok.shape == (1, 64, 16)
    torch.testing.assert_close(tok[0, 30:34], e.dim_reduce(feat.flatten(2).transpose(1, 2))[0])
    torch.testing.assert_close(tok[0, 0], e.pad_token[0, 0])
    one = e._tokens(torch.randn(1, 8, 1, 1))
    assert torch.equal(one[0, 31], e.pad_token[0, 0]) and not torch.equal(one[0, 32], e.pad_token[0, 0])
    out = e({"ssl_feat": torch.randn(2, 8, 8, 8), "mag": torch.tensor([0, 3])})
    assert out.shape == (2, 65, 16)
