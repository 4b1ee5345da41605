"""The model folder: ``head.safetensors`` plus ``model.json``.

``model.json`` carries everything needed to predict again: the class map, the work resolution, tile
size and overlap, the backbone spec and the sha256 of its weights, the timesteps and feature blocks, the
head config (with ``members`` > 1 for an ensemble of heads, whose weights are keyed ``members.<k>.``;
such a folder is format 2, so an older pdseg says to upgrade instead of misreading it), the training
record, and the pdseg version. It also records the sha256 of
``head.safetensors``: the weights are written first and the JSON last, each atomically, so an
interrupted save or a truncated copy is detected on load and reported by file name, never half-used.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pdseg_qupath import __version__
from pdseg_qupath.core.annotations import ClassMap
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.fileio import atomic_write_text, atomic_write_with, sha256_file
from pdseg_qupath.learn.head import FCNHead, HeadConfig, HeadEnsemble, head_members
from pdseg_qupath.learn.options import IOConfig

HEAD_FILE = "head.safetensors"
META_FILE = "model.json"
FORMAT = "pdseg-model"
FORMAT_VERSION = 2
"""The newest format this pdseg reads: 1 (one head), 2 (an ensemble of heads)."""


@dataclass
class SegModel:
    """A trained head and everything needed to run it on new slides."""

    head: FCNHead | HeadEnsemble
    class_map: ClassMap
    io: IOConfig
    """Work resolution, tile size, overlap and feature stride: how the model sees a slide."""
    backbone: dict[str, Any]
    """``spec``, ``config``, ``sha256`` (of the backbone weights; None for random), ``random_weights``, ``label``."""
    features: dict[str, Any]
    """``t`` (list of timesteps), ``blocks``, ``channels``, ``out_stride``."""
    training: dict[str, Any] = field(default_factory=dict)
    model_id: str = ""
    pdseg_version: str = __version__
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "model"

    def meta(self, head_sha256: str) -> dict[str, Any]:
        members = len(head_members(self.head))
        head = self.head.config.to_json() | ({"members": members} if members > 1 else {})
        return {
            "format": FORMAT,
            "format_version": 2 if members > 1 else 1,
            "pdseg_version": self.pdseg_version,
            "model_id": self.model_id or head_sha256[:12],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "class_map": self.class_map.to_json(),
            "mpp": self.io.mpp,
            "tile_size": self.io.tile,
            "overlap": self.io.overlap,
            "backbone": self.backbone,
            "features": self.features,
            "head": head,
            "head_file": HEAD_FILE,
            "head_sha256": head_sha256,
            "training": self.training,
        }


def save_model(model: SegModel, out_dir: str | Path) -> Path:
    """Write ``out_dir/head.safetensors`` then ``out_dir/model.json``, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    atomic_write_with(out / HEAD_FILE, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    digest = sha256_file(out / HEAD_FILE)
    if not model.model_id:
        model.model_id = digest[:12]
    text = json.dumps(model.meta(digest), indent=2, ensure_ascii=False)
    atomic_write_text(out / META_FILE, text + "\n")
    model.path = out
    return out


def load_model(path: str | Path) -> SegModel:
    """Load a model folder, or raise :class:`PdsegError` naming the missing, corrupt or mismatched file."""
    folder = Path(path)
    if folder.is_file() and folder.name in (META_FILE, HEAD_FILE):
        folder = folder.parent
    if not folder.is_dir():
        raise PdsegError(f"{folder}: no such model folder (train one with `pdseg-qupath train ... --out {folder}`)")
    meta_path = folder / META_FILE
    head_path = folder / HEAD_FILE
    retrain = "retrain the model or restore the folder from a backup"
    if not meta_path.is_file():
        raise PdsegError(f"{meta_path}: missing; {folder} is not a complete pdseg model folder ({retrain})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PdsegError(
            f"{meta_path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            f"the file is corrupt or truncated ({retrain})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PdsegError(f"{meta_path}: cannot be read ({exc}); {retrain}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PdsegError(f"{meta_path}: not a pdseg model description (no \"format\": \"{FORMAT}\")")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise PdsegError(f"{meta_path}: \"format_version\" is {version!r}, not a whole number; {retrain}")
    if version > FORMAT_VERSION:
        raise PdsegError(
            f"{meta_path}: written by a newer pdseg (format {meta.get('format_version')}); upgrade pdseg-qupath"
        )
    if not head_path.is_file():
        raise PdsegError(f"{head_path}: missing; the model folder is incomplete ({retrain})")
    try:
        digest = sha256_file(head_path)
        expected = meta["head_sha256"]
        class_map = ClassMap.from_json(meta["class_map"])
        head_meta = dict(meta["head"])
        members = head_meta.pop("members", 1)
        if not isinstance(members, int) or isinstance(members, bool) or not 1 <= members <= 64:
            raise ValueError(f"head members {members!r}")
        config = HeadConfig.from_json(head_meta)
        backbone, features = dict(meta["backbone"]), dict(meta["features"])
        io = IOConfig(float(meta["mpp"]), int(meta["tile_size"]), int(meta["overlap"]),
                      int(features.get("out_stride", config.stride)))
    except (KeyError, TypeError, ValueError) as exc:
        raise PdsegError(f"{meta_path}: incomplete or malformed model description ({exc!r}); {retrain}") from None
    except PdsegError as exc:
        raise PdsegError(f"{meta_path}: {exc}; {retrain}") from None
    if digest != expected:
        raise PdsegError(
            f"{head_path}: its sha256 does not match {META_FILE} (truncated, or from another training run); "
            f"{retrain}"
        )
    try:
        state = load_file(str(head_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PdsegError(f"{head_path}: not a readable safetensors file ({exc}); {retrain}") from None
    head = FCNHead(config) if members == 1 else HeadEnsemble([FCNHead(config) for _ in range(members)])
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise PdsegError(f"{head_path}: weights do not fit the head described in {META_FILE} ({first})") from None
    head.eval()
    if config.n_classes != len(class_map):
        raise PdsegError(f"{meta_path}: the head has {config.n_classes} outputs but {len(class_map)} classes")
    return SegModel(
        head=head,
        class_map=class_map,
        io=io,
        backbone=backbone,
        features=features,
        training=dict(meta.get("training") or {}),
        model_id=str(meta.get("model_id") or digest[:12]),
        pdseg_version=str(meta.get("pdseg_version", "")),
        path=folder,
    )


__all__ = ["SegModel", "save_model", "load_model", "HEAD_FILE", "META_FILE"]
