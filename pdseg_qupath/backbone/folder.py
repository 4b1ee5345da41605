"""The backbone folder: diffusers-format weights plus a manifest, written atomically, loaded with checks.

Layout (what ``save_backbone``, ``pretrain`` and ``convert-backbone`` write)::

    DIR/unet/{config.json, diffusion_pytorch_model.safetensors}     UNet2DConditionModel.from_pretrained
    DIR/vqvae/{config.json, diffusion_pytorch_model.safetensors}    VQModel.from_pretrained
    DIR/scheduler/scheduler_config.json                             DDPMScheduler.from_pretrained
    DIR/conditioner/{config.json, model.safetensors}                only for conditioned models
    DIR/pdseg_backbone.json                                         source, config, sha256, record

Weights are only ever read from safetensors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
from torch import nn

from pdseg_qupath import __version__
from pdseg_qupath.backbone.conditioning import build_conditioner
from pdseg_qupath.backbone.config import BackboneConfig
from pdseg_qupath.backbone.model import Backbone
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.fileio import atomic_write_dir, sha256_file
from pdseg_qupath.core.slide import MAX_MPP, MIN_MPP

MANIFEST = "pdseg_backbone.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
COND_WEIGHTS = "model.safetensors"


def save_backbone(backbone: Backbone, out_dir: str | Path, record: Mapping[str, Any] | None = None, *,
                  overwrite: bool = False, random_weights: bool | None = None) -> Path:
    """Write the diffusers-format folder atomically (temp folder beside it, then rename).

    The folder keeps ``backbone.random_weights`` so random weights stay labelled after a round trip;
    after training a backbone, pass ``random_weights=False`` (or clear the flag) before saving.
    """
    parts: dict[str, tuple[Any, dict[str, torch.Tensor]]] = {
        "unet": (backbone.unet, backbone.unet.state_dict()),
        "vqvae": (backbone.vq, backbone.vq.state_dict()),
    }
    cond = None
    if backbone.conditioner is not None:
        cond = (backbone.conditioner.config(), backbone.conditioner.state_dict())
    return write_folder(out_dir, backbone.config, parts, backbone.scheduler, cond,
                        source=backbone.source or backbone.spec, record=dict(record or {}),
                        random_weights=backbone.random_weights if random_weights is None else random_weights,
                        overwrite=overwrite)


def write_folder(out_dir: str | Path, config: BackboneConfig,
                 parts: Mapping[str, tuple[Any, Mapping[str, torch.Tensor]]], scheduler: DDPMScheduler,
                 conditioner: tuple[dict[str, Any], Mapping[str, torch.Tensor]] | None, *, source: str,
                 record: dict[str, Any], random_weights: bool = False, overwrite: bool = False) -> Path:
    """Shared by ``save_backbone`` and the checkpoint converter; ``parts`` maps subfolder -> (model
    or config-holder with ``save_config``, state dict)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PdsegError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PdsegError(f"{out}: folder exists and is not empty; choose a new --out folder "
                         "(pdseg never overwrites a backbone in place)")

    def fill(tmp: Path) -> None:
        files: dict[str, str] = {}
        for sub, (holder, state) in parts.items():
            (tmp / sub).mkdir()
            holder.save_config(tmp / sub)
            save_file(_contiguous(state), tmp / sub / WEIGHTS_NAME, metadata={"format": "pt"})
            files[f"{sub}/{WEIGHTS_NAME}"] = sha256_file(tmp / sub / WEIGHTS_NAME)
        scheduler.save_pretrained(tmp / "scheduler")
        if conditioner is not None:
            (tmp / "conditioner").mkdir()
            (tmp / "conditioner" / "config.json").write_text(json.dumps(conditioner[0], indent=2))
            save_file(_contiguous(conditioner[1]), tmp / "conditioner" / COND_WEIGHTS,
                      metadata={"format": "pt"})
            files[f"conditioner/{COND_WEIGHTS}"] = sha256_file(tmp / "conditioner" / COND_WEIGHTS)
        manifest = {
            "format": "pdseg-backbone/1",
            "config_name": config.name,
            "config": config.to_dict(),
            "source": source,
            "sha256": _combined_sha(files),
            "files": {k: {"sha256": v, "bytes": (tmp / k).stat().st_size} for k, v in files.items()},
            "random_weights": random_weights,
            "pdseg_version": __version__,
            "record": record,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))

    atomic_write_dir(out, fill)
    return out


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


def _combined_sha(files: Mapping[str, str]) -> str:
    """One digest for the whole folder: sha256 over sorted "path sha256" lines."""
    text = "".join(f"{k} {files[k]}\n" for k in sorted(files))
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- load

def load_folder(folder: str | Path, device: torch.device | str = "cpu", *, spec: str | None = None,
                verify: bool = True) -> Backbone:
    """Load a diffusers-format backbone folder, naming the broken file if anything is wrong.

    Every weights file is checked against the sha256 its manifest records (reading a file once costs little
    next to one forward pass), and weights that are not finite are refused: a backbone is only ever used
    under the label of the bytes it holds. ``verify=False`` skips the checksums (sizes are still checked).
    """
    folder = Path(folder)
    manifest = _read_json(folder / MANIFEST)
    try:
        cfg = BackboneConfig.from_dict(manifest["config"])
    except (KeyError, TypeError) as e:
        raise PdsegError(f"{folder / MANIFEST}: no valid 'config' entry ({e}); re-create the folder "
                         "with pdseg-qupath convert-backbone") from None
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(v, dict) for v in files.values()):
        raise PdsegError(f"{folder / MANIFEST}: records no weights files with their sha256; re-create the "
                         "folder with pdseg-qupath convert-backbone or pretrain")
    for rel, info in files.items():
        p = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not p.is_file():
            raise PdsegError(f"{p}: missing; the backbone folder is incomplete — copy it again")
        if "bytes" in info and p.stat().st_size != info["bytes"]:
            raise PdsegError(f"{p}: has {p.stat().st_size} bytes, expected {info['bytes']} (truncated "
                             "copy?); copy the backbone folder again")
        if verify and sha256_file(p) != info.get("sha256"):
            raise PdsegError(f"{p}: sha256 does not match {MANIFEST}; the file is corrupt or was changed — "
                             "copy the backbone folder again")
    if manifest.get("sha256") != _combined_sha({k: str(v.get("sha256")) for k, v in files.items()}):
        raise PdsegError(f"{folder / MANIFEST}: its sha256 does not match the files it lists; the manifest was "
                         "edited or is corrupt — copy the backbone folder again")
    device = torch.device(device)
    unet = _load_model(UNet2DConditionModel, folder / "unet", device)
    vq = _load_model(VQModel, folder / "vqvae", device)
    sched_cfg = _read_json(folder / "scheduler" / "scheduler_config.json")
    scheduler = DDPMScheduler.from_config(sched_cfg)
    conditioner = None
    if (folder / "conditioner").is_dir():
        ccfg = _read_json(folder / "conditioner" / "config.json")
        try:
            with torch.device("meta"):
                conditioner = build_conditioner(ccfg)
        except TypeError as e:
            raise PdsegError(f"{folder / 'conditioner' / 'config.json'}: invalid ({e})") from None
        _load_state(conditioner, folder / "conditioner" / COND_WEIGHTS, device)
    bb = Backbone(cfg, vq, unet, scheduler, conditioner, spec=spec or str(folder),
                  random_weights=bool(manifest.get("random_weights", False)),
                  sha256=manifest.get("sha256"), source=manifest.get("source"))
    bb.folder = str(folder.resolve())  # where it was read: what a model file records for a hub backbone
    learned = ((manifest.get("record") or {}).get("settings") or {}).get("mpp")  # set by pdseg pretrain
    if not bb.random_weights and isinstance(learned, (int, float)) and not isinstance(learned, bool) \
            and MIN_MPP <= learned <= MAX_MPP:
        bb.learned_mpp = float(learned)
    return bb.to(device).eval().requires_grad_(False)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PdsegError(f"{path}: missing; this is not a complete pdseg backbone folder "
                         "(create one with pdseg-qupath convert-backbone)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise PdsegError(f"{path}: not valid JSON ({e}); copy or convert the backbone again") from None
    if not isinstance(data, dict):
        raise PdsegError(f"{path}: not a JSON object; copy or convert the backbone again")
    return data


def _load_model(cls: type, sub: Path, device: torch.device) -> Any:
    cfg = _read_json(sub / "config.json")
    try:
        with torch.device("meta"):
            model = cls.from_config(cfg)
    except (TypeError, ValueError) as e:
        raise PdsegError(f"{sub / 'config.json'}: cannot build {cls.__name__} ({e})") from None
    _load_state(model, sub / WEIGHTS_NAME, device)
    return model


def _load_state(model: nn.Module, path: Path, device: torch.device) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise PdsegError(f"{path}: missing; copy the backbone folder again")
    dev = "cpu" if device.type == "meta" else str(device)
    try:
        state = load_file(path, device=dev)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise PdsegError(f"{path}: unreadable safetensors file ({e}); the copy is corrupt or "
                         "truncated — copy or convert the backbone again") from None
    # Weights may be stored in half precision to halve the folder (the shipped `small`); models run fp32.
    state = {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in state.items()}
    bad = sum(int((~torch.isfinite(v)).sum()) for v in state.values() if v.is_floating_point())
    if bad:
        raise PdsegError(f"{path}: {bad} weights are not finite (NaN or infinite); the file is corrupt — "
                         "copy or convert the backbone again")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise PdsegError(f"{path}: weights do not fit the config beside it ({' '.join(first)})") from None


