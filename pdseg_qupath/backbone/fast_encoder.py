"""A fast encoder: a small network distilled to stand in for the VQ first stage's encoder on a CPU.

For ``small`` the VQ encoder (``encoder`` + ``quant_conv``) costs 12.3 GFLOP per 256-px tile, as much as
the UNet, because it runs 32-channel convolutions at full resolution. The fast encoder folds each 4×4
pixel block into channels first (pixel-unshuffle), so all its work happens at latent resolution: a stem,
a few residual 3×3 blocks and an output convolution, 1.2 GFLOP per tile. It was trained to reproduce the
teacher's latent ``z0 = quant_conv(encoder(x)) * scaling_factor`` (:mod:`benchmarks.distill_probe`), so
the UNet and the taps are unchanged; its features differ from the VQ encoder's by about 3 % on held-out H&E,
and segmentation scores moved by −0.005 to +0.013 Dice on three test sets (docs/PERFORMANCE.md).

A backbone folder may carry one in ``fast_encoder/``::

    fast_encoder/fast_encoder.json          format, architecture, the backbone (sha256) it was distilled from,
                                            the weights file's sha256, how it was trained
    fast_encoder/fast_encoder.safetensors   the weights

Which encoder makes a model's features is recorded in ``model.json`` (``features.encoder``; a model
without the field used the VQ encoder) and followed by ``predict``; ``train`` chooses (:func:`resolve_encoder`).
"""

from __future__ import annotations

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


def load_fast_encoder(backbone: Any, device: torch.device | str = "cpu") -> FastEncoder:
    """The fast encoder of ``backbone``, its weights checked against the sha256 its JSON records and the JSON
    checked to name this backbone's weights (a fast encoder distilled from other weights makes other latents)."""
    sub = fast_encoder_folder(backbone)
    if sub is None:
        raise PdsegError(f"backbone {backbone.config.name} ({backbone.spec}) has no fast encoder")
    cfg = _read_config(sub / CONFIG_NAME)
    teacher = cfg.get("backbone_sha256")
    if teacher != backbone.sha256:
        raise PdsegError(f"{sub / CONFIG_NAME}: distilled from backbone weights {str(teacher)[:12]}, not from "
                         f"these ({str(backbone.sha256)[:12]}); its latents would not match the UNet")
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
        cfg = {"format": FORMAT, "arch": model.arch, "backbone_sha256": backbone.sha256,
               "backbone": backbone.config.name, "sha256": sha256_file(tmp / WEIGHTS_NAME),
               "output": "z0 = quant_conv(encoder(x)) * scaling_factor of that backbone, x = RGB / 127.5 - 1",
               "record": dict(record or {})}
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=1) + "\n")

    out = Path(folder) / FOLDER
    atomic_write_dir(out, fill)
    return out


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
