"""``train --t auto --blocks auto``: the feature settings chosen by image-wise cross-validation.

The user's own annotations decide which diffusion timestep(s) and which up blocks the head sees:

1. **Grid.** A few timesteps around the backbone's default and a few tap sets of the up blocks, the
   default first (:func:`grid`; ``small``: t 5, 25, 100 × blocks 1–2 or 0–2).
   A flag the user set is not searched: ``--t 100 --blocks auto`` searches blocks at t = 100.
2. **Folds.** The labelled images are split into k = min(4, images) groups (:func:`group_folds`): whole
   images, never tiles, so a tile is never scored by a head that saw its image. Images are dealt to
   folds rarest class first, so each class is spread over as many folds as carry it.
3. **Features, once.** :data:`CV_TILES_PER_CLASS` tiles per class over all labelled images (one view,
   no augmentation), extracted in one backbone pass per tile at every candidate timestep and the union
   of the candidate blocks, through :func:`~pdseg_qupath.learn.cache.extract_views` (the training
   cache). Each candidate's features are channel slices of that pass: the UNet runs once per timestep,
   whatever the number of tap sets.
4. **Scores.** For each candidate and fold, a fresh head (the run's head options) is trained for
   :data:`CV_EPOCHS` epochs on the other folds' tiles (:func:`~pdseg_qupath.learn.fit.fit_head`, no
   early stopping) and scored once, after its last epoch, on the held-out images' tiles with the
   validation metric of ``train`` (uniformly sampled labelled pixels, macro Dice over the classes
   present). The candidate's score is the mean over folds; the best mean wins, ties go to the default.

The shorter head training (no early stopping, fewer tiles) makes the estimate a little pessimistic
against the final head, which trains on all images as usual. Fewer than two labelled images: no
cross-validation, the defaults are used, and the run says so in one line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from pdseg_qupath.core.annotations import ClassMap
from pdseg_qupath.core.events import SILENT, Events
from pdseg_qupath.learn.cache import bytes_per_map, extract_views, pixels_per_view
from pdseg_qupath.learn.data import TrainingImage
from pdseg_qupath.learn.fit import class_weights, fit_head, logit_adjustment, map_sample_counts, new_head
from pdseg_qupath.learn.head import head_config
from pdseg_qupath.learn.options import IOConfig, TrainOptions
from pdseg_qupath.learn.runtime import BatchRunner
from pdseg_qupath.learn.sampling import annotated_prior, image_classes, sample_tiles

AUTO = "auto"
MAX_FOLDS = 4
CV_EPOCHS = 6
"""Head epochs per fold (the final head trains up to ``--epochs`` with early stopping)."""
CV_TILES_PER_CLASS = 16
"""Tiles per class over all labelled images for the search (one view each)."""

T_GRID = {"small": (5, 25, 100)}
"""Candidate timesteps per backbone config; others: half, once and twice the default."""
BLOCKS_GRID = {"small": ((1, 2), (0, 1, 2))}
"""Candidate tap sets per backbone config, the default first; others: the default and one alternative
(all blocks up to its last default one, or the finest)."""


@dataclass
class Candidate:
    t: tuple[int, ...]
    blocks: tuple[int, ...]
    folds: list[float | None] = field(default_factory=list)

    @property
    def mean(self) -> float | None:
        v = [s for s in self.folds if s is not None]
        return float(np.mean(v)) if v else None

    def to_json(self) -> dict[str, Any]:
        m = self.mean
        return {"t": list(self.t), "blocks": list(self.blocks),
                "fold_scores": [None if s is None else round(s, 4) for s in self.folds],
                "mean": None if m is None else round(m, 4)}


@dataclass
class Search:
    """The grid, the scores and the choice (``record()`` is what model.json keeps under ``training.auto``)."""

    requested: dict[str, Any]
    candidates: list[Candidate]
    choice: int = 0
    """Index of the chosen candidate (0, the default, when nothing was searched)."""
    fold_images: list[list[str]] = field(default_factory=list)
    tiles: int = 0
    seconds: float = 0.0
    fallback: str | None = None

    @property
    def chosen(self) -> Candidate:
        return self.candidates[self.choice]

    @property
    def k(self) -> int:
        return len(self.fold_images)

    @property
    def estimate(self) -> float | None:
        return None if self.fallback else self.chosen.mean

    def summary(self) -> str:
        """The one line shown after the table."""
        if self.fallback:
            return self.fallback
        est = self.estimate
        return (f"expected macro Dice ≈ {est:.3f} (image-wise CV, {self.k} folds) with t {_ints(self.chosen.t)}, "
                f"blocks {_ints(self.chosen.blocks)}" if est is not None else
                f"cross-validation gave no score (no labelled pixels in any held-out fold); using t "
                f"{_ints(self.chosen.t)}, blocks {_ints(self.chosen.blocks)}")

    def record(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "method": None if self.fallback else {
                "folds": self.k, "unit": "image", "fold_images": self.fold_images, "tiles": self.tiles,
                "views_per_tile": 1, "head_epochs": CV_EPOCHS, "score": "macro Dice (validation pixels)"},
            "candidates": [c.to_json() for c in self.candidates],
            "default": {"t": list(self.candidates[0].t), "blocks": list(self.candidates[0].blocks)},
            "choice": {"t": list(self.chosen.t), "blocks": list(self.chosen.blocks)},
            "estimate": None if self.estimate is None else round(self.estimate, 4),
            "fallback": self.fallback,
            "seconds": round(self.seconds, 1),
        }


def _ints(v: Sequence[int]) -> str:
    return ", ".join(str(int(x)) for x in v)


def is_auto(opts: TrainOptions) -> bool:
    return opts.t == AUTO or opts.blocks == AUTO


def grid(config: Any, opts: TrainOptions, n_timesteps: int) -> list[Candidate]:
    """The candidates, the default (or the user's setting) first."""
    d_t = config.default_t
    if opts.t == AUTO:
        ts = T_GRID.get(config.name) or tuple(sorted({max(1, d_t // 2), d_t, min(n_timesteps - 1, 2 * d_t)}))
        ts = (d_t,) + tuple(t for t in ts if t != d_t)
        t_grid = [(int(t),) for t in ts if 0 <= t < n_timesteps]
    else:
        t = opts.t if opts.t is not None else d_t
        t_grid = [(int(t),) if isinstance(t, (int, np.integer)) else tuple(int(x) for x in t)]
    default = tuple(config.default_blocks)
    if opts.blocks == AUTO:
        # a known grid, else one alternative: every block up to the last default one, or the finest alone
        others = BLOCKS_GRID.get(config.name) or [
            next((a for a in (tuple(range(max(default) + 1)), (max(default),)) if a != default), default)]
        b_grid = [default] + [b for b in others if b != default]
    else:
        b_grid = [tuple(int(b) for b in opts.blocks) if opts.blocks is not None else default]
    return [Candidate(t, b) for t in t_grid for b in b_grid if b != ()]


def group_folds(images: Sequence[TrainingImage], which: Sequence[int], k: int,
                rng: np.random.Generator) -> list[list[int]]:
    """``which`` (image indices) in ``k`` groups of whole images, stratified by class: images are dealt
    rarest class first (random among equals), each to the fold holding the fewest images of its classes,
    then the fewest images."""
    classes = {i: image_classes(images[i]) for i in which}
    carriers: dict[str, int] = {}
    for cs in classes.values():
        for c in cs:
            carriers[c] = carriers.get(c, 0) + 1
    order = [which[int(j)] for j in rng.permutation(len(which))]
    order.sort(key=lambda i: min((carriers[c] for c in classes[i]), default=len(which) + 1))
    folds: list[list[int]] = [[] for _ in range(k)]
    for i in order:
        f = min(range(k), key=lambda f: (sum(1 for j in folds[f] for c in classes[i] if c in classes[j]),
                                          len(folds[f]), f))
        folds[f].append(i)
    return [sorted(f) for f in folds]


def channel_index(up_channels: Sequence[int], ts: Sequence[int], blocks: Sequence[int],
                  cand: Candidate) -> torch.Tensor:
    """Channels of ``cand``'s features within the features at all ``ts`` × ``blocks`` (timestep-major, each
    timestep the tapped blocks in order: the layout of :class:`~pdseg_qupath.backbone.features.LDMFeatures`)."""
    per_t = sum(up_channels[b] for b in blocks)
    offset = {b: sum(up_channels[x] for x in blocks[:j]) for j, b in enumerate(blocks)}
    idx = [ts.index(t) * per_t + offset[b] + c for t in cand.t for b in cand.blocks for c in range(up_channels[b])]
    return torch.tensor(idx, dtype=torch.long)


def search(images: list[TrainingImage], cmap: ClassMap, io: IOConfig, opts: TrainOptions, backbone: Any,
           make_extractor: Callable[[Sequence[int], Sequence[int]], Any], *, seed: int, device: str,
           events: Events = SILENT, messages: list[str] | None = None) -> Search:
    """Cross-validate the candidates of :func:`grid` (see the module docstring); the defaults when fewer
    than two images are labelled. ``make_extractor(ts, blocks)`` gives the feature extractor of one pass."""
    t0 = time.perf_counter()
    cfg = backbone.config
    n_timesteps = int(backbone.scheduler.config.num_train_timesteps)
    requested = {"t": opts.t if opts.t == AUTO or opts.t is None else list(np.atleast_1d(opts.t).tolist()),
                 "blocks": opts.blocks if opts.blocks in (AUTO, None) else [int(b) for b in opts.blocks]}
    cands = grid(cfg, opts, n_timesteps)
    which = [i for i in range(len(images)) if image_classes(images[i]) & set(cmap.names)]
    flags = " ".join(f"--{n} auto" for n in ("t", "blocks") if getattr(opts, n) == AUTO)
    if len(which) < 2:
        res = Search(requested, cands, fallback=(
            f"{flags}: {len(which)} labelled image; cross-validation by image needs at least 2, so the defaults "
            f"are used (t {_ints(cands[0].t)}, blocks {_ints(cands[0].blocks)})"))
        res.seconds = time.perf_counter() - t0
        return res
    rng = np.random.default_rng([seed, 11])  # its own stream: the final run samples as without the search
    k = min(MAX_FOLDS, len(which))
    folds = group_folds(images, which, k, rng)
    ts = sorted({t for c in cands for t in c.t})
    blocks = sorted({b for c in cands for b in c.blocks})
    extractor = make_extractor(ts, blocks)
    dense = opts.head == "context"
    tiles = sample_tiles(images, which, cmap, io, CV_TILES_PER_CLASS, rng)
    if dense:  # the union maps within --cache-mb
        fit_n = max(2 * k, int(opts.cache_mb * 2**20) // bytes_per_map(int(extractor.channels), io.tile, io.stride))
        if len(tiles) > fit_n:
            tiles = [tiles[int(i)] for i in np.sort(rng.choice(len(tiles), size=fit_n, replace=False))]
    n_pixels = pixels_per_view(opts.cache_mb, int(extractor.channels), len(tiles), opts.pixels_per_tile)
    res = Search(requested, cands, fold_images=[[images[i].record.name for i in f] for f in folds], tiles=len(tiles))
    events.message(f"{flags}: {len(cands)} candidates ({len(ts)} timestep(s) × {len(cands) // len(ts)} tap set(s)), "
                   f"image-wise cross-validation over {k} folds of {len(which)} images, {len(tiles)} tiles")
    step = events.step("cross-validation features", total=len(tiles))
    # The pixel head's search keeps uniformly sampled pixels: one set serves as training and held-out pixels.
    cache = extract_views("cv", tiles, images, len(cmap), extractor, io, views=1, n_pixels=n_pixels,
                          stratified=False, aug=opts.augment, seed=seed, runner=BatchRunner(opts.batch_size),
                          on_views=step.advance, dense=dense)
    step.close()
    data = cache.tensors()
    # Which image each cached row (map or pixel) comes from.
    row_image = torch.tensor([tiles[int(v)].image for v in data["tile"].tolist()], dtype=torch.long)
    data = {**data, "image": row_image}
    up = cfg.up_block_channels()
    cv_opts = replace(opts, patience=CV_EPOCHS + 1)  # no early stopping on the held-out fold
    step = events.step("cross-validation", total=len(cands) * k)
    for cand in cands:
        idx = channel_index(up, ts, blocks, cand)
        for f in folds:
            held = torch.isin(row_image, torch.tensor(f, dtype=torch.long))
            tr = _rows(data, ~held, idx)
            te = _rows(data, held, idx)
            cand.folds.append(_fold_score(tr, te, images, [i for i in which if i not in f], cmap, io, cv_opts,
                                          dense, seed, device))
            step.advance()
    step.close()
    res.choice = best(cands)
    res.seconds = time.perf_counter() - t0
    return res


def best(cands: Sequence[Candidate]) -> int:
    """Index of the best mean score; of equal ones the first (the default comes first)."""
    pick = 0
    for j, c in enumerate(cands):  # only a strictly better mean replaces the pick
        if c.mean is not None and (cands[pick].mean is None or c.mean > cands[pick].mean):
            pick = j
    return pick


def _rows(data: dict[str, torch.Tensor], keep: torch.Tensor, channels: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {k: v[keep] for k, v in data.items() if k != "features"}
    out["features"] = data["features"][keep].index_select(1, channels)
    return out


def _fold_score(tr: dict[str, torch.Tensor], te: dict[str, torch.Tensor], images: list[TrainingImage],
                train_idx: list[int], cmap: ClassMap, io: IOConfig, opts: TrainOptions, dense: bool, seed: int,
                device: str) -> float | None:
    """Macro Dice on the held-out rows of a head trained :data:`CV_EPOCHS` epochs on the others."""
    n = len(cmap)
    if not int((tr["labels"] < n).sum()) or not int((te["labels"] < n).sum()):
        return None  # nothing to learn from, or nothing to score
    if dense:
        counts = map_sample_counts(tr, opts.pixels_per_tile, n, seed)
    else:
        lab = tr["labels"].numpy()
        counts = np.bincount(lab[lab < n], minlength=n)[:n]
    prior = annotated_prior(images, train_idx, n, io.mpp)
    adjust = logit_adjustment(prior, counts.astype(np.float64), opts.prior_correction)
    config = head_config(opts, tr["features"].shape[1], n, io.stride)
    head = new_head(config, tr["features"], seed)
    fit = fit_head(head, tr, te, cmap.names, opts, epochs=CV_EPOCHS, seed=seed, device=device,
                   weight=class_weights(opts.class_weights, counts), adjust=adjust, resume=None, messages=[])
    return fit.history[-1]["macro_dice"]  # the last epoch's: the held-out fold chose nothing

