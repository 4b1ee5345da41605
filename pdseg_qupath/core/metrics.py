"""Segmentation scores on sparse labels: only annotated pixels count.

Everything is derived from one confusion matrix, accumulated strip by strip, so scoring a whole slide
never needs its full label map in memory. A class with no pixels in the truth and none predicted has no
score (``None`` in JSON) and is left out of the means, rather than counting as a perfect 1 or a 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class Confusion:
    """Pixel counts: ``matrix[true, predicted]``; ``unpredicted[true]`` counts annotated pixels left
    without a prediction (outside the slide or the tissue), which score as misses."""

    n_classes: int
    matrix: np.ndarray = field(init=False)
    unpredicted: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.matrix = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)
        self.unpredicted = np.zeros(self.n_classes, dtype=np.int64)

    def update(self, truth: np.ndarray, pred: np.ndarray) -> None:
        """Add one aligned pair of label arrays (255 in ``truth`` = not annotated, ignored)."""
        if truth.shape != pred.shape:
            raise ValueError(f"label shapes differ: truth {truth.shape}, prediction {pred.shape}")
        k = self.n_classes
        t = truth.reshape(-1).astype(np.int64)
        p = pred.reshape(-1).astype(np.int64)
        scored = t < k
        t, p = t[scored], p[scored]
        ok = p < k
        self.matrix += np.bincount(t[ok] * k + p[ok], minlength=k * k).reshape(k, k)
        self.unpredicted += np.bincount(t[~ok], minlength=k)

    def merge(self, other: "Confusion") -> "Confusion":
        self.matrix += other.matrix
        self.unpredicted += other.unpredicted
        return self

    @property
    def total(self) -> int:
        return int(self.matrix.sum() + self.unpredicted.sum())


def scores(conf: Confusion, class_names: Sequence[str]) -> dict:
    """The metrics.json dictionary: per-class Dice/IoU/pixels, accuracy, mIoU and macro Dice.

    ``pixels`` is the number of annotated (truth) pixels of the class. Extra keys (``confusion``,
    ``classes``, ``pixels_scored``, ``pixels_unpredicted``) make the file self-contained.
    """
    m = conf.matrix.astype(np.float64)
    tp = np.diag(m)
    truth = m.sum(axis=1) + conf.unpredicted
    pred = m.sum(axis=0)
    per_class: dict[str, dict] = {}
    dices: list[float] = []
    ious: list[float] = []
    for i, name in enumerate(class_names):
        denom = truth[i] + pred[i]
        if denom == 0:
            dice = iou = None
        else:
            dice = float(2 * tp[i] / denom)
            iou = float(tp[i] / (denom - tp[i]))
            dices.append(dice)
            ious.append(iou)
        per_class[name] = {
            "dice": dice,
            "iou": iou,
            "pixels": int(truth[i]),
            "predicted_pixels": int(pred[i]),
            "precision": float(tp[i] / pred[i]) if pred[i] else None,
            "recall": float(tp[i] / truth[i]) if truth[i] else None,
        }
    total = conf.total
    return {
        "per_class": per_class,
        "accuracy": float(tp.sum() / total) if total else None,
        "miou": float(np.mean(ious)) if ious else None,
        "macro_dice": float(np.mean(dices)) if dices else None,
        "pixels_scored": int(total),
        "pixels_unpredicted": int(conf.unpredicted.sum()),
        "classes": list(class_names),
        "confusion": conf.matrix.tolist(),
    }


__all__ = ["Confusion", "scores"]
