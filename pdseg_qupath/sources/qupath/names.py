"""File names pdseg and the groovy scripts derive from QuPath image names; both sides must agree exactly."""

from __future__ import annotations

import re
from pathlib import Path

UNSAFE_CHARS = '/\\:*?"<>|'
"""Characters not allowed in file names on some OS; each becomes ``_``. Same rule in ``groovy/*.groovy``."""

_UNSAFE = re.compile("[" + re.escape(UNSAFE_CHARS) + "]")

PDSEG_DIR = "pdseg"
"""Folder inside a QuPath project that holds everything pdseg writes (GeoJSON exchange files, backups)."""


def safe_filename(name: str) -> str:
    """``name`` with each of ``/\\:*?"<>|`` replaced by ``_`` (QuPath image names may contain them)."""
    return _UNSAFE.sub("_", name)


def annotations_geojson(project_dir: Path, image_name: str) -> Path:
    """Where ``groovy/export_annotations.groovy`` writes an image's annotations."""
    return Path(project_dir) / PDSEG_DIR / "annotations" / (safe_filename(image_name) + ".geojson")


def predictions_geojson(project_dir: Path, image_name: str) -> Path:
    """Where pdseg writes an image's predictions for ``groovy/import_predictions.groovy`` to read."""
    return Path(project_dir) / PDSEG_DIR / "predictions" / (safe_filename(image_name) + ".geojson")
