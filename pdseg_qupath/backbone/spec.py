"""``--backbone SPEC``: which backbone a name, a folder or a Hugging Face id means, loaded onto a device.

- an existing folder: load it (:mod:`pdseg_qupath.backbone.folder`);
- ``random:<config>``: random weights, loudly labelled;
- a config name (``small``...): the weights shipped in ``pdseg_qupath/weights/<name>/``, else random;
- ``owner/repo`` (optionally ``owner/repo:subfolder``): a Hugging Face snapshot (:mod:`.hub`), only where
  the user typed it (``allow_hub=True``); a spec read from a model file never makes pdseg contact the hub.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pdseg_qupath.backbone.config import CONFIGS
from pdseg_qupath.backbone.folder import MANIFEST, load_folder
from pdseg_qupath.backbone.model import Backbone, build_backbone
from pdseg_qupath.core.errors import PdsegError

SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def load_backbone(spec: str | Path, device: torch.device | str = "cpu", *, verify: bool = True,
                  allow_hub: bool = True) -> Backbone:
    """Resolve ``--backbone SPEC`` (see module docstring) and load it onto ``device``.

    ``allow_hub=False`` (specs read from files) refuses Hugging Face ids instead of downloading."""
    spec_s = str(spec)
    path = Path(spec_s).expanduser()
    if path.is_dir():
        return load_folder(path, device, spec=spec_s, verify=verify)
    if spec_s.startswith("random:"):
        return build_backbone(spec_s.split(":", 1)[1], device, spec=spec_s, random_weights=True)
    if spec_s in CONFIGS:
        shipped = SHIPPED_WEIGHTS / spec_s
        if (shipped / MANIFEST).is_file():
            return load_folder(shipped, device, spec=spec_s, verify=verify)
        return build_backbone(spec_s, device, spec=spec_s, random_weights=True)
    if is_hub_id(spec_s) and not path.exists():
        if not allow_hub:
            raise PdsegError(f"backbone {spec_s!r} is a Hugging Face id; pdseg contacts the hub only for ids "
                             "typed on the command line. Fetch it once (e.g. train or bench with --backbone "
                             f"{spec_s}) and name its local folder instead")
        from pdseg_qupath.backbone.hub import fetch_hub_backbone  # huggingface_hub only when needed

        return load_folder(fetch_hub_backbone(spec_s), device, spec=spec_s, verify=verify)
    if path.exists():
        raise PdsegError(f"{path}: is a file, not a backbone folder. For an original latent-diffusion "
                         f"checkpoint run: pdseg-qupath convert-backbone {path} --config CONFIG.yaml --out DIR")
    raise PdsegError(
        f"backbone {spec_s!r} is not a folder, a known config ({', '.join(sorted(CONFIGS))}), "
        "'random:<config>', or a Hugging Face repo id (owner/name)")




def is_hub_id(spec: str) -> bool:
    """``owner/repo`` or ``owner/repo:sub``: what :func:`load_backbone` would fetch from Hugging Face."""
    return "/" in spec and not spec.startswith((".", "/", "~")) and not spec.startswith("random:")
