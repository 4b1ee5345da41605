"""BCSS and GlaS in their published layouts, as annotation sources, so runs sit beside the paper's tables.

Each label mask is vectorized into one classed annotation per class (exactly: rasterizing it back on
the same grid gives the mask), so ``train`` and ``evaluate`` use these data sets like any QuPath project.

- **BCSS** (Amgad et al. 2019): ``DIR/rgbs_colorNormalized/*.png`` (or ``DIR/images/``) and
  ``DIR/masks/*.png`` with the same names; 0.25 µm/px unless the name says ``MPP-x``. Label codes are
  merged into the five classes used in the literature: see :data:`BCSS_MERGE`.
- **GlaS** (Warwick-QU, MICCAI 2015): ``DIR/{train,testA,testB}_N.bmp`` with ``..._anno.bmp`` instance
  masks (0 = background, k > 0 = gland k); two classes, Background and Gland, at 0.62 µm/px (20x).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from pdseg_qupath.core.annotations import IGNORE, RGB, Annotation, ClassInfo, ClassMap, ReadReport
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.grid import Window
from pdseg_qupath.sources.base import ImageRecord, WriteReport

BCSS_CODES = {
    0: "outside_roi", 1: "tumor", 2: "stroma", 3: "lymphocytic_infiltrate", 4: "necrosis_or_debris",
    5: "glandular_secretions", 6: "blood", 7: "exclude", 8: "metaplasia_NOS", 9: "fat", 10: "plasma_cells",
    11: "other_immune_infiltrate", 12: "mucoid_material", 13: "normal_acinus_or_duct", 14: "lymphatics",
    15: "undetermined", 16: "nerve", 17: "skin_adnexa", 18: "blood_vessel", 19: "angioinvasion", 20: "dcis",
    21: "other",
}
"""BCSS ground-truth codes (``meta/gtruth_codes.tsv`` of the BCSS repository)."""

BCSS_CLASSES = ClassMap((
    ClassInfo("Tumor", (200, 0, 0)),
    ClassInfo("Stroma", (150, 200, 150)),
    ClassInfo("Inflammatory", (160, 90, 160)),
    ClassInfo("Necrosis", (50, 50, 50)),
    ClassInfo("Other", (255, 200, 0)),
))

BCSS_MERGE: dict[int, int] = {
    **{c: 4 for c in BCSS_CODES},  # everything else -> Other
    0: IGNORE, 7: IGNORE, 15: IGNORE,  # outside ROI, "exclude", "undetermined": not scored
    1: 0, 19: 0, 20: 0,  # tumor, angioinvasion, DCIS -> Tumor
    2: 1,  # stroma
    3: 2, 10: 2, 11: 2,  # lymphocytic infiltrate, plasma cells, other immune infiltrate -> Inflammatory
    4: 3,  # necrosis or debris
}

BCSS_NOTE = (
    "BCSS classes merged as: Tumor = tumor + angioinvasion + dcis; Stroma = stroma; Inflammatory = "
    "lymphocytic_infiltrate + plasma_cells + other_immune_infiltrate; Necrosis = necrosis_or_debris; "
    "Other = every other code; outside_roi (0), exclude (7) and undetermined (15) are ignored."
)

GLAS_CLASSES = ClassMap((ClassInfo("Background", (230, 230, 230)), ClassInfo("Gland", (200, 60, 60))))
GLAS_NOTE = "GlaS masks scored as Background (0) vs Gland (any gland instance) at 0.62 µm/px (20x)."
GLAS_MPP = 0.62
BCSS_MPP = 0.25

DATASETS = ("bcss", "glas")


class MaskDataset:
    """A read-only :class:`~pdseg_qupath.sources.base.AnnotationSource` over image/label-mask pairs."""

    def __init__(self, kind: str, pairs: list[tuple[Path, Path, float]], class_map: ClassMap,
                 lut: np.ndarray, note: str) -> None:
        self.kind, self.class_map, self.note = kind, class_map, note
        self._pairs = {img.name: (img, mask, mpp) for img, mask, mpp in pairs}
        self._lut = lut

    @property
    def mpp(self) -> float:
        """The data set's own pixel size in µm/px (the most common one among its images)."""
        values = [m for _i, _m, m in self._pairs.values()]
        return max(set(values), key=values.count)

    @property
    def notes(self) -> list[str]:
        """What a report must state about this data set (the class merge)."""
        return [self.note]

    def images(self) -> list[ImageRecord]:
        out = []
        for name, (img, _mask, mpp) in sorted(self._pairs.items()):
            with Image.open(img) as im:
                w, h = im.size
            out.append(ImageRecord(name=name, uri=img.resolve().as_uri(), path=img, width=w, height=h, mpp=mpp))
        return out

    def labels(self, image: ImageRecord) -> np.ndarray:
        """The merged label map (class index, 255 = ignored) at the image's own pixels."""
        _img, mask, _ = self._pairs[image.name]
        arr = np.asarray(Image.open(mask))
        if arr.ndim == 3:
            arr = arr[..., 0]
        return self._lut[np.clip(arr.astype(np.int64), 0, len(self._lut) - 1)]

    def read_annotations(self, image: ImageRecord) -> tuple[list[Annotation], ReadReport]:
        from pdseg_qupath.core.raster import vectorize

        labels = self.labels(image)
        geoms = vectorize(labels, self.class_map, Window(0, 0, labels.shape[1], labels.shape[0], 1.0))
        anns = [Annotation(g, classification=name, color=self.class_map.classes[self.class_map.index(name)].color)
                for name, g in geoms.items()]
        return anns, ReadReport(source=str(self._pairs[image.name][1]), read=len(anns))

    def write_predictions(self, image: ImageRecord, annotations: Sequence[Annotation]) -> WriteReport:
        raise PdsegError(f"the {self.kind} data set is read-only; predict with --out DIR to write GeoJSON")

    def class_colors(self) -> dict[str, RGB]:
        return {c.name: c.color for c in self.class_map.classes}

    def close(self) -> None:
        pass


def _lut(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    lut = np.full(size, IGNORE, dtype=np.uint8)
    for code, cls in mapping.items():
        lut[code] = cls
    return lut


def open_bcss(root: str | Path, *, sites: Sequence[str] | None = None, exclude_sites: bool = False) -> MaskDataset:
    """BCSS at ``root``. ``sites`` keeps only regions from those TCGA tissue-source sites (the two
    letters after ``TCGA-``), or drops them with ``exclude_sites`` — how institution splits are made."""
    root = Path(root)
    img_dir = next((root / d for d in ("rgbs_colorNormalized", "images", "rgbs") if (root / d).is_dir()), None)
    mask_dir = root / "masks"
    if img_dir is None or not mask_dir.is_dir():
        raise PdsegError(f"{root}: not the BCSS layout (expected rgbs_colorNormalized/ and masks/ with the same file names)")
    pairs = []
    for mask in sorted(mask_dir.glob("*.png")):
        img = img_dir / mask.name
        if not img.is_file():
            continue
        m = re.match(r"TCGA-([A-Z0-9]{2})-", mask.name)
        if sites is not None and m is not None and ((m.group(1) in set(sites)) == exclude_sites):
            continue
        mpp = re.search(r"MPP-([0-9.]+)", mask.name)
        pairs.append((img, mask, float(mpp.group(1).rstrip(".")) if mpp else BCSS_MPP))
    if not pairs:
        raise PdsegError(f"{root}: no image/mask pairs found (masks/*.png with the same name in {img_dir.name}/)")
    return MaskDataset("bcss", pairs, BCSS_CLASSES, _lut(BCSS_MERGE), BCSS_NOTE)


def open_glas(root: str | Path, *, split: str = "test") -> MaskDataset:
    """GlaS at ``root``: ``split`` is train, testA, testB or test (A and B)."""
    root = Path(root)
    prefixes = {"train": ("train",), "testA": ("testA",), "testB": ("testB",), "test": ("testA", "testB")}
    if split not in prefixes:
        raise PdsegError(f"GlaS split {split!r}: use one of {', '.join(prefixes)}")
    pairs = []
    for prefix in prefixes[split]:
        for img in sorted(root.glob(f"{prefix}_*.bmp")) + sorted(root.glob(f"{prefix}_*.png")):
            if img.stem.endswith("_anno"):
                continue
            mask = img.with_name(f"{img.stem}_anno{img.suffix}")
            if mask.is_file():
                pairs.append((img, mask, GLAS_MPP))
    if not pairs:
        raise PdsegError(f"{root}: no GlaS images for split {split!r} (expected {prefixes[split][0]}_1.bmp with "
                         f"{prefixes[split][0]}_1_anno.bmp beside it)")
    lut = np.ones(65536, dtype=np.uint8)
    lut[0] = 0
    return MaskDataset("glas", pairs, GLAS_CLASSES, lut, GLAS_NOTE)


def open_dataset(kind: str, root: str | Path, **kw) -> MaskDataset:
    """``--dataset bcss|glas DIR``."""
    if kind == "bcss":
        return open_bcss(root, **kw)
    if kind == "glas":
        return open_glas(root, **kw)
    raise PdsegError(f"--dataset {kind!r}: use one of {', '.join(DATASETS)}")
