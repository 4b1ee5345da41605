"""Resumable training: what an interrupted ``train`` left in ``OUT/.pdseg-train/``, and whether it still fits.

Two fingerprints decide what may be reused: the *features* fingerprint (inputs, annotations, backbone,
sampling and augmentation options, seed), under which extracted feature shards are kept, and the *head*
fingerprint (that plus the head's own options), under which the per-epoch checkpoint is kept. State
left by other inputs or options is removed; a run with the same inputs continues where it stopped and
gives the same result as an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import shapely
import torch

from pdseg_qupath import __version__
from pdseg_qupath.core.annotations import ClassMap
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.fileio import atomic_write_bytes, refuse_symlink
from pdseg_qupath.learn.data import TrainingImage
from pdseg_qupath.learn.options import TrainOptions

RESUME_DIR = ".pdseg-train"

FEATURE_OPTIONS = ("tile_size", "tiles_per_class", "views", "pixels_per_tile", "cache_mb", "val_fraction",
                   "max_val_tiles", "t", "blocks", "augment", "head", "ensemble")
"""Options that change the cached features; the others (head, optimiser, epochs) only the checkpoint."""
RESTART_OPTIONS = ("lr", "weight_decay", "batch_pixels", "class_weights", "hidden", "dropout", "rgb_skip", "texture",
                   "prior_correction")
"""Head options that make an old checkpoint useless (``epochs`` and ``patience`` may change on resume)."""


def fingerprints(images: Sequence[TrainingImage], cmap: ClassMap, opts: TrainOptions, spec: str,
                 bb_sha: str | None, mpp: float, seed: int, val_images: Sequence[str] | None,
                 precision: str = "fp32", encoder: str = "vq") -> tuple[str, str]:
    """(features, head) fingerprints: what the cached features depend on, and that plus the head options.

    ``precision`` is the feature pass's (bf16 or fp32) and ``encoder`` its encoder (vq or fast): a run resumed
    on another machine must not mix them."""
    o = opts.to_json()
    h = hashlib.sha256()
    h.update(json.dumps({"opts": {k: o[k] for k in FEATURE_OPTIONS}, "spec": spec, "sha": bb_sha, "mpp": mpp,
                         **({"precision": precision} if precision != "fp32" else {}),
                         **({"encoder": encoder} if encoder != "vq" else {}),
                         "seed": seed, "classes": cmap.to_json(), "val": list(val_images or []), "v": __version__},
                        sort_keys=True, default=str).encode())
    for im in images:
        h.update(im.record.name.encode())
        h.update(str(im.slide.mpp).encode())
        for a in im.annotations:
            h.update((a.classification or "").encode())
            h.update(shapely.to_wkb(a.geometry))
    feat = h.hexdigest()
    head = hashlib.sha256((feat + json.dumps({k: o[k] for k in RESTART_OPTIONS}, sort_keys=True, default=str))
                          .encode()).hexdigest()
    return feat, head


class Resume:
    """``OUT/.pdseg-train/``: feature shards (``features-<fp>/``) and the per-epoch head checkpoint
    (``checkpoint-<fp>.pt``; ``checkpoint-<fp>-m<k>.pt`` for ensemble member k > 0, see :meth:`member`) of
    an unfinished run. State left by other inputs or options is removed."""

    def __init__(self, out_dir: Path, fingerprints: tuple[str, str], enabled: bool, messages: list[str]) -> None:
        self.dir = out_dir / RESUME_DIR
        self.enabled = enabled
        feat, head = fingerprints[0][:16], fingerprints[1][:16]
        self.features_dir = self.dir / f"features-{feat}"
        self.checkpoint = self.dir / f"checkpoint-{head}.pt"
        refuse_symlink(self.dir, "train's work folder")
        refuse_symlink(self.features_dir, "train's feature cache")
        if self.dir.exists() and not self.dir.is_dir():
            raise PdsegError(f"{self.dir}: is not a folder; pdseg keeps an interrupted run's state there. "
                             "Move it away, or choose another --out")
        self.resumed = enabled and (_own(self.features_dir) or _own(self.checkpoint))
        if self.dir.exists():
            # Only what pdseg writes here is ever deleted: features-<fp>/ folders and checkpoint-<fp>.pt files.
            stale = [p for p in self.dir.iterdir() if _own(p) and p != self.features_dir and not self._mine(p)]
            if not enabled:
                stale = [p for p in self.dir.iterdir() if _own(p)]
            for p in stale:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            if stale and enabled:
                messages.append(f"{self.dir}: removed state left by a run with other inputs or options")
        if self.resumed:
            messages.append(f"resuming from {self.dir} (features and head checkpoint of an earlier run)")
        if enabled:
            self.features_dir.mkdir(parents=True, exist_ok=True)

    def _mine(self, p: Path) -> bool:
        """A head checkpoint of this run (of any ensemble member)."""
        return p.name == self.checkpoint.name or p.name.startswith(self.checkpoint.stem + "-m")

    def member(self, k: int) -> Resume:
        """The same run, with ensemble member ``k``'s own head checkpoint (member 0 keeps the run's)."""
        if k == 0:
            return self
        other = copy.copy(self)
        other.checkpoint = self.dir / f"{self.checkpoint.stem}-m{k}.pt"
        return other

    def shard(self, name: str, index: int) -> Path | None:
        """Where feature shard ``index`` of ``name`` lives (None when resuming is off)."""
        return self.features_dir / f"{name}-{index:05d}.safetensors" if self.enabled else None

    def load_checkpoint(self, device: str) -> dict[str, Any] | None:
        """The last epoch's head state, or None (also when it cannot be read: only head epochs are lost)."""
        if not (self.enabled and self.checkpoint.is_file()):
            return None
        return torch.load(self.checkpoint, map_location=device, weights_only=True)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        if self.enabled:
            buf = io.BytesIO()
            torch.save(state, buf)
            atomic_write_bytes(self.checkpoint, buf.getvalue())

    def finish(self, keep_features: bool) -> None:
        """After a completed run: drop the checkpoints; keep the features only if asked (for tuning)."""
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if _own(p) and self._mine(p):
                    p.unlink(missing_ok=True)
        if not keep_features and self.dir.is_dir() and not self.dir.is_symlink():
            for p in self.dir.iterdir():
                if _own(p):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            try:
                self.dir.rmdir()  # only once empty: anything else in it is not pdseg's
            except OSError:
                pass


def _own(p: Path) -> bool:
    """Whether ``p`` is something :class:`Resume` writes (a real folder or file, never a link)."""
    if p.is_symlink():
        return False
    if p.name.startswith("features-"):
        return p.is_dir()
    return p.name.startswith("checkpoint-") and p.name.endswith(".pt") and p.is_file()
