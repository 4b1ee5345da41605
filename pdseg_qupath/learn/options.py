"""The options that shape training and prediction, each validated once, where it is made.

- :class:`IOConfig`: how a model sees a slide (work resolution, tile size, overlap, feature stride).
  One object, carried by the model, so train, predict and evaluate cut the same tiles.
- :class:`TrainOptions`: everything else a training run depends on (recorded in model.json).
- :class:`PredictOptions`: how one slide is predicted and what is written for it, the same whether the
  result is written back into a project or into a cohort's output folder.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.slide import check_mpp
from pdseg_qupath.learn.augment import AugmentConfig


@dataclass(frozen=True)
class IOConfig:
    """Tiles at ``mpp`` µm/px, ``tile`` px wide, overlapping by ``overlap`` px when predicting.

    ``stride`` is the number of pixels per feature pixel (the VQ-f4 encoder's 4): tile origins of
    training tiles snap to it, so that overlapping tiles see the same position-keyed noise.
    """

    mpp: float
    tile: int
    overlap: int
    stride: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.mpp, bool):
            raise PdsegError(f"--mpp {self.mpp}: the work resolution must be a pixel size in µm/px")
        check_mpp(self.mpp, "--mpp (the work resolution)")
        if self.stride < 1 or self.tile < self.stride or self.tile % self.stride:
            raise PdsegError(f"tile size {self.tile} px must be a positive multiple of the feature stride {self.stride}")
        if not 0 <= self.overlap < self.tile // 2:
            raise PdsegError(f"overlap {self.overlap} must be in [0, {self.tile // 2}) for {self.tile}-px tiles")

    def resolution_problem(self, name: str, slide_mpp: float, width: int, height: int) -> str | None:
        """Why a slide's pixel size looks wrong for this model (a typo in --image-mpp, say), or None.

        Suspicious: an image coarser than the work resolution by more than 2× (it would be upscaled, and a
        512-px PNG at --image-mpp 5 instead of 0.5 becomes hundreds of tiles), or finer by more than 8×.
        """
        ratio = slide_mpp / self.mpp
        if 0.125 <= ratio <= 2.0:
            return None
        step = self.tile - 2 * self.overlap if self.tile > 2 * self.overlap else self.tile
        w, h = width / self.downsample(slide_mpp), height / self.downsample(slide_mpp)
        tiles = max(1, math.ceil(w / step)) * max(1, math.ceil(h / step))
        how = "upscaled" if ratio > 1 else "downscaled"
        return (f"{name}: {slide_mpp:g} µm/px is {ratio:.3g}× the model's {self.mpp:g} µm/px, so the image is {how} "
                f"{max(ratio, 1 / ratio):.3g}× ({width}×{height} px → about {tiles} tiles). If that pixel size is a "
                "typo (check --image-mpp), fix it; a slide really at that resolution needs a model trained near it")

    def downsample(self, slide_mpp: float) -> float:
        """Level-0 pixels per work pixel on a slide of ``slide_mpp`` µm/px."""
        return self.mpp / slide_mpp

    def snap(self, v: int) -> int:
        """``v`` rounded down to the feature stride."""
        return v - v % self.stride


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
    cache_mb: float = 2048.0
    """Upper bound of the feature cache in MB. The context head keeps whole tile views (1.75 MB each for
    ``small``, plus 0.6 MB of texture maps outside this bound): 2048 holds the 512 tiles × 2 views that
    IvyGAP's 8 classes draw; 512, the default until the tenth session, held a quarter of them and scored
    0.024 macro Dice lower there (3 seeds; docs/ACCURACY.md). When the views do not fit, every tile is kept
    once before any augmented copy."""
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
    prior_correction: float = 0.5
    """Strength s of the class-prior correction, 0 to 1. Class-stratified sampling trains the head as if all
    classes were equally common, so it over-calls rare classes. The logits are shifted by
    s × log(annotated share / sampled share) (logit adjustment for label shift): 1 makes predictions follow
    the class proportions of the annotations, 0 treats every class as equally common. Sparse annotations
    rarely hold a class in its true proportion; 0.5 scored higher than 1 on IvyGAP (+0.009 macro Dice, ahead on
    each of 3 seeds), gbm40 +0.001 and EBHI-Seg -0.001 (one seed; docs/ACCURACY.md). ``True``/``False`` mean 1/0."""
    head: str = "context"
    """``context`` (dilated 3x3 blocks at feature resolution plus the RGB tile; trained on whole cached
    feature maps, so ``cache_mb`` bounds the number of tile views) or ``pixel`` (1x1 convolutions: a
    per-pixel classifier, trained on features at sampled pixels; faster). The context head is the
    default because it won on EBHI-Seg glands and gbm40 nuclei for every seed (docs/HEADS.md)."""
    hidden: tuple[int, int] | None = None
    """Widths of the head's two hidden layers: (64, 32) for the pixel head, (32, 32) for the context head
    (its 3x3 blocks run at hidden[0] channels: 32 keeps an epoch a few seconds on a CPU)."""
    dropout: float = 0.1
    rgb_skip: bool = False
    """Give the pixel head the RGB tile beside the features (the context head always has it)."""
    texture: bool | None = None
    """Give the context head the tile's multi-scale colour-texture maps (:mod:`pdseg_qupath.learn.texture`:
    what a classic pixel classifier sees) beside the features, after its context blocks. None: on for the
    context head (IvyGAP +0.045 macro Dice on every seed, gbm40 +0.005, EBHI-Seg -0.004: docs/ACCURACY.md),
    off for the pixel head."""
    t: int | Sequence[int] | str | None = None
    """Diffusion timestep(s) of the features (default: the backbone's; ``"auto"``: chosen by image-wise
    cross-validation, :mod:`pdseg_qupath.learn.autotune`)."""
    blocks: Sequence[int] | str | None = None
    """Up blocks to tap (0 = coarsest). Default: the backbone's (``small``: 1, 2), for both heads (the
    context head did better with 1, 2 than with 0–2: docs/ACCURACY.md). ``"auto"``: chosen by image-wise
    cross-validation."""
    ensemble: int = 3
    """Heads trained on the same features, each early-stopped on different held-out images (and with its
    own seed), that predict together by averaging their class probabilities (:class:`~pdseg_qupath.learn.head.HeadEnsemble`).
    Costs the head's training time per member, a few percent of prediction time per member; 1: one head."""
    encoder: str = "auto"
    """``vq`` (the backbone's VQ encoder), ``fast`` (its distilled fast encoder, 1.7–2× faster features on
    a CPU: :mod:`pdseg_qupath.backbone.fast_encoder`) or ``auto``: fast on a CPU when the backbone has one.
    The choice is recorded in model.json (``features.encoder``) and ``predict`` follows it on any device."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    resume: bool = True
    keep_features: bool = False
    """Keep the feature cache in OUT/.pdseg-train after success: a rerun with other head options
    (epochs, learning rate, ...) then skips feature extraction."""

    def __post_init__(self) -> None:
        if self.head not in ("pixel", "context"):
            raise PdsegError(f"--head {self.head!r}: use pixel or context")
        for name in ("t", "blocks"):
            v = getattr(self, name)
            if isinstance(v, str) and v != "auto":
                raise PdsegError(f"--{name} {v!r}: give whole numbers separated by commas, or auto")
        if self.texture and self.head != "context":
            raise PdsegError("--texture needs the context head (--head context): the maps are made from whole tiles")
        if self.encoder not in ("auto", "vq", "fast"):
            raise PdsegError(f"--encoder {self.encoder!r}: use auto, vq or fast")
        if not isinstance(self.ensemble, int) or isinstance(self.ensemble, bool) or not 1 <= self.ensemble <= 16:
            raise PdsegError(f"--ensemble {self.ensemble!r}: give the number of heads, from 1 to 16")
        if isinstance(self.prior_correction, bool):
            self.prior_correction = float(self.prior_correction)
        _finite(self, cache_mb=(0, None), lr=(0, None), weight_decay=(0, None), dropout=(0, 1), val_fraction=(0, 1),
                prior_correction=(0, 1))
        if self.class_weights is not None and not isinstance(self.class_weights, str):
            w = list(self.class_weights)
            if not all(_is_number(v) and math.isfinite(v) and v >= 0 for v in w) or not any(v > 0 for v in w):
                raise PdsegError(f"--class-weights {','.join(map(str, w))}: each weight must be a finite number "
                                 ">= 0, and not all 0")

    @property
    def texture_maps(self) -> bool:
        """Whether the head gets texture maps: ``texture`` as given, else on for the context head."""
        return self.texture if self.texture is not None else self.head == "context"

    def io(self, mpp: float, backbone_tile: int, stride: int) -> IOConfig:
        """The tiles of this run: the backbone's tile size unless set, a quarter tile of overlap unless set."""
        tile = int(self.tile_size or backbone_tile)
        overlap = tile // 4 if self.overlap is None else int(self.overlap)
        return IOConfig(float(mpp), tile, overlap, int(stride))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden) if self.hidden is not None else None
        if d["blocks"] is not None and not isinstance(d["blocks"], str):
            d["blocks"] = list(d["blocks"])
        if isinstance(d["t"], (list, tuple)):
            d["t"] = list(d["t"])
        if isinstance(d["class_weights"], tuple):
            d["class_weights"] = list(d["class_weights"])
        return d


@dataclass
class PredictOptions:
    """How one slide is predicted and which files are written for it (the same in every ``predict`` form)."""

    batch_size: int = 8
    tissue_only: bool = True
    tissue_mpp: float | None = None
    """Resolution of the tissue mask; default: fine enough for ~2048 px on the slide's long side, at
    least 2 µm/px (small slides get a detailed outline, whole slides a cheap thumbnail)."""
    image_mpp: float | None = None
    """µm/px of images that record none (PNG, JPEG); never guessed."""
    simplify_um: float = 0.5
    """Polygon simplification tolerance in µm (0 keeps the pixel staircase). The default, 0.5 µm, is one work
    pixel of a model at the default 0.5 µm/px; for a model at 1 µm/px it is half a work pixel."""
    min_area_um2: float = 0.0
    """Predicted pieces smaller than this, in µm², are dropped."""
    overlay: bool = False
    """Write ``<image>.overlay.png`` (classes over the tissue, with a legend) beside the GeoJSON."""
    classmap: bool = False
    """Write ``<image>.classes.png`` (pixel value = class index, 255 = no prediction)."""
    overlay_max: int = 2048
    grid_offset: tuple[int, int] = (0, 0)
    io_threads: int = 2
    """Tile-reading threads that run ahead of the backbone (0: read, infer and stitch in one thread)."""
    prefetch: int = 3
    """Batches in flight between the stages (bounds host memory)."""
    review: int = 0
    """Write the N least certain regions as ranked ``Review*`` annotations, and the uncertainty map as
    detections (0: neither)."""
    review_size_um: float = 128.0
    """Side of a review region in µm (the uncertainty map's cells are a quarter of it)."""
    keep_backups: int = 10
    """After a write-back into a QuPath project in which no image failed to write, keep the newest N of pdseg's
    backup folders (``<project>/pdseg/backups/<time>``) and, for each image, the newest one holding its data;
    delete older ones (0: keep all)."""

    def __post_init__(self) -> None:
        if self.image_mpp is not None:
            check_mpp(self.image_mpp, "--image-mpp")
        if self.tissue_mpp is not None:
            check_mpp(self.tissue_mpp, "tissue_mpp")
        _finite(self, simplify_um=(0, None), min_area_um2=(0, None))
        if self.batch_size < 1:
            raise PdsegError(f"--batch-size {self.batch_size}: must be at least 1")
        if not isinstance(self.keep_backups, int) or isinstance(self.keep_backups, bool) or self.keep_backups < 0:
            raise PdsegError(f"--keep-backups {self.keep_backups!r}: give a whole number of backup folders to keep, "
                             "or 0 to keep all")

    @property
    def canvas(self) -> bool:
        """Whether a downsampled label map is kept while predicting (for an overlay or a class map)."""
        return self.overlay or self.classmap


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_FLAGS = {"simplify_um": "--simplify (µm)", "min_area_um2": "--min-area (µm²)",
          "prior_correction": "--prior-correction"}
"""Options whose command-line flag is not their field name."""


def _finite(opts: Any, **ranges: tuple[float | None, float | None]) -> None:
    """Each named option a finite number in [low, high] (``None``: unbounded); else one clear line."""
    for name, (low, high) in ranges.items():
        v = getattr(opts, name)
        if not _is_number(v) or not math.isfinite(v) or (low is not None and v < low) or (
                high is not None and v > high):
            bounds = f">= {low:g}" if high is None else f"from {low:g} to {high:g}"
            raise PdsegError(f"{_FLAGS.get(name, name.replace('_', '-'))} {v!r}: expected a finite number {bounds}")
