"""Tables written as files: ``areas.csv`` (predicted area per image and class) and a cohort's
``summary.csv`` (one row per slide: status, area per class and of tissue in mm², tiles, seconds, model id,
error), both written atomically.

Cells are data, never formulas: a text cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
return (a class or slide name typed by a user) gets a leading ``'`` so that a spreadsheet shows it as text;
a cell that already starts with ``'`` gets one more, so reading the table back is exact."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any, Sequence

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.fileio import atomic_write_bytes
from pdseg_qupath.learn.inference import AreaRow

SUMMARY = "summary.csv"
DONE = ("ok", "skipped")
BASE_FIELDS = ["slide", "status", "tissue_mm2"]
TAIL_FIELDS = ["objects", "tiles", "seconds", "model_id", "device", "error", "path"]


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
_NUMBER = re.compile(r"-?\d+(\.\d*)?([eE][-+]?\d+)?")


def csv_cell(value: Any) -> Any:
    """``value`` as a spreadsheet shows it as text: a leading ``'`` before a formula-like start."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def _uncell(value: Any) -> Any:
    """The inverse of :func:`csv_cell` (for reading a table pdseg wrote)."""
    if isinstance(value, str) and value.startswith("'") and value[1:].startswith(_FORMULA_START):
        return value[1:]
    return value


def write_areas_csv(rows: Sequence[AreaRow], path: str | Path) -> Path:
    """image, class, area_mm2, objects, mean_probability: one line per image and class."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "class", "area_mm2", "objects", "mean_probability"])
    for r in rows:
        w.writerow([csv_cell(r.image), csv_cell(r.class_name), f"{r.area_mm2:.6f}", r.objects,
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
                    reader = csv.reader(f)
                    header = [_uncell(h) for h in next(reader, [])]
                    for name in header:
                        if name not in self.fields:
                            self.fields.insert(len(self.fields) - len(TAIL_FIELDS), name)
                    for cells in reader:
                        r = {k: _uncell(v) for k, v in zip(header, cells)}
                        if r.get("slide"):
                            self.rows[r["slide"]] = r
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
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([csv_cell(k) for k in self.fields])
        for r in self.rows.values():
            w.writerow([csv_cell(r.get(k, "")) for k in self.fields])
        atomic_write_bytes(self.path, buf.getvalue().encode("utf-8"))
