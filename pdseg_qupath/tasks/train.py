"""Train the FCN head on a source's sparse annotations (the ``train`` command).

The pipeline, and why:

1. **Tiles.** 256-px tiles at the work resolution are centred on random points inside the annotations,
   with the same number of tiles for every class, so a class drawn in two small polygons is seen as
   often as one drawn over half the slide. Labels are rasterized with 255 for unannotated pixels.
2. **Views.** Each tile is seen as ``views`` versions: the tile itself and random flips/rotations with
   H&E stain jitter (:mod:`pdseg_qupath.learn.augment`). The backbone is frozen, so augmentation happens before
   feature extraction, once per view.
3. **Cache.** Each view's features are kept only at sampled labelled pixels, stratified by class
   (:mod:`pdseg_qupath.learn.cache`), within ``cache_mb``. Every epoch then trains the head alone.
4. **Head.** Cross-entropy (``ignore_index=255``, optional class weights), AdamW, early stopping on a
   validation split by image (the default when at least 2 images are annotated), keeping the best epoch.
5. **Record.** Each epoch prints a table and redraws ``training_curve.png``; the model folder is written
   at the end (:mod:`pdseg_qupath.learn.modelio`).

Interrupting a run loses nothing: extracted features are written in shards and the head is checkpointed
every epoch in ``OUT/.pdseg-train/``; the same command resumes where it stopped (and gives the same
result as an uninterrupted run). Same seed and inputs give the same metrics on CPU.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import shapely
import torch
import torch.nn.functional as F
from rich.console import Console

from pdseg_qupath import __version__
from pdseg_qupath.core.annotations import IGNORE, Annotation, ClassInfo, ClassMap
from pdseg_qupath.learn.augment import AugmentConfig, augment
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.learn.cache import (
    BatchRunner,
    PixelCache,
    bytes_per_pixel,
    load_extractor,
    pixels_per_view,
    resolve_device,
    stratified_pixels,
    uniform_pixels,
)
from pdseg_qupath.core.grid import Window
from pdseg_qupath.learn.head import FCNHead, HeadConfig
from pdseg_qupath.core.metrics import Confusion, scores
from pdseg_qupath.learn.modelio import SegModel, save_model
from pdseg_qupath.sources.base import AnnotationSource, ImageRecord, select_images

RESUME_DIR = ".pdseg-train"


@dataclass
class TrainOptions:
    """Everything that shapes a training run (all recorded in model.json)."""

    tile_size: int | None = None
    """Tile size in px at the work resolution (default: the backbone's, 256)."""
    overlap: int | None = None
    """Overlap of prediction tiles in px (stored in the model for ``predict``); default a quarter tile."""
    tiles_per_class: int = 48
    views: int = 2
    """Versions of each training tile: the tile itself, then augmented ones."""
    pixels_per_tile: int = 512
    """Upper bound of sampled pixels per tile view (the cache budget may lower it)."""
    cache_mb: float = 512.0
    val_fraction: float = 0.2
    max_val_tiles: int = 48
    batch_size: int = 8
    """Tiles per backbone batch (halved automatically on GPU out-of-memory)."""
    batch_pixels: int = 4096
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 8
    class_weights: str | Sequence[float] | None = None
    """None, "balanced" (inverse frequency of cached pixels) or one weight per class."""
    prior_correction: bool = True
    """Class-stratified sampling trains the head as if all classes were equally common. With this on,
    the logits are shifted by log(annotated share / sampled share) (logit adjustment for label shift),
    so predictions follow the class proportions of the annotations instead of over-calling rare classes."""
    hidden: tuple[int, int] = (64, 32)
    dropout: float = 0.1
    rgb_skip: bool = False
    t: int | Sequence[int] | None = None
    blocks: Sequence[int] | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    resume: bool = True
    keep_features: bool = False
    """Keep the feature cache in OUT/.pdseg-train after success: a rerun with other head options
    (epochs, learning rate, ...) then skips feature extraction."""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        if d["blocks"] is not None:
            d["blocks"] = list(d["blocks"])
        if isinstance(d["t"], (list, tuple)):
            d["t"] = list(d["t"])
        if isinstance(d["class_weights"], tuple):
            d["class_weights"] = list(d["class_weights"])
        return d


@dataclass
class TrainResult:
    model_dir: Path
    model: SegModel
    class_map: ClassMap
    history: list[dict]
    best_epoch: int
    best: dict
    train_images: list[str]
    val_images: list[str]
    val_mode: str
    """"image" (held-out images), "tile" (held-out tiles of the same image) or "none"."""
    n_tiles: int
    n_val_tiles: int
    cache: dict[str, Any]
    timings: dict[str, float]
    backbone_label: str
    resumed: bool = False
    messages: list[str] = field(default_factory=list)


@dataclass
class _Image:
    record: ImageRecord
    annotations: list[Annotation]
    slide: Any = None
    index: Any = None


@dataclass(frozen=True)
class _Tile:
    image: int
    x: int
    y: int


# ------------------------------------------------------------------------------------------- inputs


def load_training_images(
    source: AnnotationSource,
    *,
    image_mpp: float | None,
    classes: Sequence[str] | None,
    messages: list[str],
    names: Sequence[str] | None = None,
) -> tuple[list[_Image], ClassMap]:
    """Images with usable annotations, and the class map. Unusable images are reported, not fatal."""
    images: list[_Image] = []
    records = select_images(source.images(), names)
    for rec in records:
        if rec.error:
            messages.append(f"{rec.name}: skipped ({rec.error})")
            continue
        anns, report = source.read_annotations(rec)
        for m in report.messages[:5]:
            messages.append(f"{rec.name}: {m}")
        if report.skipped:
            messages.append(f"{rec.name}: {report.skipped} point/line/empty object(s) carry no area and were skipped")
        areas = [a for a in anns if a.object_type == "annotation" and a.classification]
        if not any(not a.is_ignore for a in areas):
            messages.append(f"{rec.name}: no classified annotations; not used for training")
            continue
        images.append(_Image(rec, areas))
    if not images:
        raise PdsegError(
            "no image of the source has classified annotations to train on; draw and classify some "
            "areas in QuPath (or check the <image>.geojson files), then train again"
        )
    all_anns = [a for im in images for a in im.annotations]
    try:
        cmap = ClassMap.from_annotations(all_anns, names=classes)
    except ValueError as exc:
        raise PdsegError(f"--classes: {exc}") from None
    colors = source.class_colors()
    cmap = ClassMap(tuple(ClassInfo(c.name, tuple(colors.get(c.name, c.color))) for c in cmap.classes))  # type: ignore[arg-type]
    if len(cmap) < 2:
        raise PdsegError(
            f"only one class ({cmap.names[0] if len(cmap) else 'none'}) is annotated; a segmentation model "
            "needs at least two (annotate e.g. the background or other tissue too)"
        )
    from pdseg_qupath.core.raster import AnnotationIndex
    from pdseg_qupath.core.slide import open_slide

    for im in images:
        if im.record.path is None:
            raise PdsegError(f"{im.record.name}: its image is not a local file ({im.record.uri})")
        im.slide = open_slide(im.record.path, mpp=im.record.mpp, fallback_mpp=image_mpp)
        im.index = AnnotationIndex(im.annotations, cmap)
        for name, n in im.index.skipped_unknown.items():
            messages.append(f"{im.record.name}: {n} annotation(s) of class {name!r} are not in the class list; ignored")
    return images, cmap


def split_images(
    images: list[_Image], val_images: Sequence[str] | None, fraction: float, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """Train and validation image indices: the user's choice, else ~``fraction`` of images (≥ 1) when
    at least 2 are annotated, else no image split."""
    names = [im.record.name for im in images]
    if val_images:
        unknown = [v for v in val_images if v not in names]
        if unknown:
            raise PdsegError(f"--val-images {unknown}: not among the annotated images {names}")
        val = [i for i, n in enumerate(names) if n in set(val_images)]
        train = [i for i in range(len(images)) if i not in set(val)]
        if not train:
            raise PdsegError("--val-images names every annotated image; leave at least one for training")
        return train, val
    if len(images) < 2:
        return list(range(len(images))), []
    n_val = max(1, int(round(fraction * len(images))))
    order = rng.permutation(len(images))
    val = sorted(int(i) for i in order[:n_val])
    return [i for i in range(len(images)) if i not in set(val)], val


def _point_in(geom, rng: np.random.Generator) -> tuple[float, float]:
    minx, miny, maxx, maxy = geom.bounds
    for _ in range(8):
        xs = rng.uniform(minx, maxx, 64)
        ys = rng.uniform(miny, maxy, 64)
        inside = np.flatnonzero(shapely.contains_xy(geom, xs, ys))
        if len(inside):
            return float(xs[inside[0]]), float(ys[inside[0]])
    p = geom.representative_point()
    return float(p.x), float(p.y)


def sample_tiles(
    images: list[_Image], which: Sequence[int], cmap: ClassMap, tile: int, mpp: float,
    per_class: int, rng: np.random.Generator, stride: int = 4,
) -> list[_Tile]:
    """``per_class`` tiles per class, centred on random points inside that class's annotations
    (annotations chosen in proportion to their area). Origins snap to the feature stride."""
    tiles: list[_Tile] = []
    for k, name in enumerate(cmap.names):
        pool = [(i, a.geometry) for i in which for a in images[i].annotations if a.classification == name]
        pool = [(i, g) for i, g in pool if g.area > 0]
        if not pool:
            continue
        areas = np.array([g.area for _, g in pool], dtype=np.float64)
        picks = rng.choice(len(pool), size=per_class, p=areas / areas.sum())
        for j in picks:
            i, g = pool[int(j)]
            px, py = _point_in(g, rng)
            d = mpp / images[i].slide.mpp
            x = int(round((px / d - tile / 2) / stride)) * stride
            y = int(round((py / d - tile / 2) / stride)) * stride
            tiles.append(_Tile(i, x, y))
    return tiles


def grid_tiles(images: list[_Image], which: Sequence[int], tile: int, mpp: float, limit: int,
               rng: np.random.Generator) -> list[_Tile]:
    """Non-overlapping tiles over the annotated areas of validation images (at most ``limit``)."""
    out: list[_Tile] = []
    for i in which:
        im = images[i]
        d = mpp / im.slide.mpp
        minx, miny, maxx, maxy = shapely.total_bounds(np.array([a.geometry for a in im.annotations], dtype=object))
        x0, y0 = int(np.floor(minx / d)), int(np.floor(miny / d))
        x1, y1 = int(np.ceil(maxx / d)), int(np.ceil(maxy / d))
        for y in range(y0, max(y0 + 1, y1), tile):
            for x in range(x0, max(x0 + 1, x1), tile):
                if im.index.intersects(Window(x, y, tile, tile, d)):
                    out.append(_Tile(i, x - x % 4, y - y % 4))
    if len(out) > limit:
        keep = np.sort(rng.choice(len(out), size=limit, replace=False))
        out = [out[int(j)] for j in keep]
    return out


def annotated_prior(images: list[_Image], which: Sequence[int], n_classes: int, mpp: float,
                    max_pixels: int = 4_000_000) -> np.ndarray:
    """Share of each class among the annotated pixels of the training images (paint order applied).

    Each image is rasterized once over its annotations' bounds, at the work resolution or coarser so
    that at most ``max_pixels`` pixels are needed.
    """
    counts = np.zeros(n_classes, dtype=np.float64)
    for i in which:
        im = images[i]
        if not len(im.index):
            continue
        minx, miny, maxx, maxy = shapely.total_bounds(im.index.geometries)
        d = mpp / im.slide.mpp
        w0, h0 = max(1.0, (maxx - minx) / d), max(1.0, (maxy - miny) / d)
        f = max(1.0, float(np.sqrt(w0 * h0 / max_pixels)))
        dd = d * f
        x0, y0 = int(np.floor(minx / dd)), int(np.floor(miny / dd))
        win = Window(x0, y0, int(np.ceil(maxx / dd)) - x0 + 1, int(np.ceil(maxy / dd)) - y0 + 1, dd)
        lab = im.index.rasterize(win)
        counts += np.bincount(lab[lab < n_classes].ravel(), minlength=n_classes)[:n_classes]
    total = counts.sum()
    return counts / total if total else np.full(n_classes, 1.0 / n_classes)


def logit_adjustment(prior: np.ndarray, sampled: np.ndarray) -> torch.Tensor:
    """log(prior / sampled share) per class (0 where either is empty): added to the head's logits."""
    s = sampled / max(1.0, float(sampled.sum()))
    ok = (prior > 0) & (s > 0)
    adj = np.zeros(len(prior), dtype=np.float64)
    adj[ok] = np.log(prior[ok] / s[ok])
    return torch.tensor(adj, dtype=torch.float32)


# ------------------------------------------------------------------------------------- resume state


FEATURE_OPTIONS = ("tile_size", "tiles_per_class", "views", "pixels_per_tile", "cache_mb", "val_fraction",
                   "max_val_tiles", "t", "blocks", "augment")
"""Options that change the cached features; the others (head, optimiser, epochs) only the checkpoint."""
RESTART_OPTIONS = ("lr", "weight_decay", "batch_pixels", "class_weights", "hidden", "dropout", "rgb_skip",
                   "prior_correction")
"""Head options that make an old checkpoint useless (``epochs`` and ``patience`` may change on resume)."""


def _fingerprints(images: list[_Image], cmap: ClassMap, opts: TrainOptions, spec: str, bb_sha: str | None,
                  mpp: float, seed: int, val_images: Sequence[str] | None) -> tuple[str, str]:
    """(features, head) fingerprints: what the cached features depend on, and that plus the head options."""
    o = opts.to_json()
    h = hashlib.sha256()
    h.update(json.dumps({"opts": {k: o[k] for k in FEATURE_OPTIONS}, "spec": spec, "sha": bb_sha, "mpp": mpp,
                         "seed": seed, "classes": cmap.to_json(), "val": list(val_images or []), "v": __version__},
                        sort_keys=True, default=str).encode())
    for im in images:
        h.update(im.record.name.encode())
        h.update(str(im.slide.mpp).encode())
        for a in im.annotations:
            h.update((a.classification or "").encode())
            h.update(shapely.to_wkb(a.geometry))
    feat = h.hexdigest()
    head = hashlib.sha256((feat + json.dumps({k: o[k] for k in RESTART_OPTIONS}, sort_keys=True, default=str))
                          .encode()).hexdigest()
    return feat, head


class _Resume:
    """``OUT/.pdseg-train/``: feature shards (``features-<fp>/``) and the per-epoch head checkpoint
    (``checkpoint-<fp>.pt``) of an unfinished run. State left by other inputs or options is removed."""

    def __init__(self, out_dir: Path, fingerprints: tuple[str, str], enabled: bool, messages: list[str]) -> None:
        self.dir = out_dir / RESUME_DIR
        self.enabled = enabled
        feat, head = fingerprints[0][:16], fingerprints[1][:16]
        self.features_dir = self.dir / f"features-{feat}"
        self.checkpoint = self.dir / f"checkpoint-{head}.pt"
        self.resumed = enabled and (self.features_dir.is_dir() or self.checkpoint.is_file())
        if self.dir.exists():
            stale = [p for p in self.dir.iterdir() if p not in (self.features_dir, self.checkpoint)]
            if not enabled:
                stale = list(self.dir.iterdir())
            for p in stale:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            if stale and enabled:
                messages.append(f"{self.dir}: removed state left by a run with other inputs or options")
        if self.resumed:
            messages.append(f"resuming from {self.dir} (features and head checkpoint of an earlier run)")
        if enabled:
            self.features_dir.mkdir(parents=True, exist_ok=True)

    def shard(self, name: str, index: int) -> Path:
        return self.features_dir / f"{name}-{index:05d}.safetensors"

    def finish(self, keep_features: bool) -> None:
        """After a completed run: drop the checkpoint; keep the features only if asked (for tuning)."""
        self.checkpoint.unlink(missing_ok=True)
        if not keep_features:
            shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------- extraction


def _extract_views(
    name: str,
    tiles: list[_Tile],
    images: list[_Image],
    cmap: ClassMap,
    extractor,
    *,
    tile: int,
    mpp: float,
    views: int,
    n_pixels: int,
    stratified: bool,
    aug: AugmentConfig,
    seed: int,
    runner: BatchRunner,
    resume: _Resume,
    on_view: Callable[[int], None] | None,
) -> PixelCache:
    """Features at sampled pixels of every (tile, view). Shards of 64 views go to disk as they finish."""
    stride = int(getattr(extractor, "out_stride", 4))
    cache = PixelCache(int(extractor.channels))
    jobs = [(ti, v) for ti in range(len(tiles)) for v in range(views)]
    shard_size = 64
    for s, start in enumerate(range(0, len(jobs), shard_size)):
        chunk = jobs[start : start + shard_size]
        path = resume.shard(name, s)
        if resume.enabled and path.is_file():
            try:
                cache.extend(PixelCache.load(path))
                if on_view:
                    on_view(len(chunk))
                continue
            except Exception:  # a shard cut short by the interruption: extract it again
                path.unlink(missing_ok=True)
        part = PixelCache(cache.channels)

        def run(batch: list[tuple[int, int]]) -> list[int]:
            rgbs, labs, origins = [], [], []
            for ti, v in batch:
                t = tiles[ti]
                im = images[t.image]
                win = Window(t.x, t.y, tile, tile, mpp / im.slide.mpp)
                rgb, lab = im.slide.read(win), im.index.rasterize(win)
                if v > 0:
                    rng = np.random.default_rng([seed, 1, ti, v])
                    rgb, lab = augment(rgb, lab, rng, aug)
                rgbs.append(rgb)
                labs.append(lab)
                origins.append((t.x, t.y))
            with torch.no_grad():
                feats = extractor.extract(np.stack(rgbs), origins=origins)
            feats = feats.float().cpu()
            counts = []
            for (ti, v), f, rgb, lab in zip(batch, feats, rgbs, labs):
                rng = np.random.default_rng([seed, 2, ti, v])
                idx = (stratified_pixels(lab, n_pixels, len(cmap), rng) if stratified
                       else uniform_pixels(lab, n_pixels, rng))
                counts.append(part.add_tile(f, rgb, lab, idx, stride, ti))
            if on_view:
                on_view(len(batch))
            return counts

        runner(run, chunk)
        if resume.enabled:
            part.save(path)
        cache.extend(part)
    return cache


# ------------------------------------------------------------------------------------------ training


def _class_weights(spec, counts: np.ndarray) -> torch.Tensor | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "balanced":
            raise PdsegError(f"class weights {spec!r}: use 'balanced' or one number per class")
        freq = counts / max(1, counts.sum())
        w = np.where(freq > 0, 1.0 / np.maximum(freq, 1e-12), 0.0)
        w = w / w[w > 0].mean()
        return torch.tensor(w, dtype=torch.float32)
    w = np.asarray(list(spec), dtype=np.float32)
    if len(w) != len(counts) or (w < 0).any():
        raise PdsegError(f"class weights {list(spec)}: need {len(counts)} non-negative numbers, one per class")
    return torch.from_numpy(w)


def _evaluate_pixels(head: FCNHead, data: dict[str, torch.Tensor], n_classes: int, device: str,
                     weight: torch.Tensor | None, rgb_skip: bool,
                     adjust: torch.Tensor | None = None) -> tuple[float, Confusion]:
    head.eval()
    conf = Confusion(n_classes)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data["labels"]), 65536):
            f = data["features"][i : i + 65536].to(device).float()
            y = data["labels"][i : i + 65536].to(device).long()
            rgb = data["rgb"][i : i + 65536].to(device).float() if rgb_skip else None
            logits = head.forward_pixels(f, rgb)
            if adjust is not None:
                logits = logits + adjust
            total += F.cross_entropy(logits, y, weight=weight, ignore_index=IGNORE, reduction="sum").item()
            n += int((y != IGNORE).sum())
            conf.update(y.cpu().numpy(), logits.argmax(1).cpu().numpy())
    return total / max(1, n), conf


def _epoch_row(epoch: int, train_loss: float, val_loss: float | None, sc: dict) -> dict:
    return {
        "epoch": epoch,
        "loss": train_loss,
        "val_loss": val_loss,
        "accuracy": sc["accuracy"],
        "miou": sc["miou"],
        "macro_dice": sc["macro_dice"],
        "per_class": {k: {"dice": v["dice"], "iou": v["iou"], "pixels": v["pixels"]} for k, v in sc["per_class"].items()},
    }


def train_model(
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
    progress=None,
    console: Console | None = None,
    options: TrainOptions | None = None,
    images: Sequence[str] | None = None,
) -> TrainResult:
    """Train a head on ``source`` and save the model folder ``out_dir`` (see the module docstring).

    ``progress`` is an optional ``rich.progress.Progress`` (bars for extraction and epochs); ``console``
    receives the per-epoch tables (default: a new Console). ``images`` restricts training (and
    validation) to those image names.
    """
    from pdseg_qupath.outputs.report import EpochTable, write_training_curve

    opts = options or TrainOptions()
    console = console or Console()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PdsegError(f"{out}: exists and is not a folder; choose another --out")
    if epochs < 1:
        raise PdsegError(f"--epochs {epochs}: train for at least one epoch")
    if not mpp > 0:
        raise PdsegError(f"--mpp {mpp}: the work resolution must be a positive µm/px")
    dev = resolve_device(device)
    messages: list[str] = []
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)

    imgs, cmap = load_training_images(source, image_mpp=image_mpp, classes=classes, messages=messages,
                                      names=images)
    try:
        bb, extractor = load_extractor(backbone, dev, t=opts.t, blocks=opts.blocks)
        from pdseg_qupath.backbone.model import describe

        label = describe(bb)
        bb_record = {
            "spec": str(Path(backbone).resolve()) if Path(backbone).is_dir() else backbone,
            "config": bb.config.name,
            "sha256": getattr(bb, "sha256", None),
            "random_weights": bool(getattr(bb, "random_weights", False)),
            "label": label,
        }
        tile = int(opts.tile_size or bb.config.tile_size)
        overlap = tile // 4 if opts.overlap is None else int(opts.overlap)
        if not 0 <= overlap < tile // 2:
            raise PdsegError(f"overlap {overlap} must be in [0, {tile // 2}) for {tile}-px tiles")
        train_idx, val_idx = split_images(imgs, val_images, opts.val_fraction, rng)
        stride = int(getattr(extractor, "out_stride", 4))
        tiles = sample_tiles(imgs, train_idx, cmap, tile, mpp, opts.tiles_per_class, rng, stride)
        if val_idx:
            val_mode = "image"
            val_tiles = grid_tiles(imgs, val_idx, tile, mpp, opts.max_val_tiles, rng)
        else:
            order = rng.permutation(len(tiles))
            n_val = int(round(opts.val_fraction * len(tiles))) if len(tiles) >= 10 else 0
            val_tiles = [tiles[int(i)] for i in sorted(order[:n_val])]
            tiles = [tiles[int(i)] for i in sorted(order[n_val:])]
            val_mode = "tile" if n_val else "none"
            if n_val:
                messages.append(
                    "only one annotated image: validation uses held-out tiles of it (optimistic; "
                    "annotate a second image for a validation split by image)"
                )
        for k, name in enumerate(cmap.names):
            if not any(a.classification == name for i in train_idx for a in imgs[i].annotations):
                messages.append(f"class {name!r} has no annotation in the training images; it cannot be learnt")
        n_views = len(tiles) * opts.views + len(val_tiles)
        per_view = pixels_per_view(opts.cache_mb, extractor.channels, n_views, opts.pixels_per_tile)
        fp = _fingerprints(imgs, cmap, opts, backbone, getattr(bb, "sha256", None), mpp, seed, val_images)
        out.mkdir(parents=True, exist_ok=True)
        resume = _Resume(out, fp, opts.resume, messages)
        for m in messages:
            console.print(f"[yellow]{m}")
        console.print(
            f"backbone: {label} · {len(cmap)} classes ({', '.join(cmap.names)}) · {mpp:g} µm/px · "
            f"{len(tiles)} training tiles × {opts.views} views · {len(val_tiles)} validation tiles "
            f"(split by {val_mode}) · ≤ {per_view} px per view · device {dev}"
        )
        timings["prepare_s"] = time.perf_counter() - t0

        # --- features -----------------------------------------------------------------------------
        t1 = time.perf_counter()
        runner = BatchRunner(opts.batch_size, on_backoff=lambda b: console.print(
            f"[yellow]out of GPU memory: retrying with batch size {b}"))
        task = progress.add_task("features", total=n_views) if progress is not None else None
        tick = (lambda n: progress.advance(task, n)) if progress is not None else None
        common = dict(tile=tile, mpp=mpp, n_pixels=per_view, seed=seed, runner=runner, resume=resume,
                      on_view=tick)
        train_cache = _extract_views("train", tiles, imgs, cmap, extractor, views=opts.views,
                                     stratified=True, aug=opts.augment, **common)
        val_cache = _extract_views("val", val_tiles, imgs, cmap, extractor, views=1, stratified=False,
                                   aug=opts.augment, **common)
        timings["features_s"] = time.perf_counter() - t1
        if len(train_cache) == 0:
            raise PdsegError("the sampled training tiles contain no labelled pixels; check the annotations' "
                             "classes and the image resolution (--image-mpp)")
        counts = train_cache.class_counts(len(cmap))
        for k, name in enumerate(cmap.names):
            if counts[k] == 0:
                messages.append(f"class {name!r} has no labelled pixels in the training tiles")
                console.print(f"[yellow]class {name!r} has no labelled pixels in the training tiles")
        full_bytes = n_views * int(extractor.channels) * (tile // stride) ** 2 * 2
        cache_info = {
            "pixels_train": len(train_cache),
            "pixels_val": len(val_cache),
            "bytes": train_cache.nbytes + val_cache.nbytes,
            "bytes_per_pixel": bytes_per_pixel(int(extractor.channels)),
            "pixels_per_view": per_view,
            "channels": int(extractor.channels),
            "full_feature_maps_bytes_fp16": full_bytes,
            "budget_mb": opts.cache_mb,
            "class_pixels_train": {n: int(c) for n, c in zip(cmap.names, counts)},
        }
        prior = annotated_prior(imgs, train_idx, len(cmap), mpp)
        adjust = logit_adjustment(prior, counts.astype(np.float64)) if opts.prior_correction else None
        prior_info = {
            "annotated_share": {n: round(float(p), 5) for n, p in zip(cmap.names, prior)},
            "sampled_share": {n: round(float(c) / max(1, counts.sum()), 5) for n, c in zip(cmap.names, counts)},
            "logit_adjustment": [round(float(a), 5) for a in adjust] if adjust is not None else None,
        }
        del bb  # the backbone is not needed for the head (extractor keeps what it needs)

        # --- head -------------------------------------------------------------------------------------
        t2 = time.perf_counter()
        tr = train_cache.tensors()
        va = val_cache.tensors() if len(val_cache) else None
        torch.manual_seed(seed)
        hcfg = HeadConfig(int(extractor.channels), len(cmap), tuple(opts.hidden), opts.dropout, stride,
                          opts.rgb_skip)
        head = FCNHead(hcfg)
        f32 = tr["features"].float()
        head.set_normalization(f32.mean(0), f32.std(0))
        del f32
        head.to(dev)
        weight = _class_weights(opts.class_weights, counts)
        if weight is not None:
            weight = weight.to(dev)
        adj_dev = adjust.to(dev) if adjust is not None else None
        optim = torch.optim.AdamW(head.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        history: list[dict] = []
        best_state, best_epoch, best_score, stale = None, 0, -1.0, 0
        start_epoch = 1
        if resume.enabled and resume.checkpoint.is_file():
            try:
                ck = torch.load(resume.checkpoint, map_location=dev, weights_only=True)
                head.load_state_dict(ck["head"])
                optim.load_state_dict(ck["optim"])
                history = json.loads(ck["history"])
                best_state = ck["best_state"]
                best_epoch, best_score, stale = int(ck["best_epoch"]), float(ck["best_score"]), int(ck["stale"])
                start_epoch = int(ck["epoch"]) + 1
                console.print(f"[green]resumed after epoch {start_epoch - 1}")
            except Exception as exc:  # noqa: BLE001 - a damaged checkpoint only costs the head epochs
                messages.append(f"{resume.checkpoint}: unreadable ({exc}); training the head from epoch 1")
        table = EpochTable(cmap.names, console)
        for row in history:
            table.add(row)
        ep_task = progress.add_task("epochs", total=epochs, completed=start_epoch - 1) if progress is not None else None
        tr_feats = tr["features"].to(dev)
        tr_labels = tr["labels"].to(dev).long()
        tr_rgb = tr["rgb"].to(dev) if opts.rgb_skip else None
        n = len(tr_labels)
        stopped_early = False
        for epoch in range(start_epoch, epochs + 1):
            if stale >= opts.patience:
                stopped_early = True
                break
            head.train()
            g = torch.Generator().manual_seed(seed * 100003 + epoch)
            torch.manual_seed(seed * 100003 + epoch)
            perm = torch.randperm(n, generator=g).to(dev)
            total, count = 0.0, 0
            for i in range(0, n, opts.batch_pixels):
                b = perm[i : i + opts.batch_pixels]
                logits = head.forward_pixels(tr_feats[b].float(), tr_rgb[b].float() if tr_rgb is not None else None)
                loss = F.cross_entropy(logits, tr_labels[b], weight=weight, ignore_index=IGNORE)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                total += loss.item() * len(b)
                count += len(b)
            train_loss = total / max(1, count)
            if va is not None:
                val_loss, conf = _evaluate_pixels(head, va, len(cmap), dev, weight, opts.rgb_skip, adj_dev)
            else:
                val_loss, conf = None, _evaluate_pixels(head, tr, len(cmap), dev, weight, opts.rgb_skip, adj_dev)[1]
            sc = scores(conf, cmap.names)
            row = _epoch_row(epoch, train_loss, val_loss, sc)
            history.append(row)
            table.add(row)
            score = sc["miou"] if sc["miou"] is not None else -1.0
            if score > best_score + 1e-6 or best_state is None:
                best_score, best_epoch, stale = score, epoch, 0
                best_state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
            else:
                stale += 1 if va is not None else 0
            write_training_curve(history, out / "training_curve.png", cmap.names, best_epoch=best_epoch,
                                 colors=[c.color for c in cmap.classes])
            if resume.enabled:
                ck = {"head": head.state_dict(), "optim": optim.state_dict(), "history": json.dumps(history),
                      "best_state": best_state, "best_epoch": best_epoch, "best_score": best_score,
                      "stale": stale, "epoch": epoch}
                tmp = resume.checkpoint.with_name(resume.checkpoint.name + ".tmp")
                torch.save(ck, tmp)
                tmp.replace(resume.checkpoint)
            if progress is not None:
                progress.advance(ep_task, 1)
        if stopped_early or (history and history[-1]["epoch"] < epochs):
            console.print(f"early stop: no better validation mIoU for {opts.patience} epochs; best epoch {best_epoch}")
        timings["head_s"] = time.perf_counter() - t2
        head.load_state_dict(best_state)
        if adjust is not None:
            with torch.no_grad():
                head.out.bias += adjust.to(head.out.bias.device)  # fold the prior shift into the head
        head.cpu().eval()
        best_row = next(r for r in history if r["epoch"] == best_epoch)
        timings["total_s"] = time.perf_counter() - t0

        model = SegModel(
            head=head,
            class_map=cmap,
            mpp=float(mpp),
            tile_size=tile,
            overlap=overlap,
            backbone=bb_record,
            features=_features_record(extractor),
            training={
                "seed": seed,
                "epochs": epochs,
                "epochs_run": len(history),
                "best_epoch": best_epoch,
                "best": best_row,
                "history": history,
                "validation": val_mode,
                "train_images": [imgs[i].record.name for i in train_idx],
                "val_images": [imgs[i].record.name for i in val_idx],
                "tiles": len(tiles),
                "val_tiles": len(val_tiles),
                "cache": cache_info,
                "prior": prior_info,
                "options": opts.to_json(),
                "device": dev,
                "timings_s": {k: round(v, 2) for k, v in timings.items()},
                "messages": messages,
            },
        )
        save_model(model, out)
        resume.finish(opts.keep_features)
        return TrainResult(
            model_dir=out, model=model, class_map=cmap, history=history, best_epoch=best_epoch,
            best=best_row, train_images=model.training["train_images"],
            val_images=model.training["val_images"], val_mode=val_mode, n_tiles=len(tiles),
            n_val_tiles=len(val_tiles), cache=cache_info, timings=timings, backbone_label=label,
            resumed=resume.resumed, messages=messages,
        )
    finally:
        for im in imgs:
            if im.slide is not None:
                im.slide.close()


def _features_record(extractor) -> dict[str, Any]:
    t = getattr(extractor, "t", None)
    ts = getattr(extractor, "timesteps", t)
    ts = [int(x) for x in ts] if isinstance(ts, (list, tuple)) else ([int(ts)] if ts is not None else None)
    return {
        "t": ts,
        "blocks": [int(b) for b in getattr(extractor, "blocks", ())],
        "channels": int(extractor.channels),
        "out_stride": int(getattr(extractor, "out_stride", 4)),
        "seed": int(getattr(extractor, "seed", 0)),
    }
