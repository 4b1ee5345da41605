"""Hugging Face backbones: ``--backbone owner/repo`` or ``owner/repo:subfolder``.

A repo may hold a pdseg/diffusers backbone folder (``pdseg_backbone.json``) or an original
latent-diffusion checkpoint with its YAML (ZoomLDM ships ``brca/weights.ckpt`` + ``brca/config.yaml``).
The latter is converted once into ``~/.cache/pdseg-qupath/backbones/`` and reused from there, also
offline. Every failure says exactly what to download and where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pdseg_qupath.backbone.folder import MANIFEST
from pdseg_qupath.core.errors import PdsegError

CKPT_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors")


def cache_root() -> Path:
    base = os.environ.get("PDSEG_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdseg-qupath"
    return Path(base) / "backbones"


def fetch_hub_backbone(spec: str) -> Path:
    """Local folder for a Hugging Face backbone spec (downloading/converting as needed)."""
    repo, _, sub = spec.partition(":")
    sub = sub.strip("/")
    converted = cache_root() / (repo.replace("/", "--") + (f"--{sub.replace('/', '--')}" if sub else ""))
    if (converted / MANIFEST).is_file():
        return converted
    files = _list_files(repo, spec)
    prefix = f"{sub}/" if sub else ""
    if f"{prefix}{MANIFEST}" in files:
        return Path(_download(repo, spec, [f"{prefix}*", f"{prefix}**/*"])) / sub
    yamls = [f for f in files if f.endswith((".yaml", ".yml")) and f.startswith(prefix)]
    ckpt_dirs = {_parent(f) for f in files if f.endswith(CKPT_SUFFIXES)}
    dirs = sorted({_parent(f) for f in yamls} & ckpt_dirs)
    if not dirs:
        raise PdsegError(f"Hugging Face repo {repo!r}{f' folder {sub!r}' if sub else ''} holds neither a "
                         f"pdseg backbone ({MANIFEST}) nor an original checkpoint with its YAML")
    if len(dirs) > 1:
        options = " or ".join(f"{repo}:{d}" for d in dirs)
        raise PdsegError(f"Hugging Face repo {repo!r} holds several models; pick one: --backbone {options}")
    d = dirs[0]
    ckpts = [f for f in files if _parent(f) == d and f.endswith(CKPT_SUFFIXES)]
    yml = [f for f in files if _parent(f) == d and f.endswith((".yaml", ".yml"))]
    if len(ckpts) != 1 or len(yml) != 1:
        raise PdsegError(f"Hugging Face repo {repo!r} folder {d or '/'!r} has {len(ckpts)} checkpoints and "
                         f"{len(yml)} YAML files; download the pair you want and run "
                         "pdseg-qupath convert-backbone CKPT --config YAML --out DIR")
    local = Path(_download(repo, spec, [ckpts[0], yml[0]]))
    from pdseg_qupath.backbone.convert import convert_checkpoint

    convert_checkpoint(local / ckpts[0], local / yml[0], converted,
                       name=repo.split("/")[-1].lower() + (f"-{d.replace('/', '-')}" if d else ""))
    return converted


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _howto(repo: str, spec: str) -> str:
    return (f"To use it without network access: on a machine with internet run\n"
            f"    hf download {repo} --local-dir DIR        (older huggingface_hub: huggingface-cli download)\n"
            f"copy DIR to this machine and pass --backbone DIR (a folder with {MANIFEST}). If DIR holds an "
            f"original checkpoint (.ckpt + .yaml, as ZoomLDM's brca/weights.ckpt and brca/config.yaml), "
            f"convert it first:\n"
            f"    pdseg-qupath convert-backbone DIR/<model>.ckpt --config DIR/<model>.yaml --out BACKBONE_DIR\n"
            f"and pass --backbone BACKBONE_DIR.")


def _fail(repo: str, spec: str, err: BaseException) -> PdsegError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    name = type(err).__name__
    if isinstance(err, GatedRepoError):
        why = (f"the repo is gated: accept its terms at https://huggingface.co/{repo} and log in with "
               "`hf auth login` (or set HF_TOKEN), or download it elsewhere")
    elif isinstance(err, RepositoryNotFoundError):
        why = "no such repo, or it is private (check the spelling, or log in with `hf auth login`)"
    else:
        why = f"offline or unreachable ({name}: {str(err).splitlines()[0][:160] if str(err) else ''})"
    return PdsegError(f"could not fetch backbone {spec!r} from Hugging Face: {why} (there is no local "
                      f"folder of that name either).\n{_howto(repo, spec)}")


def _list_files(repo: str, spec: str) -> list[str]:
    from huggingface_hub import HfApi

    try:
        return list(HfApi().list_repo_files(repo))
    except Exception as e:  # noqa: BLE001 - network stack errors vary (httpx, requests, hub errors)
        raise _fail(repo, spec, e) from None


def _download(repo: str, spec: str, patterns: list[str]) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=repo, allow_patterns=patterns)
    except Exception as e:  # noqa: BLE001
        raise _fail(repo, spec, e) from None
