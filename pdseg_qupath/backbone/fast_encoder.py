"""A fast encoder: a small network distilled to stand in for the VQ first stage's encoder on a CPU.

For ``small`` the VQ encoder (``encoder`` + ``quant_conv``) costs 12.3 GFLOP per 256-px tile, as much as
the UNet, because it runs 32-channel convolutions at full resolution. The fast encoder folds each 4×4
pixel block into channels first (pixel-unshuffle), so all its work happens at latent resolution: a stem,
a few residual 3×3 blocks and an output convolution, 1.2 GFLOP per tile. It was trained to reproduce the
teacher's latent ``z0 = quant_conv(encoder(x)) * scaling_factor`` (:mod:`benchmarks.distill_probe`), so
the UNet and the taps are unchanged; its features differ from the VQ encoder's by about 3 % on held-out H&E,
and segmentation scores moved by −0.005 to +0.013 Dice on three test sets (docs/PERFORMANCE.md).

A backbone folder may carry one in ``fast_encoder/``::

    fast_encoder/fast_encoder.json          format, architecture, the teacher it was distilled from (a digest
                                            of the VQ encoder's weights, and the latent scaling factor), the
                                            weights file's sha256, how it was trained
    fast_encoder/fast_encoder.safetensors   the weights

The fast encoder belongs to the *first stage*, not to the whole backbone: ``pretrain --from small
--steps-ae 0`` fine-tunes only the UNet, keeps the VQ encoder's weights exactly, and carries the fast
encoder into the new folder (:func:`carry_fast_encoder`); a backbone whose autoencoder changed has none.

Which encoder makes a model's features is recorded in ``model.json`` (``features.encoder``; a model
without the field used the VQ encoder) and followed by ``predict``; ``train`` chooses (:func:`resolve_encoder`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pdseg_qupath.backbone.config import requested_choice
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.fileio import atomic_write_dir, sha256_file

ENCODERS = ("auto", "vq", "fast")
ENCODER_ENV = "PDSEG_ENCODER"
FOLDER = "fast_encoder"
CONFIG_NAME = "fast_encoder.json"
WEIGHTS_NAME = "fast_encoder.safetensors"
FORMAT = "pdseg-fast-encoder/1"


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        groups = min(16, width // 4)
        self.n1, self.c1 = nn.GroupNorm(groups, width), nn.Conv2d(width, width, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(groups, width), nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(F.silu(self.n2(self.c1(F.silu(self.n1(x))))))


class FastEncoder(nn.Module):
    """RGB scaled to [-1, 1], (B, 3, H, W) → the latent z0, (B, latent_channels, H/factor, W/factor)."""

    def __init__(self, width: int = 48, blocks: int = 3, factor: int = 4, in_ch: int = 3, out_ch: int = 3) -> None:
        super().__init__()
        self.arch = {"width": int(width), "blocks": int(blocks), "factor": int(factor), "in_ch": int(in_ch),
                     "out_ch": int(out_ch)}
        self.factor = int(factor)
        self.stem = nn.Conv2d(in_ch * factor * factor, width, 3, padding=1)
        self.body = nn.Sequential(*[_Residual(width) for _ in range(blocks)])
        self.norm_out = nn.GroupNorm(min(16, width // 4), width)
        self.head = nn.Conv2d(width, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self.stem(F.pixel_unshuffle(x, self.factor)))
        return self.head(F.silu(self.norm_out(h)))


def resolve_encoder(encoder: str, device: torch.device, backbone: Any) -> str:
    """``vq`` or ``fast`` for a requested ``auto``/``vq``/``fast``.

    ``auto`` reads ``PDSEG_ENCODER`` first; still ``auto``, it is ``fast`` on a CPU when the backbone
    carries a fast encoder (see the module docstring) and ``vq`` elsewhere: on a GPU the VQ encoder is cheap.
    ``fast`` for a backbone without one is an error that says so.
    """
    encoder = requested_choice(encoder, ENCODERS, ENCODER_ENV, "encoder")
    if encoder == "auto":
        return "fast" if device.type == "cpu" and fast_encoder_folder(backbone) is not None else "vq"
    if encoder == "fast" and fast_encoder_folder(backbone) is None:
        raise PdsegError(f"backbone {backbone.config.name} ({backbone.spec}) has no fast encoder (a {FOLDER}/ "
                         "folder beside its weights): train with --encoder vq, or use the backbone folder "
                         "that has one")
    return encoder


def fast_encoder_folder(backbone: Any) -> Path | None:
    """The backbone's ``fast_encoder/`` folder, if its weights folder has one."""
    folder = getattr(backbone, "folder", None)
    if not folder or getattr(backbone, "random_weights", False):
        return None
    sub = Path(folder) / FOLDER
    return sub if (sub / CONFIG_NAME).is_file() else None


def _scaling_factor(backbone: Any) -> float:
    return float(backbone.vq.config.get("scaling_factor", 1.0) or 1.0)


def teacher_digest(backbone: Any) -> str:
    """sha256 of the weights that make the latent (the VQ ``encoder`` and ``quant_conv``), by name, shape and
    float32 value: the same for a folder stored in float16 and its float32 copy, as their values are equal."""
    h = hashlib.sha256()
    for part in ("encoder", "quant_conv"):
        for name, t in sorted(getattr(backbone.vq, part).state_dict().items()):
            h.update(f"{part}.{name} {tuple(t.shape)}\n".encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def teacher_mismatch(cfg: Mapping[str, Any], backbone: Any) -> str | None:
    """Why a fast encoder described by ``cfg`` does not belong to ``backbone`` (None: it does).

    It belongs when it was distilled from this backbone's VQ encoder (``teacher_sha256``, see
    :func:`teacher_digest`) at this latent scaling factor; a description without ``teacher_sha256`` (the first
    format) must name the whole backbone.
    """
    if cfg.get("teacher_sha256") is not None:
        mine = teacher_digest(backbone)
        if cfg["teacher_sha256"] != mine:
            return (f"distilled from a VQ encoder with weights {str(cfg['teacher_sha256'])[:12]}, not from this "
                    f"backbone's ({mine[:12]})")
        scale = cfg.get("scaling_factor")
        if not isinstance(scale, (int, float)) or abs(float(scale) - _scaling_factor(backbone)) > 1e-6:
            return f"made for latent scaling factor {scale}, this backbone's is {_scaling_factor(backbone)}"
        return None
    if cfg.get("backbone_sha256") != backbone.sha256:
        return (f"distilled from backbone weights {str(cfg.get('backbone_sha256'))[:12]}, not from these "
                f"({str(backbone.sha256)[:12]})")
    return None


def load_fast_encoder(backbone: Any, device: torch.device | str = "cpu") -> FastEncoder:
    """The fast encoder of ``backbone``, its weights checked against the sha256 its JSON records and the JSON
    checked to name this backbone's first stage (one distilled from other weights makes other latents)."""
    sub = fast_encoder_folder(backbone)
    if sub is None:
        raise PdsegError(f"backbone {backbone.config.name} ({backbone.spec}) has no fast encoder")
    cfg = _read_config(sub / CONFIG_NAME)
    why = teacher_mismatch(cfg, backbone)
    if why is not None:
        raise PdsegError(f"{sub / CONFIG_NAME}: {why}; its latents would not match the UNet")
    weights = sub / WEIGHTS_NAME
    if not weights.is_file():
        raise PdsegError(f"{weights}: missing (named by {CONFIG_NAME})")
    if sha256_file(weights) != cfg.get("sha256"):
        raise PdsegError(f"{weights}: sha256 does not match {CONFIG_NAME}; the file is corrupt or was changed")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model = FastEncoder(**cfg["arch"])
    try:
        model.load_state_dict(load_file(str(weights)))
    except (SafetensorError, RuntimeError) as e:
        raise PdsegError(f"{weights}: not the weights of the fast encoder {CONFIG_NAME} describes ({e})") from None
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise PdsegError(f"{weights}: holds NaN or infinite weights")
    return model.to(device).eval().requires_grad_(False)


def save_fast_encoder(model: FastEncoder, backbone: Any, folder: str | Path,
                      record: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` as ``folder/fast_encoder/`` for ``backbone`` (its weights' sha256 recorded)."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_NAME))
        cfg = {"format": FORMAT, "arch": model.arch, "teacher_sha256": teacher_digest(backbone),
               "scaling_factor": _scaling_factor(backbone), "backbone_sha256": backbone.sha256,
               "backbone": backbone.config.name, "sha256": sha256_file(tmp / WEIGHTS_NAME),
               "output": "z0 = quant_conv(encoder(x)) * scaling_factor of that backbone, x = RGB / 127.5 - 1",
               "record": dict(record or {})}
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=1) + "\n")

    out = Path(folder) / FOLDER
    atomic_write_dir(out, fill)
    return out


def carry_fast_encoder(source: Any, folder: str | Path) -> str:
    """Copy ``source``'s fast encoder into the backbone folder ``folder`` if it belongs there (the same VQ
    encoder weights and scaling factor: a fine-tune that kept the autoencoder); returns one line saying what
    happened."""
    from pdseg_qupath.backbone.folder import load_folder

    sub = fast_encoder_folder(source)
    if sub is None:
        return f"{source.config.name} has no fast encoder, so neither has this backbone"
    target = load_folder(folder, "cpu", verify=False)
    why = teacher_mismatch(_read_config(sub / CONFIG_NAME), target)
    if why is not None:
        return (f"no fast encoder: the autoencoder changed ({why}), so on a CPU features use the VQ encoder "
                "(about 2x slower); --steps-ae 0 keeps the autoencoder and its fast encoder")

    def fill(tmp: Path) -> None:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            (tmp / name).write_bytes((sub / name).read_bytes())

    atomic_write_dir(Path(folder) / FOLDER, fill)
    load_fast_encoder(target)  # the copy is checked like any fast encoder before anyone relies on it
    return f"kept {source.config.name}'s fast encoder (the autoencoder is unchanged)"


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PdsegError(f"{path}: unreadable ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or not isinstance(cfg.get("arch"), dict):
        raise PdsegError(f"{path}: not a pdseg fast-encoder description (format {FORMAT})")
    allowed = {"width", "blocks", "factor", "in_ch", "out_ch"}
    if set(cfg["arch"]) - allowed or not all(isinstance(v, int) and 0 < v <= 4096 for v in cfg["arch"].values()):
        raise PdsegError(f"{path}: 'arch' must hold positive integers among {', '.join(sorted(allowed))}")
    return cfg
