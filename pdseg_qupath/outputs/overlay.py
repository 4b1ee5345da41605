"""The one overlay renderer: classes over the tissue, in their QuPath colours, with a legend.

``masks --overlay``, ``predict`` and ``evaluate`` all draw through :func:`render_overlay`, so an overlay
looks the same wherever it comes from: each class filled lightly and outlined in its colour, unlabelled
pixels left clear, and (for evaluation) the annotations' own outlines in black on top.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pdseg_qupath.core.annotations import IGNORE, ClassMap
from pdseg_qupath.core.fileio import atomic_write_bytes

OVERLAY_ALPHA = 0.3
"""Opacity of the class colour over the tissue; outlines are opaque."""


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
                   title: str = "", alpha: float = OVERLAY_ALPHA, reference: np.ndarray | None = None) -> Path:
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
