"""Convert an original CompVis / Lightning latent-diffusion checkpoint into a pdseg backbone folder.

Covers the Large-Image-Diffusion (PathSegDiff), ZoomLDM and PathLDM family: ``state_dict`` keys
``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VQ-f4) and ``cond_stage_model.*``
(embedder), plus the YAML that built them. The UNet and VQ keys go through diffusers' own converters
(``diffusers.loaders.single_file_utils``); the embedders keep their original parameter names.

Safety and honesty rules: checkpoints are opened with ``torch.load(weights_only=True)`` (memory-mapped
where possible, so a 1.6 GB file does not need 1.6 GB of RAM to read), and every checkpoint key must
be either converted or on a short list of known training-only keys — anything else is an error,
as is any weight the model expects but the checkpoint lacks.
"""

from __future__ import annotations

import pickle
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import yaml
from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

from pdseg_qupath import __version__
from pdseg_qupath.backbone.conditioning import build_conditioner
from pdseg_qupath.backbone.config import LDM_SCHEDULER, BackboneConfig, _unet, _vq, ldm_default_blocks
from pdseg_qupath.backbone.folder import write_folder
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.fileio import sha256_file

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VQ_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."
#: DDPM buffers derived from the schedule (checked against the YAML where present, never converted).
SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "scale_factor", "logvar",
}
#: Training-only prefixes: FID tracker, VQ training loss/EMA.
IGNORED_PREFIXES = ("inception.", "first_stage_model.loss.", "first_stage_model.model_ema.")


# ------------------------------------------------------------------------------------------- YAML

def config_from_ldm_yaml(path: str | Path, name: str | None = None) -> BackboneConfig:
    """Parse a CompVis latent-diffusion YAML into a BackboneConfig (diffusers kwargs)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PdsegError(f"{path}: cannot read the latent-diffusion YAML ({e})") from None
    try:
        p = doc["model"]["params"]
        up = p["unet_config"]["params"]
        fs = p["first_stage_config"]
    except (KeyError, TypeError):
        raise PdsegError(f"{path}: not a latent-diffusion config (needs model.params.unet_config and "
                         "model.params.first_stage_config)") from None
    where = str(path)
    scheduler = _scheduler_from(p, where)
    unet = _unet_from(up, where)
    vq = _vq_from(fs, where)
    cond = _conditioner_from(p.get("cond_stage_config"), where)
    scale = float(p.get("scale_factor", 1.0))
    vq["scaling_factor"] = scale
    if cond is not None:
        out = cond.get("out_dim", cond.get("output_channels"))
        if out != unet["cross_attention_dim"]:
            raise PdsegError(f"{path}: the conditioner makes {out}-d tokens but the UNet's context_dim is "
                             f"{unet['cross_attention_dim']}")
    n_levels = len(unet["block_out_channels"])
    return BackboneConfig(
        name=name or path.stem, vq=vq, unet=unet, scheduler=scheduler, conditioner=cond,
        default_t=50, default_blocks=ldm_default_blocks(n_levels),
        tile_size=int(vq.get("sample_size", 256)),
        notes=f"converted from {path.name}",
    )


def _scheduler_from(p: Mapping[str, Any], where: str) -> dict[str, Any]:
    sched = dict(LDM_SCHEDULER)
    sched["num_train_timesteps"] = int(p.get("timesteps", 1000))
    sched["beta_start"] = float(p.get("linear_start", 1e-4))
    sched["beta_end"] = float(p.get("linear_end", 2e-2))
    kind = p.get("beta_schedule", "linear")
    # CompVis "linear" is linspace(sqrt(b0), sqrt(b1))**2 == diffusers "scaled_linear".
    names = {"linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
    if kind not in names:
        raise PdsegError(f"{where}: beta_schedule {kind!r} is not supported (linear or cosine)")
    sched["beta_schedule"] = names[kind]
    param = p.get("parameterization", "eps")
    preds = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
    if param not in preds:
        raise PdsegError(f"{where}: parameterization {param!r} is not supported")
    sched["prediction_type"] = preds[param]
    return sched


def _unet_from(up: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not up.get("use_spatial_transformer", False):
        raise PdsegError(f"{where}: only UNets with use_spatial_transformer: true (cross-attention LDMs) "
                         "are supported")
    if up.get("context_dim") is None:
        raise PdsegError(f"{where}: unet_config.params.context_dim is missing")
    if int(up.get("transformer_depth", 1)) != 1:
        raise PdsegError(f"{where}: transformer_depth != 1 is not supported")
    nrb = up.get("num_res_blocks", 2)
    if not isinstance(nrb, int):
        raise PdsegError(f"{where}: a per-level num_res_blocks list is not supported")
    ch = int(up["model_channels"])
    mult = [int(m) for m in up["channel_mult"]]
    chans = tuple(ch * m for m in mult)
    attn_ds = {int(a) for a in up.get("attention_resolutions", [])}
    attn = tuple(2 ** i in attn_ds for i in range(len(mult)))
    heads_n = int(up.get("num_heads", -1))
    head_ch = int(up.get("num_head_channels", -1))
    if head_ch != -1:
        heads: int | list[int] = [c // head_ch for c in chans]
    elif heads_n > 0:
        heads = heads_n
    else:
        raise PdsegError(f"{where}: set num_heads or num_head_channels in unet_config.params")
    kw = _unet(chans, attn, layers=nrb, context=int(up["context_dim"]), heads=1,
               latent=int(up.get("in_channels", 3)), sample_size=int(up.get("image_size", 64)))
    kw["attention_head_dim"] = heads
    kw["out_channels"] = int(up.get("out_channels", kw["in_channels"]))
    kw["use_linear_projection"] = bool(up.get("use_linear_in_transformer", False))
    if up.get("num_classes") is not None:
        raise PdsegError(f"{where}: class-conditional UNets (num_classes) are not supported")
    return kw


def _vq_from(fs: Mapping[str, Any], where: str) -> dict[str, Any]:
    target = str(fs.get("target", ""))
    if not target.endswith(("VQModelInterface", "VQModel")):
        raise PdsegError(f"{where}: first stage {target!r} is not a VQ model; only VQ first stages "
                         "(VQModelInterface) are supported")
    fp = fs.get("params", {})
    dd = fp.get("ddconfig", {})
    if dd.get("attn_resolutions"):
        raise PdsegError(f"{where}: VQ attention in down/up levels (attn_resolutions) is not supported")
    if dd.get("double_z", False):
        raise PdsegError(f"{where}: ddconfig.double_z true is a KL autoencoder, not a VQ model")
    ch = int(dd["ch"])
    chans = tuple(ch * int(m) for m in dd["ch_mult"])
    kw = _vq(chans, attention=True, layers=int(dd.get("num_res_blocks", 2)), latent=int(dd["z_channels"]),
             n_embed=int(fp["n_embed"]), sample_size=int(dd.get("resolution", 256)))
    kw["vq_embed_dim"] = int(fp["embed_dim"])
    kw["in_channels"] = int(dd.get("in_channels", 3))
    kw["out_channels"] = int(dd.get("out_ch", 3))
    return kw


def _conditioner_from(cs: Any, where: str) -> dict[str, Any] | None:
    if cs is None or cs == "__is_unconditional__":
        return None
    target = str(cs.get("target", ""))
    cp = dict(cs.get("params") or {})
    short = target.rsplit(".", 1)[-1]
    if short == "SSLEmbedder":
        return {"type": "ssl", "in_dims": [int(cp.get("patch_embed_dim", 384)), int(cp.get("region_embed_dim", 768))],
                "out_dim": 512, "normalize": bool(cp.get("normalize_ssl", False)),
                "keys": [cp.get("patch_ssl_key", "feat_20x"), cp.get("region_ssl_key", "feat_5x")]}
    if short == "PatchEmbedder":
        return {"type": "ssl", "in_dims": [int(cp.get("patch_embed_dim", 768))],
                "out_dim": int(cp.get("target_dim", 512)), "normalize": bool(cp.get("normalize_ssl", False)),
                "keys": [cp.get("patch_ssl_key", "feat_patch")]}
    if short == "EmbeddingViT2_5":
        keys = ("input_channels", "hidden_channels", "output_channels", "vit_mlp_dim", "num_layers",
                "num_heads", "seq_length", "mag_levels")
        defaults = dict(input_channels=1024, hidden_channels=512, output_channels=512, vit_mlp_dim=2048,
                        num_layers=12, num_heads=8, seq_length=64, mag_levels=8)
        return {"type": "zoomldm", **{k: int(cp.get(k, defaults[k])) for k in keys}}
    raise PdsegError(f"{where}: conditioner {target!r} is not supported (SSLEmbedder, PatchEmbedder, "
                     "EmbeddingViT2_5)")


# ------------------------------------------------------------------------------------- checkpoint

def read_state_dict(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .ckpt/.pt (weights_only, mmap) or .safetensors file; never arbitrary unpickling."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise PdsegError(f"{ckpt}: checkpoint not found")
    if ckpt.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(ckpt)
        except (SafetensorError, OSError) as e:
            raise PdsegError(f"{ckpt}: unreadable safetensors file ({e})") from None
    obj = None
    for mmap in (True, False):
        try:
            obj = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except pickle.UnpicklingError as e:
            raise PdsegError(
                f"{ckpt}: refused to open — this checkpoint contains Python objects beyond tensors, and "
                "loading it would run arbitrary code from the file (torch.load weights_only=True "
                f"failed: {str(e).splitlines()[0][:200]}). If you trust its origin, extract the weights "
                "once in a separate Python session (torch.load with weights_only off, then ['state_dict']); "
                "save its tensors with safetensors.torch.save_file to weights.safetensors, and convert that file "
                "instead.") from None
        except RuntimeError as e:
            if mmap and "mmap" in str(e).lower():
                continue  # legacy (non-zip) format cannot be memory-mapped
            raise PdsegError(f"{ckpt}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
        except (EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
            raise PdsegError(f"{ckpt}: not a readable PyTorch checkpoint, or truncated ({e})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise PdsegError(f"{ckpt}: holds no state_dict (found {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def convert_state_dict(sd: Mapping[str, torch.Tensor], cfg: BackboneConfig, *,
                       use_ema: bool | str = "auto") -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Map original keys to diffusers (unet, vqvae) and embedder (conditioner) state dicts.

    Returns the parts and a report; raises PdsegError listing any unmatched or missing key.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    n_ema = sum(k.startswith(EMA_PREFIX) for k in sd)
    ema = n_ema > 100 if use_ema == "auto" else bool(use_ema)
    if ema and n_ema <= 100:
        raise PdsegError("EMA weights were asked for, but the checkpoint has no model_ema.* weights")
    unet_src = {k: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    unet_in = dict(unet_src)
    if ema:
        unet_in.update({k: v for k, v in sd.items() if k.startswith(EMA_PREFIX)})
    unet_sd = convert_ldm_unet_checkpoint(unet_in, dict(cfg.unet), extract_ema=ema)
    unet_sd = {k: v for k, v in unet_sd.items() if v is not None}
    vq_src = {k: v for k, v in sd.items() if k.startswith(VQ_PREFIX) and not k.startswith(IGNORED_PREFIXES)}
    vq_sd = convert_ldm_vae_checkpoint(vq_src, dict(cfg.vq))
    code = VQ_PREFIX + "quantize.embedding.weight"
    if code in vq_src:  # diffusers' VAE converter drops the VQ codebook
        vq_sd["quantize.embedding.weight"] = vq_src[code]
    cond_sd = {k[len(COND_PREFIX):]: v for k, v in sd.items() if k.startswith(COND_PREFIX)}

    # Every source tensor must have landed somewhere (tracked by identity: converters move, not copy).
    used = {id(v) for v in [*unet_sd.values(), *vq_sd.values(), *cond_sd.values()]}
    used |= {id(v._base) for v in [*unet_sd.values(), *vq_sd.values()] if v._base is not None}
    ignored: dict[str, int] = {}
    unmatched: list[str] = []
    for k, v in sd.items():
        if id(v) in used or (v._base is not None and id(v._base) in used):
            continue
        known = (k in SCHEDULE_BUFFERS or k.startswith(IGNORED_PREFIXES)
                 or k.startswith(EMA_PREFIX)  # EMA copy when raw weights are used; decay/num_updates
                 or (ema and k.startswith(UNET_PREFIX)))  # raw weights superseded by the EMA copy
        if known:
            group = k.split(".", 1)[0] if "." in k else "schedule"
            ignored[group] = ignored.get(group, 0) + 1
            continue
        unmatched.append(k)
    if unmatched:
        raise PdsegError(f"{len(unmatched)} checkpoint key(s) match nothing in the {cfg.name} architecture, "
                         f"e.g. {', '.join(sorted(unmatched)[:8])}. Check that the YAML belongs to this "
                         "checkpoint.")

    parts = {"unet": unet_sd, "vqvae": vq_sd}
    _check_fits(UNet2DConditionModel, cfg.unet, unet_sd, "UNet (model.diffusion_model.*)")
    _check_fits(VQModel, cfg.vq, vq_sd, "VQ first stage (first_stage_model.*)")
    if cfg.conditioner is not None:
        with torch.device("meta"):
            cond = build_conditioner(cfg.conditioner)
        _check_keys(cond.state_dict(), cond_sd, "conditioner (cond_stage_model.*)")
        parts["conditioner"] = cond_sd
    elif cond_sd:
        raise PdsegError(f"the checkpoint has {len(cond_sd)} cond_stage_model.* keys but the YAML "
                         "declares no conditioner")
    _check_schedule(sd, cfg)
    report = {"unet_weights": "ema" if ema else "raw", "ignored_keys": ignored,
              "converted_keys": {k: len(v) for k, v in parts.items()}}
    return parts, report


def _check_fits(cls: type, kwargs: Mapping[str, Any], state: Mapping[str, torch.Tensor], what: str) -> None:
    with torch.device("meta"):
        model = cls(**kwargs)
    _check_keys(model.state_dict(), state, what)


def _check_keys(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} (e.g. {', '.join(missing[:5])})")
    if extra:
        problems.append(f"unexpected {len(extra)} (e.g. {', '.join(extra[:5])})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} with the wrong shape (e.g. {k}: {tuple(got[k].shape)} vs "
                        f"{tuple(expected[k].shape)})")
    if problems:
        raise PdsegError(f"{what}: the checkpoint does not fit the YAML's architecture — "
                         + "; ".join(problems) + ". Check that the YAML belongs to this checkpoint.")


def _check_schedule(sd: Mapping[str, torch.Tensor], cfg: BackboneConfig) -> None:
    if "betas" in sd:
        ours = DDPMScheduler(**cfg.scheduler).betas.double()
        theirs = sd["betas"].double()
        if theirs.shape != ours.shape or float((theirs - ours).abs().max()) > 1e-6:
            raise PdsegError("the checkpoint's noise schedule (betas) differs from the YAML's "
                             "linear_start/linear_end/timesteps; check that the YAML belongs to this checkpoint")
    if "scale_factor" in sd:
        s = float(sd["scale_factor"])
        if not np.isclose(s, float(cfg.vq.get("scaling_factor", 1.0))):
            raise PdsegError(f"the checkpoint's latent scale_factor is {s}, the YAML's is "
                             f"{cfg.vq.get('scaling_factor', 1.0)}")


def convert_checkpoint(ckpt: Path, config_yaml: Path, out_dir: Path, *, use_ema: bool | str = "auto",
                       name: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """``pdseg-qupath convert-backbone``: checkpoint + YAML -> diffusers-format folder; returns the record."""
    ckpt, config_yaml, out_dir = Path(ckpt), Path(config_yaml), Path(out_dir)
    cfg = config_from_ldm_yaml(config_yaml, name=name)
    sd = read_state_dict(ckpt)
    parts, report = convert_state_dict(sd, cfg, use_ema=use_ema)
    with torch.device("meta"):
        holders = {"unet": UNet2DConditionModel(**cfg.unet), "vqvae": VQModel(**cfg.vq)}
    cond = None
    if "conditioner" in parts:
        with torch.device("meta"):
            c = build_conditioner(cfg.conditioner)
        cond = (c.config(), parts["conditioner"])
    record = {
        "source": str(ckpt.resolve()),
        "source_sha256": sha256_file(ckpt),
        "config_yaml": str(config_yaml.resolve()),
        "config_yaml_sha256": sha256_file(config_yaml),
        "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "converter": f"pdseg-qupath {__version__}",
        **report,
    }
    write_folder(out_dir, cfg, {k: (holders[k], parts[k]) for k in ("unet", "vqvae")},
                 DDPMScheduler(**cfg.scheduler), cond, source=f"{ckpt.name} (sha256 {record['source_sha256'][:12]})",
                 record=record, overwrite=overwrite)
    return record


