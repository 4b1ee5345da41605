"""Checkpoint conversion against fake checkpoints in the ORIGINAL CompVis / Lightning key layout.

The fake checkpoints are built from a tiny diffusers model by an inverse key map written here from
the original module structure (openaimodel.UNetModel: input_blocks / middle_block / output_blocks;
model.Encoder/Decoder: down.N.block.M, mid.block_1, up.N.upsample ...), so the test exercises
diffusers' converters on the real naming, not on their own output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

from pdseg_qupath.backbone.config import CONFIGS, BackboneConfig
from pdseg_qupath.backbone.convert import config_from_ldm_yaml, convert_checkpoint, read_state_dict
from pdseg_qupath.backbone.model import build_backbone
from pdseg_qupath.backbone.spec import load_backbone
from pdseg_qupath.core.errors import PdsegError

_RES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def _res(rest: str) -> str:
    for new, old in _RES:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise AssertionError(rest)


def unet_to_ldm(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> openaimodel.UNetModel keys."""
    r = cfg["layers_per_block"]
    attn_up = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    for k, v in sd.items():
        mod, leaf = k.rsplit(".", 1)
        if mod in fixed:
            out[f"{fixed[mod]}.{leaf}"] = v
            continue
        m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", k)
        if m:
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            if kind == "downsamplers":
                out[f"input_blocks.{(b + 1) * (r + 1)}.0.op.{rest.split('.', 1)[1]}"] = v
            else:
                idx = 1 + b * (r + 1) + j
                out[f"input_blocks.{idx}.0.{_res(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"] = v
            continue
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)
        if m:
            kind, j, rest = m[1], int(m[2]), m[3]
            out[f"middle_block.{2 * j}.{_res(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"] = v
            continue
        m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", k)
        assert m, k
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            out[f"output_blocks.{b * (r + 1) + r}.{2 if attn_up[b] else 1}.conv.{rest.split('.', 1)[1]}"] = v
        else:
            idx = b * (r + 1) + j
            out[f"output_blocks.{idx}.0.{_res(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"] = v
    return out


def vq_to_ldm(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """diffusers VQModel keys -> taming/ldm VQModelInterface keys (attention as 1x1 convs)."""
    n = len(cfg["block_out_channels"])
    out = {}
    for k, v in sd.items():
        k2 = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k2)
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                    lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                    lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.", k2)
        k2 = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k2)
        if "mid_block.attentions.0." in k2:
            k2 = k2.replace("mid_block.attentions.0.", "mid.attn_1.")
            for new, old in [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                             ("to_out.0", "proj_out")]:
                k2 = k2.replace(f".{new}.", f".{old}.")
            if v.dim() == 2:
                v = v[:, :, None, None]
        out[k2] = v
    return out


TINY_YAML = {
    "model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 8, "channels": 3,
        "conditioning_key": "crossattn", "cond_stage_trainable": True,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
            "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 1,
            "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 512}},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
            "embed_dim": 3, "n_embed": 64, "ddconfig": {
                "double_z": False, "z_channels": 3, "resolution": 32, "in_channels": 3, "out_ch": 3,
                "ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.SSLEmbedder", "params": {
            "patch_embed_dim": 12, "region_embed_dim": 24, "normalize_ssl": True}},
    }}}


def _yaml_cfg() -> BackboneConfig:
    """The tiny architecture the YAML above describes, built with random weights for the fake ckpt."""
    cfg = CONFIGS["tiny-cond"]
    vq = dict(cfg.vq, mid_block_add_attention=True)  # ddconfig always has a mid attention layer
    cond = dict(cfg.conditioner, out_dim=512)
    unet = dict(cfg.unet, cross_attention_dim=512)
    return cfg.replace(vq=vq, unet=unet, conditioner=cond)


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A Lightning-style checkpoint in the original layout, plus its YAML and the source backbone."""
    d = tmp_path_factory.mktemp("ckpt")
    (d / "tiny.yaml").write_text(yaml.safe_dump(TINY_YAML))
    bb = build_backbone(_yaml_cfg())
    with torch.no_grad():  # random-looking, non-default values everywhere (norms included)
        g = torch.Generator().manual_seed(1)
        for p in [*bb.unet.parameters(), *bb.vq.parameters(), *bb.conditioner.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    sd = {}
    sd.update({"model.diffusion_model." + k: v.clone() for k, v in unet_to_ldm(bb.unet.state_dict(), bb.config.unet).items()})
    sd.update({"first_stage_model." + k: v.clone() for k, v in vq_to_ldm(bb.vq.state_dict(), bb.config.vq).items()})
    sd.update({"cond_stage_model." + k: v.clone() for k, v in bb.conditioner.state_dict().items()})
    sched = DDPMScheduler(**bb.config.scheduler)
    sd["betas"] = sched.betas.clone()
    sd["alphas_cumprod"] = sched.alphas_cumprod.clone()
    sd["inception.Mixed_7c.conv.weight"] = torch.zeros(2, 2)  # FID tracker: must be ignored
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 10}, d / "tiny.ckpt")
    return {"dir": d, "sd": sd, "bb": bb, "ckpt": d / "tiny.ckpt", "yaml": d / "tiny.yaml"}


def test_inverse_map_has_original_key_counts() -> None:
    """The paper UNet has 688 original keys and the VQ 205 (with codebook), as diffusers' converters map them."""
    cfg = CONFIGS["pathsegdiff-brca-20x"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg.unet)
        vq = VQModel(**cfg.vq)
    u = unet_to_ldm(unet.state_dict(), cfg.unet)
    v = vq_to_ldm(vq.state_dict(), cfg.vq)
    assert len(u) == 688 and len(v) == 205
    assert "output_blocks.2.2.conv.weight" in u and "output_blocks.8.2.conv.weight" in u
    assert "middle_block.1.transformer_blocks.0.attn2.to_k.weight" in u
    assert "decoder.up.2.upsample.conv.weight" in v and "encoder.mid.attn_1.proj_out.weight" in v


def test_paper_keys_all_convert_on_meta() -> None:
    """diffusers' converters map all 688 UNet keys and, with our codebook fix, all 205 VQ keys."""
    from pdseg_qupath.backbone.convert import convert_state_dict

    cfg = CONFIGS["pathsegdiff-brca-20x"].replace(conditioner=None)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg.unet)
        vq = VQModel(**cfg.vq)
    sd = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), cfg.unet).items()}
    sd.update({"first_stage_model." + k: v for k, v in vq_to_ldm(vq.state_dict(), cfg.vq).items()})
    parts, report = convert_state_dict(sd, cfg)
    assert report["converted_keys"] == {"unet": 688, "vqvae": 205}


def test_yaml_parses_to_diffusers_config() -> None:
    cfg = config_from_ldm_yaml_str(yaml.safe_dump(TINY_YAML))
    assert cfg.scheduler["beta_schedule"] == "scaled_linear"
    assert cfg.scheduler["beta_start"] == 0.0015 and cfg.scheduler["beta_end"] == 0.0195
    assert cfg.vq["scaling_factor"] == 1.0 and cfg.vq["mid_block_add_attention"] is True
    assert cfg.unet["block_out_channels"] == [32, 64] and cfg.unet["attention_head_dim"] == 1
    assert cfg.unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert cfg.conditioner["in_dims"] == [12, 24] and cfg.conditioner["normalize"] is True


def test_paper_yaml_matches_shipped_config(tmp_path: Path) -> None:
    """The published only_ssl.yaml (architecture part) parses to exactly our pathsegdiff-brca-20x."""
    doc = {"model": {"params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 192,
            "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 5],
            "num_heads": 1, "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 512}},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
            "embed_dim": 3, "n_embed": 8192, "ddconfig": {
                "double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": []}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.SSLEmbedder", "params": {
            "patch_embed_dim": 384, "region_embed_dim": 768, "normalize_ssl": True}}}}}
    p = tmp_path / "only_ssl.yaml"
    p.write_text(yaml.safe_dump(doc))
    cfg = config_from_ldm_yaml(p)
    ref = CONFIGS["pathsegdiff-brca-20x"]
    assert cfg.unet == ref.unet and cfg.vq == ref.vq and cfg.scheduler == ref.scheduler
    assert cfg.default_blocks == ref.default_blocks
    assert cfg.conditioner["in_dims"] == [384, 768] and cfg.conditioner["out_dim"] == 512


def config_from_ldm_yaml_str(text: str) -> BackboneConfig:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.yaml"
        p.write_text(text)
        return config_from_ldm_yaml(p)


def test_convert_round_trip_identical_outputs(fake: dict, tmp_path: Path) -> None:
    out = tmp_path / "bb"
    record = convert_checkpoint(fake["ckpt"], fake["yaml"], out)
    assert record["ignored_keys"] == {"inception": 1, "schedule": 2}
    assert record["converted_keys"]["unet"] == len(fake["bb"].unet.state_dict())
    assert len(record["source_sha256"]) == 64
    # diffusers loads the folder directly
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet").eval()
    vq = VQModel.from_pretrained(out, subfolder="vqvae").eval()
    sched = DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    assert vq.config.scaling_factor == 1.0
    assert torch.equal(sched.alphas_cumprod, DDPMScheduler(**fake["bb"].config.scheduler).alphas_cumprod)
    ref = fake["bb"]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 8, 8, generator=g)
    ctx = torch.randn(2, 2, 512, generator=g)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        assert torch.equal(unet(z, 50, ctx).sample, ref.unet(z, 50, ctx).sample)
        assert torch.equal(vq.encode(x).latents, ref.vq.encode(x).latents)
        assert torch.equal(vq.quantize.embedding.weight, ref.vq.quantize.embedding.weight)
    # and pdseg loads it, with the embedder and the manifest
    bb = load_backbone(out)
    assert not bb.random_weights and bb.sha256 and bb.conditioner is not None
    cond = {"feat_20x": torch.randn(2, 12, generator=g), "feat_5x": torch.randn(2, 24, generator=g)}
    with torch.no_grad():
        assert torch.equal(bb.conditioner(cond), ref.conditioner(cond))
    manifest = json.loads((out / "pdseg_backbone.json").read_text())
    assert manifest["record"]["source_sha256"] == record["source_sha256"]


def _save_variant(fake: dict, tmp_path: Path, change) -> Path:
    sd = dict(fake["sd"])
    change(sd)
    p = tmp_path / "v.ckpt"
    torch.save({"state_dict": sd}, p)
    return p


def test_unknown_key_is_an_error(fake: dict, tmp_path: Path) -> None:
    ckpt = _save_variant(fake, tmp_path, lambda sd: sd.__setitem__("model.diffusion_model.extra.weight", torch.zeros(1)))
    with pytest.raises(PdsegError, match="match nothing.*extra.weight"):
        convert_checkpoint(ckpt, fake["yaml"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_key_is_an_error(fake: dict, tmp_path: Path) -> None:
    ckpt = _save_variant(fake, tmp_path, lambda sd: sd.pop("first_stage_model.quantize.embedding.weight"))
    with pytest.raises(PdsegError, match="VQ first stage.*missing 1.*quantize.embedding.weight"):
        convert_checkpoint(ckpt, fake["yaml"], tmp_path / "out")


def test_wrong_yaml_is_an_error(fake: dict, tmp_path: Path) -> None:
    y = json.loads(json.dumps(TINY_YAML))
    y["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    p = tmp_path / "wrong.yaml"
    p.write_text(yaml.safe_dump(y))
    with pytest.raises(PdsegError, match="does not fit the YAML"):
        convert_checkpoint(fake["ckpt"], p, tmp_path / "out")


def test_schedule_mismatch_is_an_error(fake: dict, tmp_path: Path) -> None:
    ckpt = _save_variant(fake, tmp_path, lambda sd: sd.__setitem__("betas", sd["betas"] * 1.5))
    with pytest.raises(PdsegError, match="noise schedule"):
        convert_checkpoint(ckpt, fake["yaml"], tmp_path / "out")


def test_ema_weights_are_preferred(fake: dict, tmp_path: Path) -> None:
    """LitEma stores 'model_ema.diffusion_model<dots removed>'; with >100 of them they win."""
    def add_ema(sd: dict) -> None:
        for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
            sd["model_ema." + k[len("model."):].replace(".", "")] = sd[k] + 1.0
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(5, dtype=torch.int)
    ckpt = _save_variant(fake, tmp_path, add_ema)
    rec = convert_checkpoint(ckpt, fake["yaml"], tmp_path / "ema")
    assert rec["unet_weights"] == "ema"
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "ema", subfolder="unet")
    ref = fake["bb"].unet.state_dict()["conv_in.weight"]
    assert torch.equal(unet.state_dict()["conv_in.weight"], ref + 1.0)
    rec = convert_checkpoint(ckpt, fake["yaml"], tmp_path / "raw", use_ema=False)
    assert rec["unet_weights"] == "raw"


class Evil:
    def __reduce__(self):  # would run code on unpickling
        return (print, ("pwned",))


def test_arbitrary_pickle_is_refused(fake: dict, tmp_path: Path) -> None:
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": dict(fake["sd"]), "hyper_parameters": Evil()}, p)
    with pytest.raises(PdsegError, match="refused to open.*arbitrary code.*safetensors"):
        read_state_dict(p)


def test_safetensors_input_and_bare_state_dict(fake: dict, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    p = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in fake["sd"].items()}, p)
    assert set(read_state_dict(p)) == set(fake["sd"])
    q = tmp_path / "bare.pt"  # ZoomLDM's weights.ckpt is a bare state dict
    torch.save(dict(fake["sd"]), q)
    assert set(read_state_dict(q)) == set(fake["sd"])


def test_truncated_checkpoint_is_a_clear_error(fake: dict, tmp_path: Path) -> None:
    data = fake["ckpt"].read_bytes()
    p = tmp_path / "cut.ckpt"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(PdsegError, match="cut.ckpt"):
        read_state_dict(p)


def test_output_folder_is_never_overwritten(fake: dict, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(PdsegError, match="not empty"):
        convert_checkpoint(fake["ckpt"], fake["yaml"], out)
    assert (out / "keep.txt").read_text() == "user data"


def test_zoomldm_yaml_and_embedder_keys(tmp_path: Path) -> None:
    """ZoomLDM's published YAML conditioner parses; its embedder keeps torchvision's key names."""
    cs = {"target": "ldm.modules.encoders.modules.EmbeddingViT2_5", "params": {
        "feat_key": "ssl_feat", "mag_key": "mag", "num_layers": 12, "input_channels": 1024,
        "hidden_channels": 512, "vit_mlp_dim": 2048, "p_uncond": 0.1}}
    y = json.loads(json.dumps(TINY_YAML))
    y["model"]["params"]["cond_stage_config"] = cs
    cfg = config_from_ldm_yaml_str(yaml.safe_dump(y))
    assert cfg.conditioner == CONFIGS["zoomldm"].conditioner
    from pdseg_qupath.backbone.conditioning import build_conditioner

    with torch.device("meta"):
        keys = set(build_conditioner(cfg.conditioner).state_dict())
    assert {"encoder.layers.encoder_layer_11.mlp.3.weight", "encoder.pos_embedding", "pad_token",
            "mag_embedding.weight", "layer_norm.weight", "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"} <= keys
    assert len(keys) == 155


def test_convert_backbone_command_writes_the_folder(fake: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pdseg_qupath.cli import app

    out = tmp_path / "bb"
    res = CliRunner().invoke(app, ["convert-backbone", str(fake["ckpt"]), "--config", str(fake["yaml"]),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "pdseg_backbone.json").is_file() and "backbone written to" in res.output
