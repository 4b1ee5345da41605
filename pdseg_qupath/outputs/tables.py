"""Tables written as files: ``areas.csv`` (predicted area per image and class) and a cohort's
``summary.csv`` (one row per slide: status, area per class and of tissue in mm², tiles, seconds, model id,
error), both written atomically."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.fileio import atomic_write_bytes
from pdseg_qupath.learn.inference import AreaRow

SUMMARY = "summary.csv"
DONE = ("ok", "skipped")
BASE_FIELDS = ["slide", "status", "tissue_mm2"]
TAIL_FIELDS = ["objects", "tiles", "seconds", "model_id", "device", "error", "path"]


def write_areas_csv(rows: Sequence[AreaRow], path: str | Path) -> Path:
    """image, class, area_mm2, objects, mean_probability: one line per image and class."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "class", "area_mm2", "objects", "mean_probability"])
    for r in rows:
        w.writerow([r.image, r.class_name, f"{r.area_mm2:.6f}", r.objects,
                    "" if r.mean_probability is None else f"{r.mean_probability:.4f}"])
    p = Path(path)
    atomic_write_bytes(p, buf.getvalue().encode("utf-8"))
    return p


class Summary:
    """``summary.csv``: read once, updated row by row, rewritten atomically after every slide."""

    def __init__(self, out_dir: Path, class_names: Sequence[str]) -> None:
        self.path = Path(out_dir) / SUMMARY
        self.rows: dict[str, dict[str, Any]] = {}
        self.fields = BASE_FIELDS + [f"{n}_mm2" for n in class_names] + TAIL_FIELDS
        if self.path.exists():
            try:
                with open(self.path, newline="", encoding="utf-8") as f:
                    reader = csv.DictReader(f)
                    for name in reader.fieldnames or []:
                        if name not in self.fields:
                            self.fields.insert(len(self.fields) - len(TAIL_FIELDS), name)
                    for r in reader:
                        if r.get("slide"):
                            self.rows[r["slide"]] = dict(r)
            except (OSError, csv.Error, UnicodeDecodeError) as e:
                raise PdsegError(f"{self.path}: cannot read the summary of the earlier run ({e}); "
                                 "move it away to start afresh") from None

    def is_done(self, name: str, model_id: str, geojson: Path) -> bool:
        """Whether slide ``name`` was done by this model in an earlier run and its GeoJSON is there."""
        r = self.rows.get(name)
        return bool(r and r.get("status") in DONE and r.get("model_id") == model_id and geojson.is_file())

    def update(self, row: dict[str, Any]) -> None:
        self.rows[row["slide"]] = {k: ("" if v is None else v) for k, v in row.items()}
        for k in row:
            if k not in self.fields:
                self.fields.insert(len(self.fields) - len(TAIL_FIELDS), k)
        self.write()

    def write(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.fields, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows.values():
            w.writerow({k: r.get(k, "") for k in self.fields})
        atomic_write_bytes(self.path, buf.getvalue().encode("utf-8"))
