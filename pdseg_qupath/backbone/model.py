"""The backbone object: PathSegDiff's frozen latent-diffusion parts (VQ first stage, UNet, schedule, conditioner).

``build_backbone`` makes one with seeded random weights (for tests and benchmarks, and as the start of
pretraining); :mod:`pdseg_qupath.backbone.folder` saves and loads one; :mod:`pdseg_qupath.backbone.spec`
resolves ``--backbone SPEC``. Random weights are flagged everywhere (:func:`describe`) because features
from them mean nothing for real tissue.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
from torch import nn

from pdseg_qupath.backbone.conditioning import Conditioner, build_conditioner
from pdseg_qupath.backbone.config import BackboneConfig, get_config
from pdseg_qupath.core.errors import PdsegError

RANDOM_LABEL = "RANDOM WEIGHTS (for tests/benchmarks only)"
_RANDOM_SEED = 0


LEARNED_MPP = 0.5
"""PathSegDiff's backbones (and ``small``) learned from 256-px tiles at 20×, about 0.5 µm/px."""


class Backbone(nn.Module):
    """Frozen LDM parts used for features: VQ first stage, UNet, noise schedule, optional conditioner."""

    def __init__(self, config: BackboneConfig, vq: VQModel, unet: UNet2DConditionModel,
                 scheduler: DDPMScheduler, conditioner: Conditioner | None, *, spec: str,
                 random_weights: bool, sha256: str | None, source: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.vq = vq
        self.unet = unet
        self.scheduler = scheduler
        self.conditioner = conditioner
        self.spec = spec
        self.random_weights = random_weights
        self.sha256 = sha256
        self.source = source
        self.folder: str | None = None
        """The folder the weights were read from, if any."""
        self.learned_mpp: float | None = None if random_weights else LEARNED_MPP
        """µm/px of the H&E the weights learned from (a pretrain record's ``--mpp``; PathSegDiff's 20×
        otherwise); ``None`` for random weights. Features are best near it (README, "Work resolution")."""

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def null_context(self, batch: int, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Context tokens meaning "no conditioning", exactly as the model saw them in training."""
        device = device or self.device
        if self.conditioner is None:
            # Unconditional models still have cross-attention layers; a zero token makes them inert
            # (to_k/to_v have no bias, so attention returns only its output bias).
            return torch.zeros(batch, 1, self.config.context_dim, device=device, dtype=dtype)
        return self.conditioner.null_context(batch, device, dtype)

    def context(self, batch: int, cond: Any = None, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Cross-attention context: None -> null; a (B, T, D) tensor -> as is; a dict -> the embedder."""
        device = device or self.device
        if cond is None:
            return self.null_context(batch, device, dtype)
        if isinstance(cond, torch.Tensor):
            if cond.dim() != 3 or cond.shape[-1] != self.config.context_dim:
                raise PdsegError(f"context tensor has shape {tuple(cond.shape)}; expected (B, tokens, "
                                 f"{self.config.context_dim})")
            return cond.to(device=device, dtype=dtype)
        if self.conditioner is None:
            raise PdsegError(f"backbone {self.config.name} is unconditional; it takes no conditioning inputs")
        inputs = {k: torch.as_tensor(v).to(device) for k, v in dict(cond).items()}
        return self.conditioner(inputs).to(dtype)


# --------------------------------------------------------------------------------------------- build

def build_backbone(config: BackboneConfig | str, device: torch.device | str = "cpu", *,
                   spec: str | None = None, random_weights: bool = True) -> Backbone:
    """Random-weight backbone (seeded, so every run gets the same weights); ``device="meta"`` is free."""
    cfg = get_config(config) if isinstance(config, str) else config
    device = torch.device(device)
    if device.type == "meta":
        with torch.device("meta"):
            parts = _build_parts(cfg)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_SEED)
            parts = _build_parts(cfg)
    bb = Backbone(cfg, *parts, spec=spec or f"random:{cfg.name}", random_weights=random_weights,
                  sha256=None)
    return bb.to(device).eval().requires_grad_(False)


def _build_parts(cfg: BackboneConfig) -> tuple[VQModel, UNet2DConditionModel, DDPMScheduler,
                                               Conditioner | None]:
    return (VQModel(**cfg.vq), UNet2DConditionModel(**cfg.unet), DDPMScheduler(**cfg.scheduler),
            build_conditioner(cfg.conditioner))



def describe(backbone: Backbone) -> str:
    """One-line label for every printed result; loudly flags random weights."""
    name = backbone.config.name
    if backbone.random_weights:
        return f"{name} — {RANDOM_LABEL}"
    sha = (backbone.sha256 or "unknown")[:12]
    return f"{name} from {backbone.source or backbone.spec} (sha256 {sha})"
