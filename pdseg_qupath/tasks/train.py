"""``train``: a segmentation head from a source's sparse annotations, saved as a model folder.

The steps, and why:

1. **Images.** The annotated images and the class map (classes in ``--classes`` order, else sorted).
2. **Backbone.** The LDM that gives the features, and the tiles it sees (:class:`~pdseg_qupath.learn.options.IOConfig`).
   With ``--t auto`` or ``--blocks auto``, image-wise cross-validation on the annotations first chooses
   them (:mod:`pdseg_qupath.learn.autotune`); the grid, the scores and the choice go into model.json.
3. **Tiles.** Training tiles centred on random points inside the annotations, the same number for every
   class (:mod:`pdseg_qupath.learn.sampling`); validation on held-out images when at least two are
   annotated, else on held-out tiles. With ``ensemble`` K > 1 the images are split K times, each split
   holding out images the earlier ones kept, and tiles are sampled from every image some head trains on.
4. **Features.** Each tile is seen as ``views`` versions (the tile, then flips/rotations with H&E stain
   jitter); each view's features are kept only at sampled labelled pixels for the ``pixel`` head, or as
   whole feature maps for the ``context`` head (:mod:`pdseg_qupath.learn.cache`).
5. **Heads.** Cross-entropy, AdamW, early stopping on validation mIoU, keeping the best epoch
   (:mod:`pdseg_qupath.learn.fit`); each epoch is shown and redraws ``training_curve.png``. One head per
   ensemble member, on the cached features of its own training images, stopped on its own held-out
   images; they predict together (:class:`~pdseg_qupath.learn.head.HeadEnsemble`).
6. **Model.** ``head.safetensors`` and ``model.json`` (:mod:`pdseg_qupath.learn.modelio`).

Interrupting a run loses nothing: feature shards and the per-epoch head checkpoint stay in
``OUT/.pdseg-train/`` and the same command resumes (:mod:`pdseg_qupath.learn.resume`), with the same
result as an uninterrupted run. Same seed and inputs give the same metrics on CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pdseg_qupath.backbone.model import describe
from pdseg_qupath.backbone.spec import is_hub_id
from pdseg_qupath.core.annotations import ClassMap
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.events import SILENT, Events
from pdseg_qupath.core.fileio import writable_dir
from pdseg_qupath.core.slide import check_mpp
from pdseg_qupath.learn.cache import (
    MapCache,
    PixelCache,
    Rows,
    bytes_per_map,
    bytes_per_pixel,
    extract_views,
    pixels_per_view,
)
from pdseg_qupath.learn.data import TrainingImage, close_images, load_training_images, total_labels
from pdseg_qupath.learn.fit import (
    FitState,
    class_weights,
    fit_head,
    logit_adjustment,
    map_sample_counts,
    new_head,
    with_texture,
)
from pdseg_qupath.learn.head import HeadConfig, HeadEnsemble, head_config
from pdseg_qupath.learn.modelio import SegModel, save_model
from pdseg_qupath.learn.options import IOConfig, TrainOptions
from pdseg_qupath.learn import autotune
from pdseg_qupath.learn.autotune import AUTO, is_auto
from pdseg_qupath.learn.predictor import features_for, load_extractor
from pdseg_qupath.learn.resume import Resume, fingerprints
from pdseg_qupath.learn.runtime import BatchRunner, resolve_device
from pdseg_qupath.learn.sampling import (
    Tile,
    annotated_prior,
    grid_tiles,
    image_classes,
    sample_tiles,
    split_images,
    split_tiles,
)
from pdseg_qupath.outputs import plots
from pdseg_qupath.sources.base import AnnotationSource


@dataclass
class TilePlan:
    """Which images train and which validate, and the tiles of each."""

    train_idx: list[int]
    """Images some head trains on (all of them, with an ensemble that holds out different images)."""
    val_idx: list[int]
    """Images some head is validated on."""
    tiles: list[Tile]
    val_tiles: list[Tile]
    val_mode: str
    members: list[tuple[list[int], list[int]]] = field(default_factory=list)
    """(training images, validation images) of each head of the ensemble."""
    views: list[int] | None = None
    """Views of each training tile (the tile, then augmented ones) when the cache cannot hold ``opts.views`` of
    every tile (:func:`_fit_map_budget`); None: ``opts.views`` each."""

    def view_counts(self, views: int) -> list[int]:
        return list(self.views) if self.views is not None else [views] * len(self.tiles)


@dataclass
class TrainResult:
    """The saved model and how it was made (everything here is also in its model.json)."""

    model: SegModel
    plan: TilePlan
    timings: dict[str, float]
    resumed: bool = False
    messages: list[str] = field(default_factory=list)

    @property
    def model_dir(self) -> Path:
        return self.model.path

    @property
    def class_map(self) -> ClassMap:
        return self.model.class_map

    @property
    def backbone_label(self) -> str:
        return self.model.backbone["label"]

    @property
    def history(self) -> list[dict]:
        return self.model.training["history"]

    @property
    def best_epoch(self) -> int:
        return self.model.training["best_epoch"]

    @property
    def best(self) -> dict:
        """The kept epoch's row of the history."""
        return self.model.training["best"]

    @property
    def train_images(self) -> list[str]:
        return self.model.training["train_images"]

    @property
    def val_images(self) -> list[str]:
        return self.model.training["val_images"]

    @property
    def val_mode(self) -> str:
        """"image" (held-out images), "tile" (held-out tiles of the same image) or "none"."""
        return self.plan.val_mode

    @property
    def cache(self) -> dict[str, Any]:
        return self.model.training["cache"]


def train(
    source: AnnotationSource,
    out_dir: str | Path,
    *,
    backbone: str = "small",
    mpp: float = 0.5,
    classes: Sequence[str] | None = None,
    image_mpp: float | None = None,
    epochs: int = 30,
    device: str = "auto",
    val_images: Sequence[str] | None = None,
    seed: int = 0,
    options: TrainOptions | None = None,
    images: Sequence[str] | None = None,
    events: Events = SILENT,
) -> TrainResult:
    """Train a head on ``source`` and save the model folder ``out_dir`` (see the module docstring).

    ``images`` restricts training (and validation) to those image names; ``events`` hears progress,
    messages and each epoch's scores.
    """
    opts = options or TrainOptions()
    out = _check_arguments(out_dir, epochs, mpp)
    dev = resolve_device(device)
    messages: list[str] = []
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)

    # 1. The annotated images and the class map.
    with events.step("reading the annotated images"):
        imgs, cmap = load_training_images(source, image_mpp=image_mpp, classes=classes, messages=messages,
                                          names=images)
    try:
        # 2. The backbone, and the tiles it sees.
        with events.step(f"loading backbone {backbone}"):
            bb, extractor = load_extractor(backbone, dev, t=None if opts.t == AUTO else opts.t,
                                           blocks=None if opts.blocks == AUTO else opts.blocks, encoder=opts.encoder)
        io = opts.io(mpp, bb.config.tile_size, extractor.out_stride)
        bb_record = _backbone_record(backbone, bb)
        far = resolution_note(mpp, bb)
        if far:
            messages.append(far)
        search = None
        if is_auto(opts):
            # 2b. --t auto / --blocks auto: chosen by image-wise cross-validation on these annotations.
            extract_for = partial(features_for, bb, dev, encoder=extractor.encoder)  # (ts, blocks) -> extractor
            search = autotune.search(imgs, cmap, io, opts, bb, extract_for, seed=seed, device=dev, events=events)
            if search.fallback:
                messages.append(search.fallback)  # shown with the other warnings below
            else:
                events.show("autotune", search.record())
                events.message(search.summary(), "note")
            timings["auto_s"] = search.seconds
            opts = replace(opts, t=list(search.chosen.t), blocks=list(search.chosen.blocks))
            if (tuple(extractor.t), tuple(extractor.blocks)) != (search.chosen.t, search.chosen.blocks):
                extractor = extract_for(search.chosen.t, search.chosen.blocks)
        # 3. Train and validation tiles.
        plan = plan_tiles(imgs, cmap, io, opts, val_images, rng, messages)
        if opts.head == "context":
            _fit_map_budget(plan, io, extractor.channels, opts, rng, messages)
        n_views = sum(plan.view_counts(opts.views)) + len(plan.val_tiles)
        per_view = pixels_per_view(opts.cache_mb, extractor.channels, n_views, opts.pixels_per_tile)
        out.mkdir(parents=True, exist_ok=True)
        resume = Resume(out, fingerprints(imgs, cmap, opts, backbone, bb.sha256, mpp, seed, val_images,
                                          extractor.precision, extractor.encoder),
                        opts.resume, messages)
        for m in messages:
            events.message(m, "warn")
        events.message(f"labels: {total_labels(imgs).describe()}")
        heads = f"{opts.head} head" if len(plan.members) == 1 else f"{len(plan.members)} {opts.head} heads"
        heads += " with texture maps" if opts.texture_maps else ""
        events.message(f"backbone: {bb_record['label']} · {heads} · {len(cmap)} classes "
                       f"({', '.join(cmap.names)}) · "
                       f"{mpp:g} µm/px · {_tiles_and_views(plan, opts.views)} · "
                       f"{len(plan.val_tiles)} validation tiles (split by {plan.val_mode}) · "
                       f"{'whole feature maps' if opts.head == 'context' else f'≤ {per_view} px per view'} · "
                       f"device {dev} ({extractor.summary()})")
        timings["prepare_s"] = time.perf_counter() - t0
        # 4. Features at sampled labelled pixels.
        t1 = time.perf_counter()
        train_cache, val_cache = _extract(plan, imgs, cmap, extractor, io, opts, per_view, seed, resume, events)
        timings["features_s"] = time.perf_counter() - t1
        counts = _sampled_counts(train_cache.tensors(), train_cache, len(cmap), opts, seed)
        _warn_empty_classes(cmap, counts, messages, events)
        del bb  # the heads need only the cached features
        # 5. The heads: one per ensemble member, on its own training images, stopped on its own held-out ones.
        t2 = time.perf_counter()
        fits, adjusts = [], []
        tr_all, va_all = train_cache.tensors(), (val_cache.tensors() if len(val_cache) else None)
        if opts.texture_maps:  # once for every head, not once per head
            tr_all = with_texture(tr_all, io.stride)
            va_all = with_texture(va_all, io.stride) if va_all is not None else None
        for k in range(len(plan.members)):
            tr, va = member_data(plan, k, tr_all, va_all)
            c_k = counts if len(plan.members) == 1 else _sampled_counts(tr, train_cache, len(cmap), opts, seed)
            prior = annotated_prior(imgs, plan.members[k][0], len(cmap), mpp)
            adjust = logit_adjustment(prior, c_k.astype(np.float64), opts.prior_correction)
            if len(plan.members) > 1:
                held = ", ".join(imgs[i].record.name for i in plan.members[k][1]) or "held-out tiles"
                events.message(f"head {k + 1} of {len(plan.members)}: validated on {held}")
                _check_member(cmap, counts, c_k, k, len(plan.members), messages, events)
            fits.append(_fit(tr, va, cmap, io, extractor.channels, c_k, adjust, opts, epochs, _member_seed(seed, k),
                             dev, resume.member(k), out, messages, events, k, len(plan.members)))
            adjusts.append(adjust)
            if k == 0:
                first = (prior, c_k, adjust)  # member 0's, for the record
            del tr, va
        timings["head_s"] = time.perf_counter() - t2
        timings["total_s"] = time.perf_counter() - t0
        # 6. The model folder.
        fit = fits[0]
        cache_info = _cache_record(train_cache, val_cache, cmap, counts, extractor.channels, n_views, per_view, io, opts)
        training = _training_record(fit, plan, imgs, cmap, cache_info, *first, opts, epochs, seed, dev, timings,
                                    messages)
        head = fit.head
        if len(fits) > 1:
            head = HeadEnsemble([f.head for f in fits])
            training["ensemble"] = [_member_record(f, plan, k, imgs, seed, adjusts[k]) for k, f in enumerate(fits)]
        if search is not None:
            training["auto"] = search.record()
        model = SegModel(head, cmap, io, bb_record, _features_record(extractor), training)
        save_model(model, out)
        for p in out.glob("training_curve_*.png"):  # the curves of heads an earlier model in this folder had
            if p.stem.rpartition("_")[2].isdigit() and int(p.stem.rpartition("_")[2]) > len(fits):
                p.unlink(missing_ok=True)
        resume.finish(opts.keep_features)
        return TrainResult(model, plan, timings, resume.resumed, messages)
    finally:
        close_images(imgs)


def _backbone_record(spec: str, bb: Any) -> dict[str, Any]:
    """What model.json records of the backbone: how to find it again and how to recognise it.

    A path or a shipped name, never a Hugging Face id: a hub backbone is recorded by the local folder it
    was fetched to (and its id, for the record), so predicting never contacts the hub."""
    rec: dict[str, Any] = {}
    if Path(spec).is_dir():
        spec = str(Path(spec).resolve())
    elif is_hub_id(spec) and getattr(bb, "folder", None):
        rec["hub_id"], spec = spec, bb.folder
    return {"spec": spec, "config": bb.config.name, "sha256": bb.sha256,
            "random_weights": bool(bb.random_weights), "label": describe(bb), **rec}


def _fit_map_budget(plan: TilePlan, io: IOConfig, channels: int, opts: TrainOptions, rng: np.random.Generator,
                    messages: list[str]) -> None:
    """Keep as many training tiles as fit in ``cache_mb`` as whole maps (the context head's cache);
    check that prediction tiles overlap enough for the head's receptive field."""
    per_view = bytes_per_map(int(channels), io.tile, io.stride)
    fit = int(opts.cache_mb * 2**20) // per_view - len(plan.val_tiles)
    n = len(plan.tiles)
    if fit < n * opts.views:
        # Every tile once before any augmented copy: on IvyGAP 272 tiles seen once beat 136 tiles seen twice
        # (docs/ACCURACY.md, "Every training tile").
        if fit < 1:
            raise PdsegError(f"--cache-mb {opts.cache_mb:g}: too small for the context head's feature maps "
                             f"({per_view / 2**20:.2f} MB per tile view); raise it to at least "
                             f"{(1 + len(plan.val_tiles)) * per_view / 2**20:.2f}")
        full = f"{(n * opts.views + len(plan.val_tiles)) * per_view / 2**20:.0f}"
        if fit < n:
            idx = np.sort(rng.choice(n, size=fit, replace=False))
            plan.tiles = [plan.tiles[int(i)] for i in idx]
            plan.views = [1] * fit
            messages.append(f"--cache-mb {opts.cache_mb:g} holds the feature maps of {fit} of {n} training tiles, "
                            f"one view each ({per_view / 2**20:.2f} MB per view); {full} MB would hold all "
                            f"{opts.views} views of every tile")
        else:
            views = np.ones(n, dtype=int)
            extra, order = fit - n, rng.permutation(n)
            while extra > 0:  # augmented copies, one more per tile in a random order, as far as the budget goes
                take = order[:extra]
                views[take] += 1
                extra -= len(take)
            plan.views = [int(v) for v in views]
            messages.append(f"--cache-mb {opts.cache_mb:g} holds all {n} training tiles but only {fit - n} of their "
                            f"{n * (opts.views - 1)} augmented views ({per_view / 2**20:.2f} MB per view); "
                            f"{full} MB would hold them all")
    rf = HeadConfig.build("context", int(channels), 2, stride=io.stride).receptive_field
    if io.overlap < rf // 2:
        messages.append(f"prediction tiles overlap by {io.overlap} px, less than half the context head's "
                        f"receptive field ({rf} px): tile borders may show; use an overlap of at least {rf // 2}")


def resolution_note(mpp: float, bb: Any) -> str | None:
    """A note when the work resolution is far (over 1.5×) from the one the backbone's weights learned H&E at."""
    learned = getattr(bb, "learned_mpp", None)
    if not learned or max(mpp / learned, learned / mpp) <= 1.5:
        return None
    return (f"working at {mpp:g} µm/px, but backbone {bb.spec} learned H&E at {learned:g} µm/px: its features "
            f"are usually best near that. Unless you have compared both, train with --mpp {learned:g} "
            "(images are resampled to it; README, 'Work resolution').")


def _warn_empty_classes(cmap: ClassMap, counts: np.ndarray, messages: list[str], events: Events) -> None:
    for name, c in zip(cmap.names, counts):
        if c == 0:
            messages.append(f"class {name!r} has no labelled pixels in the training tiles")
            events.message(messages[-1], "warn")


def _check_arguments(out_dir: str | Path, epochs: int, mpp: float) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PdsegError(f"{out}: exists and is not a folder; choose another --out")
    if epochs < 1:
        raise PdsegError(f"--epochs {epochs}: train for at least one epoch")
    check_mpp(mpp, "--mpp (the work resolution)")
    return writable_dir(out)


def plan_tiles(imgs: list[TrainingImage], cmap: ClassMap, io: IOConfig, opts: TrainOptions,
               val_images: Sequence[str] | None, rng: np.random.Generator, messages: list[str]) -> TilePlan:
    """Split the images (once per ensemble member), then sample the training tiles of every image some
    member trains on (enough that each member sees about ``tiles_per_class`` per class) and the
    validation tiles of every image some member holds out."""
    splits: list[tuple[list[int], list[int]]] = []
    held: set[int] = set()
    for _ in range(opts.ensemble):
        train_k, val_k = split_images(imgs, val_images, opts.val_fraction, rng, avoid=held)
        splits.append((train_k, val_k))
        held |= set(val_k)
    train_idx = sorted(set().union(*(set(t) for t, _ in splits)))
    val_idx = sorted(held)
    per_class = math.ceil(opts.tiles_per_class * len(train_idx) / np.mean([len(t) for t, _ in splits]))
    tiles = sample_tiles(imgs, train_idx, cmap, io, per_class, rng)
    for train_k, _ in splits:  # a head whose images are small next to the others' may draw none: its own tiles
        if not any(t.image in train_k for t in tiles):
            tiles += sample_tiles(imgs, train_k, cmap, io, opts.tiles_per_class, rng)
    if val_idx:
        n_val_sets = len({tuple(v) for _, v in splits})
        val_tiles = grid_tiles(imgs, val_idx, io, opts.max_val_tiles * n_val_sets, rng)
        for v in dict.fromkeys(tuple(v) for _, v in splits):  # a head whose images drew none validates on them
            if not any(t.image in v for t in val_tiles):
                val_tiles += grid_tiles(imgs, list(v), io, opts.max_val_tiles, rng)
        plan = TilePlan(train_idx, val_idx, tiles, val_tiles, "image", splits)
    else:
        tiles, val_tiles = split_tiles(tiles, opts.val_fraction, rng)
        plan = TilePlan(train_idx, val_idx, tiles, val_tiles, "tile" if val_tiles else "none", splits)
        if val_tiles:
            why = ("only one annotated image" if len(imgs) < 2 else
                   "no image can be held out without taking a class out of training")
            messages.append(f"{why}: validation uses held-out tiles of the training images (optimistic; "
                            "annotate one more image with every class for a validation split by image)")
    for name in cmap.names:
        if not any(name in image_classes(imgs[i]) for i in train_idx):
            messages.append(f"class {name!r} has no annotation in the training images; it cannot be learnt")
            continue
        blind = sum(1 for _, v in splits if v and not any(name in image_classes(imgs[i]) for i in v))
        if blind and len({tuple(v) for _, v in splits}) == 1:  # one head, or all validated on --val-images
            messages.append(f"class {name!r} has no annotation in the validation images: early stopping cannot "
                            f"see it (annotate it on one more image, or choose --val-images)")
        elif blind:
            messages.append(f"class {name!r} has no annotation in the validation images of {blind} of the "
                            f"{len(splits)} heads: their early stopping cannot see it (annotate it on more images)")
    return plan


def _tiles_and_views(plan: TilePlan, views: int) -> str:
    counts = plan.view_counts(views)
    if len(set(counts)) <= 1:
        return f"{len(plan.tiles)} training tiles × {counts[0] if counts else views} views"
    return f"{len(plan.tiles)} training tiles, {sum(counts)} views"


def member_data(plan: TilePlan, k: int, tr: dict[str, Any],
                va: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The cached training and validation views (or pixels) of ensemble member ``k``, from the whole
    caches' tensors ``tr`` and ``va`` (None: no validation tiles): training tiles off its validation images,
    validation tiles on them (held-out tiles are shared when images are not split). Whole views are indexed
    (:class:`Rows`), not copied, with everything computed on them (texture maps); sampled pixels, a small
    cache, are copied."""
    held = plan.members[k][1] if plan.members else []
    if not held:
        return tr, va

    def on_held(data: dict[str, Any], tiles: list[Tile]) -> Any:
        image = torch.tensor([t.image for t in tiles], dtype=torch.long)[data["tile"].long()]
        return torch.isin(image, torch.tensor(held, dtype=torch.long))

    def part(data: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
        if tr["features"].ndim == 4:  # whole views (V, C, h, w)
            rows = keep.nonzero().squeeze(1)
            return {name: Rows(v, rows) for name, v in data.items()}
        return {name: v[keep] for name, v in data.items()}

    keep_tr = ~on_held(tr, plan.tiles)
    if not bool(keep_tr.all()):
        tr = part(tr, keep_tr)
    if va is not None:
        keep_va = on_held(va, plan.val_tiles)
        if not bool(keep_va.any()):
            va = None
        elif not bool(keep_va.all()):
            va = part(va, keep_va)
    return tr, va


def _extract(plan: TilePlan, imgs: list[TrainingImage], cmap: ClassMap, extractor: Any, io: IOConfig,
             opts: TrainOptions, per_view: int, seed: int, resume: Resume, events: Events) -> tuple[Any, Any]:
    runner = BatchRunner(opts.batch_size, on_backoff=lambda b: events.message(
        f"out of GPU memory: retrying with batch size {b}", "warn"))
    step = events.step("features", total=sum(plan.view_counts(opts.views)) + len(plan.val_tiles))
    common = dict(n_pixels=per_view, aug=opts.augment, seed=seed, runner=runner, shard=resume.shard,
                  on_views=step.advance)
    dense = opts.head == "context"
    train_cache = extract_views("train", plan.tiles, imgs, len(cmap), extractor, io,
                                views=plan.view_counts(opts.views), stratified=True, dense=dense, **common)
    val_cache = extract_views("val", plan.val_tiles, imgs, len(cmap), extractor, io, views=1, stratified=False,
                              dense=dense, **common)
    step.close()
    if len(train_cache) == 0:
        raise PdsegError("the sampled training tiles contain no labelled pixels; check the annotations' "
                         "classes and the image resolution (--image-mpp)")
    return train_cache, val_cache


def _check_member(cmap: ClassMap, counts: np.ndarray, c_k: np.ndarray, k: int, members: int, messages: list[str],
                  events: Events) -> None:
    """Head ``k`` of an ensemble must have labelled pixels to learn from; a class it lacks is worth a warning."""
    if c_k.sum() == 0:
        raise PdsegError(f"head {k + 1} of {members} has no labelled pixels in its training tiles (the cache kept "
                         "none from its training images): raise --cache-mb, or train one head (--ensemble 1)")
    lacking = [n for n, c, c_all in zip(cmap.names, c_k, counts) if c == 0 and c_all > 0]
    if lacking:
        messages.append(f"head {k + 1} of {members} has no labelled pixels of {', '.join(map(repr, lacking))} in "
                        "its training tiles: it cannot predict them, and the ensemble predicts them less often")
        events.message(messages[-1], "warn")


def _member_seed(seed: int, k: int) -> int:
    """Ensemble member k's seed (member 0 has the run's, so one head trains as it always did)."""
    return seed + 7919 * k


def _sampled_counts(data: dict[str, Any], cache: PixelCache | MapCache, n_classes: int, opts: TrainOptions,
                    seed: int) -> np.ndarray:
    """Labelled pixels per class that training draws from ``data`` (cached pixels, or an epoch's sample of maps)."""
    if isinstance(cache, MapCache):
        return map_sample_counts(data, opts.pixels_per_tile, n_classes, seed)
    lab = data["labels"].numpy()
    return np.bincount(lab[lab < n_classes], minlength=n_classes)[:n_classes]


def _fit(tr: dict[str, Any], val: dict[str, Any] | None, cmap: ClassMap, io: IOConfig,
         channels: int, counts: np.ndarray, adjust: Any, opts: TrainOptions, epochs: int, seed: int, device: str,
         resume: Resume, out: Path, messages: list[str], events: Events, member: int = 0, members: int = 1):
    config = head_config(opts, channels, len(cmap), io.stride)
    head = new_head(config, tr["features"], seed)
    step = events.step("epochs" if members == 1 else f"epochs, head {member + 1}/{members}", total=epochs)
    colors = [c.color for c in cmap.classes]
    curve = out / ("training_curve.png" if member == 0 else f"training_curve_{member + 1}.png")

    def on_epoch(row: dict, state: FitState, new: bool) -> None:
        events.show("epoch", (cmap.names, row))
        if new:
            plots.write_training_curve(state.history, curve, cmap.names, best_epoch=state.best_epoch, colors=colors)
        step.set_total(epochs, done=row["epoch"])

    fit = fit_head(head, tr, val, cmap.names, opts, epochs=epochs,
                   seed=seed, device=device, weight=class_weights(opts.class_weights, counts), adjust=adjust,
                   resume=resume, messages=messages, on_epoch=on_epoch)
    step.close()
    if fit.resumed_after:
        events.message(f"resumed after epoch {fit.resumed_after}", "done")
    if fit.stopped_early:
        events.message(f"early stop: no better validation mIoU for {opts.patience} epochs; best epoch {fit.best_epoch}")
    return fit


def _cache_record(train_cache: PixelCache | MapCache, val_cache: PixelCache | MapCache, cmap: ClassMap,
                  counts: np.ndarray, channels: int, n_views: int, per_view: int, io: IOConfig,
                  opts: TrainOptions) -> dict[str, Any]:
    if isinstance(train_cache, MapCache):
        return {
            "form": "maps",
            "views_train": train_cache.views,
            "views_val": val_cache.views,
            "pixels_train": len(train_cache),
            "pixels_val": len(val_cache),
            "bytes": train_cache.nbytes + val_cache.nbytes,
            "bytes_per_view": bytes_per_map(int(channels), io.tile, io.stride),
            "pixels_per_view": opts.pixels_per_tile,
            "channels": int(channels),
            "budget_mb": opts.cache_mb,
            "class_pixels_train": {n: int(c) for n, c in zip(cmap.names, counts)},
        }
    return {
        "form": "pixels",
        "pixels_train": len(train_cache),
        "pixels_val": len(val_cache),
        "bytes": train_cache.nbytes + val_cache.nbytes,
        "bytes_per_pixel": bytes_per_pixel(int(channels)),
        "pixels_per_view": per_view,
        "channels": int(channels),
        "full_feature_maps_bytes_fp16": n_views * int(channels) * (io.tile // io.stride) ** 2 * 2,
        "budget_mb": opts.cache_mb,
        "class_pixels_train": {n: int(c) for n, c in zip(cmap.names, counts)},
    }


def _training_record(fit, plan: TilePlan, imgs: list[TrainingImage], cmap: ClassMap, cache_info: dict,
                     prior: np.ndarray, counts: np.ndarray, adjust: Any, opts: TrainOptions, epochs: int, seed: int,
                     device: str, timings: dict[str, float], messages: list[str]) -> dict[str, Any]:
    return {
        "seed": seed,
        "epochs": epochs,
        "epochs_run": len(fit.history),
        "best_epoch": fit.best_epoch,
        "best": fit.best,
        "history": fit.history,
        "validation": plan.val_mode,
        "train_images": [imgs[i].record.name for i in plan.train_idx],
        "labels": vars(total_labels([imgs[i] for i in plan.train_idx])),
        "val_images": [imgs[i].record.name for i in plan.val_idx],
        "tiles": len(plan.tiles),
        "val_tiles": len(plan.val_tiles),
        "cache": cache_info,
        "prior": {
            "annotated_share": {n: round(float(p), 5) for n, p in zip(cmap.names, prior)},
            "sampled_share": {n: round(float(c) / max(1, counts.sum()), 5) for n, c in zip(cmap.names, counts)},
            "strength": opts.prior_correction,
            "logit_adjustment": _rounded(adjust),
        },
        "options": opts.to_json(),
        "device": device,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "messages": messages,
    }


def _member_record(fit: Any, plan: TilePlan, k: int, imgs: list[TrainingImage], seed: int,
                   adjust: Any) -> dict[str, Any]:
    """What model.json keeps of one head of an ensemble (its curve is training_curve[_k].png)."""
    train_k, val_k = plan.members[k]
    return {"seed": _member_seed(seed, k), "train_images": [imgs[i].record.name for i in train_k],
            "val_images": [imgs[i].record.name for i in val_k], "epochs_run": len(fit.history),
            "best_epoch": fit.best_epoch, "best": fit.best, "logit_adjustment": _rounded(adjust)}


def _rounded(adjust: Any) -> list[float] | None:
    return [round(float(a), 5) for a in adjust] if adjust is not None else None


def _features_record(extractor: Any) -> dict[str, Any]:
    return {
        "t": [int(x) for x in extractor.t],
        "blocks": [int(b) for b in extractor.blocks],
        "channels": int(extractor.channels),
        "out_stride": int(extractor.out_stride),
        "seed": int(extractor.seed),
        "precision": str(extractor.precision),
        "encoder": str(extractor.encoder),
    }
