"""Prepare the unlabelled EBHI-Seg pool for ``pdseg-qupath pretrain --from small`` (in-domain fine-tuning).

Not a test and not part of the package: it writes H&E images (never label maps) to a folder OUTSIDE the
repository, default ``/work/data/ebhi-pool``, named like ``shared/data/ebhi-seg`` (``<Category>_<name>.png``,
spaces in the category replaced by ``-``), plus ``pool.json`` (what was kept, what was left out and why).

**Source.** The public GitHub repository ``emhaihsan/EBHI-Segmentation``, folder ``EBHI-SEG``: the authors'
release of EBHI-Seg (Shi et al., "EBHI-Seg: A novel enteroscope biopsy histopathological hematoxylin and eosin
image dataset for image segmentation tasks", Frontiers in Medicine 2023), 2,228 images of 224×224 px at 400×
in six categories (Normal 76, Polyp 474, Low-grade IN 639, High-grade IN 186, Serrated adenoma 58,
Adenocarcinoma 795), each with a label map (not used here). About 1.2 µm/px (not published; estimated).

**Licence.** None: the repository has no licence file; the authors released the data publicly for research.
Use it for research and testing only; never ship or commit any of these images.

**What is left out** (so that no test image, and no tissue of a test patient, is ever seen in pretraining),
each image counted once, under the first reason that applies:

1. ``test image``: one of the 120 test images of ``shared/data/ebhi-seg`` (same category and file name);
2. ``train image``: one of its 8 training images (they are the labelled set, not the pool);
3. ``test pixels``: the same decoded pixels as a test image under another name (a safeguard);
4. ``test case``: the same case id as a test image (``GT2012508-3`` in ``GT2012508-3-400-001``; compared
   without regard to letter case, since the release spells ``GTxc``/``GTXC`` both ways);
5. ``test patient``: the same specimen number as a test image (``GT2012508`` in ``GT2012508-3``), i.e. another
   section of a test patient's tissue (``--case-only`` keeps these).

Counts from the stored snapshot (commit 211f175): 2,228 images → 120 test images, 8 training images,
0 more with test pixels, 425 of a test case, 257 more of a test patient (another section): 1,418 images in the
pool (1,675 with ``--case-only``).

    python benchmarks/prepare_ebhi_pool.py --repo /path/to/EBHI-Segmentation/.git   # or a checkout
    pdseg-qupath pretrain /work/data/ebhi-pool --from small --out /work/data/small-ebhi \\
        --mpp 1.2 --image-mpp 1.2 --steps-ae 0 --steps-unet N
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

FOLDER = "EBHI-SEG"
MIRROR = Path("/work/.mirror/emhaihsan+EBHI-Segmentation/repo")
REASONS = ("test image", "train image", "test pixels", "test case", "test patient")
_NAME = re.compile(r"^(?P<case>(?P<patient>[A-Za-z]+\d+)-\d+)-\d+-\d+\.png$")


def case_id(name: str) -> str:
    """``GT2012508-3`` of ``GT2012508-3-400-001.png`` (upper case)."""
    m = _NAME.match(name)
    if not m:
        sys.exit(f"{name}: not an EBHI-Seg file name (<case>-<section>-<magnification>-<number>.png)")
    return m["case"].upper()


def patient_id(name: str) -> str:
    """``GT2012508`` of ``GT2012508-3-400-001.png`` (upper case): the specimen, across its sections."""
    return _NAME.match(name)["patient"].upper()  # type: ignore[index]


def pool_name(category: str, name: str) -> str:
    """The name ``shared/data/ebhi-seg`` gives an image: ``High-grade-IN_GTXC2110585-1-400-001.png``."""
    return f"{category.replace(' ', '-')}_{name}"


def pixel_hash(png: bytes) -> str:
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return hashlib.sha256(a.tobytes() + str(a.shape).encode()).hexdigest()


class Repo:
    """Read-only access to a git directory (bare or a checkout's ``.git``) at one revision."""

    def __init__(self, git_dir: Path, rev: str) -> None:
        self.git = ["git", "--git-dir", str(git_dir)]
        self.rev = subprocess.check_output([*self.git, "rev-parse", rev], text=True).strip()

    def images(self) -> list[tuple[str, str]]:
        """(category, file name) of every H&E image under ``EBHI-SEG/<category>/image/``."""
        out = subprocess.check_output([*self.git, "ls-tree", "-r", "--name-only", self.rev, FOLDER], text=True)
        found = []
        for path in out.splitlines():
            parts = path.split("/")
            if len(parts) == 4 and parts[2] == "image" and parts[3].endswith(".png"):
                found.append((parts[1], parts[3]))
        return sorted(found)

    def read(self, category: str, name: str) -> bytes:
        return subprocess.check_output([*self.git, "show", f"{self.rev}:{FOLDER}/{category}/image/{name}"])


def split_names(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.glob("*.png"))
    if not names:
        sys.exit(f"{folder}: no .png images; pass --ebhi, the folder with train/ and test/")
    return names


def plan(images: list[tuple[str, str]], test: list[str], train: list[str], test_hashes: set[str],
         read, case_only: bool) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """Which images go into the pool, and which are left out under which reason."""
    test_set, train_set = set(test), set(train)
    strip = [n.split("_", 1)[1] for n in test]
    test_cases = {case_id(n) for n in strip}
    test_patients = {patient_id(n) for n in strip}
    keep: list[tuple[str, str]] = []
    left: dict[str, list[str]] = {r: [] for r in REASONS}
    for cat, name in images:
        full = pool_name(cat, name)
        if full in test_set:
            left["test image"].append(full)
        elif full in train_set:
            left["train image"].append(full)
        elif pixel_hash(read(cat, name)) in test_hashes:
            left["test pixels"].append(full)
        elif case_id(name) in test_cases:
            left["test case"].append(full)
        elif not case_only and patient_id(name) in test_patients:
            left["test patient"].append(full)
        else:
            keep.append((cat, name))
    return keep, left


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest", type=Path, nargs="?", default=Path("/work/data/ebhi-pool"),
                    help="folder to write (outside the repository)")
    ap.add_argument("--repo", type=Path, default=MIRROR, help="git directory of emhaihsan/EBHI-Segmentation")
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--ebhi", type=Path, default=Path("/work/shared/data/ebhi-seg"),
                    help="the development set whose train/ and test/ images are left out")
    ap.add_argument("--case-only", action="store_true",
                    help="leave out a test image's case id only, not the other sections of its patient")
    args = ap.parse_args()
    if (Path(__file__).resolve().parent.parent in args.dest.resolve().parents):
        sys.exit(f"{args.dest}: inside the repository; the images must never be committed")
    if args.dest.exists() and any(args.dest.iterdir()):
        sys.exit(f"{args.dest}: exists and is not empty; remove it or choose another folder")

    repo = Repo(args.repo, args.rev)
    images = repo.images()
    if not images:
        sys.exit(f"{args.repo}: no {FOLDER}/<category>/image/*.png at {repo.rev}")
    test, train = split_names(args.ebhi / "test"), split_names(args.ebhi / "train")
    test_hashes = {pixel_hash((args.ebhi / "test" / n).read_bytes()) for n in test}
    keep, left = plan(images, test, train, test_hashes, repo.read, args.case_only)
    missing = sorted(set(test) - set(left["test image"]))
    if missing:  # the split must come from this release; otherwise name matching proves nothing
        sys.exit(f"{len(missing)} test image(s) not found in {args.repo} (e.g. {missing[0]}); wrong repository?")

    args.dest.mkdir(parents=True, exist_ok=True)
    for cat, name in keep:
        (args.dest / pool_name(cat, name)).write_bytes(repo.read(cat, name))
    counts = {"images_in_release": len(images), "pool": len(keep),
              "left_out": {r: len(v) for r, v in left.items()},
              "pool_per_category": dict(sorted(Counter(c for c, _ in keep).items())),
              "release_per_category": dict(sorted(Counter(c for c, _ in images).items()))}
    record = {"source": "github.com/emhaihsan/EBHI-Segmentation, folder EBHI-SEG", "commit": repo.rev,
              "licence": "none given (research use); never ship or commit these images",
              "mpp_estimate": 1.2, "case_only": args.case_only, "dev_set": str(args.ebhi), **counts,
              "left_out_names": left}
    (args.dest / "pool.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(counts, indent=1))
    print(f"wrote {len(keep)} images to {args.dest}")


if __name__ == "__main__":
    main()
