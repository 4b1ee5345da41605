"""A model at work: its backbone loaded, checked against what it was trained with, tiles in, logits out."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from pdseg_qupath.backbone.features import LDMFeatures
from pdseg_qupath.backbone.model import Backbone, describe
from pdseg_qupath.backbone.spec import load_backbone
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.learn.modelio import SegModel
from pdseg_qupath.learn.runtime import BatchRunner, resolve_device


def load_extractor(spec: str, device: str, t=None, blocks=None, seed: int = 0, *,
                   allow_hub: bool = True, encoder: str = "auto") -> tuple[Backbone, LDMFeatures]:
    """(backbone, feature extractor) for a ``--backbone`` spec; t and blocks default to the backbone's.

    ``allow_hub=False`` for specs read from a file (a model's): those never make pdseg contact the hub.
    ``encoder``: auto, vq or fast (:func:`pdseg_qupath.backbone.fast_encoder.resolve_encoder`)."""
    backbone = load_backbone(spec, device=device, allow_hub=allow_hub)
    return backbone, features_for(backbone, device, t, blocks, seed, encoder=encoder)


def features_for(backbone: Backbone, device: str, t=None, blocks=None, seed: int = 0, *,
                 encoder: str = "auto") -> LDMFeatures:
    """The feature extractor of a loaded backbone (t and blocks default to the backbone's)."""
    kwargs = {}
    if t is not None:
        kwargs["t"] = t
    if blocks is not None:
        kwargs["blocks"] = tuple(blocks)
    return LDMFeatures(backbone, device=device, seed=seed, encoder=encoder, **kwargs)


class Predictor:
    """A model with its backbone loaded: tiles in, logits out (batched, out-of-memory safe)."""

    def __init__(self, model: SegModel, device: str = "auto", batch_size: int = 8,
                 on_backoff: Callable[[int], None] | None = None) -> None:
        self.model = model
        self.device = resolve_device(device)
        spec = model.backbone.get("spec")
        if not spec:
            raise PdsegError(f"{model.path}: model.json names no backbone spec")
        f = model.features
        try:
            # The encoder the model was trained with (models from before the fast encoder used the VQ one).
            bb, self.extractor = load_extractor(spec, self.device, t=f.get("t"), blocks=f.get("blocks"),
                                                seed=int(f.get("seed", 0)), allow_hub=False,
                                                encoder=str(f.get("encoder", "vq")))
        except PdsegError as e:
            raise PdsegError(f"{model.path}: {e}") from None
        want, have = model.backbone.get("sha256"), getattr(bb, "sha256", None)
        if bool(model.backbone.get("random_weights")) != bool(bb.random_weights) or (want and want != have):
            raise PdsegError(
                f"{model.path}: the model was trained on backbone {spec!r} "
                f"({model.backbone.get('label')}, sha256 {want}), but {spec!r} now resolves to "
                f"{describe(bb)} (sha256 {have}). Install the backbone it was trained with, or retrain."
            )
        self.label = describe(bb)
        if self.extractor.channels != model.head.config.in_channels:
            raise PdsegError(f"{model.path}: the head expects {model.head.config.in_channels} feature channels, "
                             f"the backbone gives {self.extractor.channels}; retrain the model")
        self.head = model.head.to(self.device).eval()
        self.runner = BatchRunner(batch_size, on_backoff=on_backoff)

    def logits(self, tiles: np.ndarray | torch.Tensor, origins: Sequence[tuple[int, int]]) -> np.ndarray:
        """(B, K, T, T) float32 logits for uint8 tiles (B, T, T, 3) with work-grid top-left ``origins``.

        ``tiles`` may be a (pinned) torch tensor: the batch is copied to the device once, asynchronously.
        """
        x_all = torch.from_numpy(np.ascontiguousarray(tiles)) if isinstance(tiles, np.ndarray) else tiles
        x_all = x_all.to(self.device, non_blocking=True)

        def run(idx: list[int]) -> list[torch.Tensor]:
            with torch.no_grad():
                x = x_all[idx[0] : idx[-1] + 1]  # runner batches are contiguous index ranges
                feats = self.extractor.extract(x, origins=[origins[i] for i in idx]).float()
                outs = []
                for j in range(len(idx)):  # one tile at a time: the head's full-resolution activations
                    rgb = None             # (hidden × tile²) stay small whatever the batch size
                    if self.head.config.rgb_skip or self.head.config.texture:
                        rgb = x[j : j + 1].permute(0, 3, 1, 2).float()
                    outs.append(self.head(feats[j : j + 1], rgb)[0].float())
            return outs

        out = self.runner(run, list(range(len(x_all))))
        return torch.stack(out).cpu().numpy()  # one device-to-host copy per batch
