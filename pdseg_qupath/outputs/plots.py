"""Plots a person looks at: training curves, confusion matrices, pretraining losses and reconstructions.

matplotlib draws on its Agg canvas (no display needed); every PNG is written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pdseg_qupath.core.fileio import atomic_write_bytes


def _savefig(fig, path: Path, dpi: int = 110, tight: bool = True) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
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


def write_loss_plots(hist: dict[str, list[Any]], folder: Path) -> list[Path]:
    """Loss curves of the autoencoder and UNet stages, with the held-out measures, one PNG each."""
    from matplotlib.figure import Figure

    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for stage, loss_key, eval_key, eval_label in (("ae", "ae_loss", "ae_psnr", "held-out PSNR (dB)"),
                                                   ("unet", "unet_loss", "unet_heldout", "held-out ε-loss (EMA)")):
        raw = hist.get(loss_key) or []
        if not raw:
            continue
        # Raw per-step losses, or the record's thinned [step, mean] pairs.
        steps, xs = ((np.array(raw, float)[:, 0], np.array(raw, float)[:, 1]) if np.ndim(raw) == 2
                     else (np.arange(1, len(raw) + 1), np.asarray(raw, float)))
        fig = Figure(figsize=(6, 3.5), dpi=90)
        ax = fig.subplots()
        ax.plot(steps, xs, color="0.75", lw=0.6, label="train loss")
        k = max(1, len(xs) // 30)
        smooth = np.convolve(xs, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, color="C0", lw=1.5, label=f"train loss ({k}-point mean)")
        ax.set_xlabel("step")
        ax.set_ylabel("L1 + gradient loss" if stage == "ae" else "ε MSE")
        ax.set_yscale("log")
        ev = hist.get(eval_key) or []
        if ev:
            ax2 = ax.twinx() if stage == "ae" else ax
            e = np.array(ev, dtype=float)
            ax2.plot(e[:, 0], e[:, 1], "o-", color="C3", ms=3, label=eval_label)
            if stage == "ae":
                ax2.set_ylabel(eval_label)
        fig.legend(loc="lower center", ncol=3, fontsize=7, frameon=False)
        ax.set_title("autoencoder" if stage == "ae" else "UNet (ε-prediction DDPM)")
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        paths.append(_savefig(fig, folder / f"loss_{stage}.png", dpi=90, tight=False))
    return paths


def write_recon_grid(tiles: np.ndarray, reconstructed: np.ndarray, path: Path) -> Path:
    """Top row: tiles; bottom row: their reconstructions (both uint8, N x H x W x 3)."""
    from PIL import Image

    grid = np.concatenate([np.concatenate(list(tiles), 1), np.concatenate(list(reconstructed), 1)], 0)
    img = Image.fromarray(grid)
    if img.width > 1600:
        img = img.resize((1600, round(img.height * 1600 / img.width)), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path
