"""What a person looks at: epoch tables, training curves, confusion matrices, overlays, area tables.

Plots use matplotlib's Agg backend (no display needed); overlays are drawn with PIL on a bounded canvas
that is filled strip by strip while a slide is predicted, so they cost no whole-slide array.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw
from rich import box
from rich.console import Console
from rich.table import Table

from pdseg_qupath.core.annotations import IGNORE, ClassMap
from pdseg_qupath.core.fileio import atomic_write_bytes


def write_json(path: str | Path, data: Any) -> Path:
    """Atomic, pretty JSON (NaN-free: undefined scores are ``null``)."""
    p = Path(path)
    atomic_write_bytes(p, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return p


def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


# ------------------------------------------------------------------------------------- epoch table


class EpochTable:
    """A table that grows one row per epoch: the header prints once, then aligned rows."""

    def __init__(self, class_names: Sequence[str], console: Console) -> None:
        self.names = list(class_names)
        self.console = console
        self.first = True

    def _table(self) -> Table:
        t = Table(show_header=self.first, box=None, pad_edge=False, header_style="bold")
        for name, w in (("epoch", 5), ("loss", 7), ("val loss", 8), ("acc", 6), ("mIoU", 6)):
            t.add_column(name, justify="right", min_width=w, max_width=w)
        for n in self.names:
            label = f"{n[:14]} Dice/IoU"
            w = max(11, len(label))
            t.add_column(label, justify="right", min_width=w, max_width=w)
        return t

    def add(self, row: dict) -> None:
        t = self._table()
        cells = [
            str(row["epoch"]),
            _fmt(row["loss"]),
            _fmt(row.get("val_loss")),
            _fmt(row["accuracy"]),
            _fmt(row["miou"]),
        ]
        for n in self.names:
            pc = row["per_class"].get(n, {})
            cells.append(f"{_fmt(pc.get('dice'), 2)}/{_fmt(pc.get('iou'), 2)}")
        t.add_row(*cells)
        self.console.print(t)
        self.first = False


def scores_table(metrics: dict, title: str) -> Table:
    """Per-class Dice/IoU/pixels plus the summary line of a metrics.json dictionary."""
    t = Table(title=title, box=box.SIMPLE_HEAD)
    for c, j in (("class", "left"), ("Dice", "right"), ("IoU", "right"), ("pixels", "right")):
        t.add_column(c, justify=j)  # type: ignore[arg-type]
    for name, pc in metrics["per_class"].items():
        t.add_row(name, _fmt(pc["dice"]), _fmt(pc["iou"]), f"{pc['pixels']:,}")
    t.add_section()
    t.add_row("accuracy", _fmt(metrics["accuracy"]), "", "")
    t.add_row("macro Dice / mIoU", _fmt(metrics["macro_dice"]), _fmt(metrics["miou"]), "")
    return t


# ------------------------------------------------------------------------------------------- plots


def _savefig(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_training_curve(history: Sequence[dict], path: str | Path, class_names: Sequence[str],
                         best_epoch: int | None = None, colors: Sequence[tuple[int, int, int]] | None = None) -> Path:
    """Loss (train, validation) and validation mIoU / per-class Dice against the epoch.

    ``colors`` (the class map's RGB) draw each class's Dice in its QuPath colour, as users know it.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    ep = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ep, [r["loss"] for r in history], "o-", label="train loss", ms=3)
    if any(r.get("val_loss") is not None for r in history):
        ax1.plot(ep, [r.get("val_loss") for r in history], "o-", label="validation loss", ms=3)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(ep, [r["miou"] for r in history], "k-", lw=2, label="mIoU")
    for i, n in enumerate(class_names):
        style = {"color": tuple(c / 255 for c in colors[i])} if colors is not None else {}
        ax2.plot(ep, [r["per_class"].get(n, {}).get("dice") for r in history], "--", label=f"Dice {n}", **style)
    if best_epoch:
        ax2.axvline(best_epoch, color="grey", ls=":", label=f"best (epoch {best_epoch})")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=7, loc="lower right")
    ax2.grid(alpha=0.3)
    return _savefig(fig, Path(path))


def write_confusion_png(matrix: np.ndarray, class_names: Sequence[str], path: str | Path,
                        title: str = "confusion (rows: annotation, columns: prediction)") -> Path:
    """Row-normalised confusion matrix with pixel counts in each cell."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    m = np.asarray(matrix, dtype=np.float64)
    rows = m.sum(axis=1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    k = len(class_names)
    fig = Figure(figsize=(1.4 + 1.1 * k, 1.0 + 1.0 * k))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=30, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("annotation")
    ax.set_title(title, fontsize=9)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{norm[i, j]:.2f}\n{int(m[i, j]):,}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _savefig(fig, Path(path))


# ----------------------------------------------------------------------------------------- overlays


class OverlayCanvas:
    """A downsampled label map of a region, filled from prediction strips (nearest pixel).

    ``scale`` is an integer number of work pixels per overlay pixel, so that at most ``max_size``
    overlay pixels span the longer side.
    """

    def __init__(self, width: int, height: int, max_size: int = 2048) -> None:
        self.width, self.height = width, height
        self.scale = max(1, math.ceil(max(width, height) / max_size))
        self.ow = max(1, math.ceil(width / self.scale))
        self.oh = max(1, math.ceil(height / self.scale))
        self.labels = np.full((self.oh, self.ow), IGNORE, dtype=np.uint8)
        self._cols = np.minimum((np.arange(self.ow) * self.scale + self.scale // 2), width - 1)
        self._rows = np.minimum((np.arange(self.oh) * self.scale + self.scale // 2), height - 1)

    def add_strip(self, y: int, labels: np.ndarray) -> None:
        """Take the overlay rows whose source rows lie in region rows ``[y, y + labels.shape[0])``."""
        sel = np.flatnonzero((self._rows >= y) & (self._rows < y + labels.shape[0]))
        if len(sel):
            self.labels[sel] = labels[self._rows[sel] - y][:, self._cols]

    def render(self, background: np.ndarray, class_map: ClassMap, path: str | Path, *, title: str = "",
               alpha: float = 0.3) -> Path:
        """Class colours at ``alpha`` plus opaque outlines over ``background`` (oh, ow, 3), with a legend."""
        return render_overlay(background, self.labels, class_map, path, title=title, alpha=alpha)


def _outline(labels: np.ndarray) -> np.ndarray:
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[:-1] != labels[1:]
    return edge & (labels != IGNORE)


def _ascii(text: str) -> str:
    """PIL's built-in font has no dashes or middle dots: write them plainly."""
    for a, b in (("—", "-"), ("–", "-"), ("·", "|"), ("µ", "u"), ("²", "2"), ("×", "x")):
        text = text.replace(a, b)
    return text.encode("ascii", "replace").decode()


def render_overlay(background: np.ndarray, labels: np.ndarray, class_map: ClassMap, path: str | Path, *,
                   title: str = "", alpha: float = 0.3, reference: np.ndarray | None = None) -> Path:
    """Write a PNG: the tissue with each class filled lightly and outlined in its colour, and a legend.

    ``reference`` (labels of the same shape, e.g. the annotations) is outlined in black on top.
    """
    if background.shape[:2] != labels.shape:
        raise ValueError(f"background {background.shape[:2]} and labels {labels.shape} differ")
    img = background.astype(np.float32).copy()
    palette = np.zeros((256, 3), dtype=np.float32)
    for i, c in enumerate(class_map.classes):
        palette[i] = c.color
    valid = labels < len(class_map)
    col = palette[labels]
    img[valid] = (1 - alpha) * img[valid] + alpha * col[valid]
    edge = _outline(labels)
    img[edge] = col[edge]
    if reference is not None:
        img[_outline(reference)] = 0.0
    out = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    title = _ascii(title)
    lines = ([title] if title else []) + [_ascii(n) for n in class_map.names] + (
        ["annotations (black)"] if reference is not None else [])
    pad, row = 4, 14
    box_w = min(out.width, 12 + max(len(s) for s in lines) * 7)
    draw.rectangle((0, 0, box_w, pad * 2 + row * len(lines)), fill=(255, 255, 255))
    y = pad
    if title:
        draw.text((pad, y), title, fill=(0, 0, 0))
        y += row
    for c in class_map.classes:
        draw.rectangle((pad, y + 2, pad + 9, y + 11), fill=tuple(c.color), outline=(0, 0, 0))
        draw.text((pad + 14, y), _ascii(c.name), fill=(0, 0, 0))
        y += row
    if reference is not None:
        draw.rectangle((pad, y + 2, pad + 9, y + 11), outline=(0, 0, 0))
        draw.text((pad + 14, y), "annotations (black outline)", fill=(0, 0, 0))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    p = Path(path)
    atomic_write_bytes(p, buf.getvalue())
    return p


# -------------------------------------------------------------------------------------------- areas


@dataclass
class AreaRow:
    image: str
    class_name: str
    area_mm2: float
    objects: int
    mean_probability: float | None


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


def areas_table(rows: Sequence[AreaRow], title: str = "predicted areas") -> Table:
    t = Table(title=title, box=box.SIMPLE_HEAD)
    for c, j in (("image", "left"), ("class", "left"), ("area mm²", "right"), ("objects", "right"),
                 ("mean prob.", "right")):
        t.add_column(c, justify=j)  # type: ignore[arg-type]
    for r in rows:
        t.add_row(r.image, r.class_name, f"{r.area_mm2:.4f}", str(r.objects), _fmt(r.mean_probability, 2))
    return t
