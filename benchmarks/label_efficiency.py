"""Label efficiency on gbm40: pretrained ``small`` vs the same architecture with random weights vs raw pixels.

Not a test; prints JSON and writes a PNG. Protocol (the loop issue's split): heads are trained on 1, 3,
10 or 30 of tiles 01–30 and scored on all of tiles 31–40 (Nucleus Dice over all test pixels, as
``evaluate`` pools it). For every feature kind the SAME head (``pdseg_qupath.learn.head.FCNHead``, hidden
(64, 32), dropout 0.1, pinned here), the same labelled pixels and the same optimisation budget are used; only the features differ:

- ``small``: the shipped pretrained backbone (or ``--backbone DIR``), default t and blocks;
- ``random:small``: the same architecture, seeded random weights;
- ``raw``: the tile's RGB folded 4x4 into 48 channels at stride 4 (what a head sees with no backbone).

Features of all 40 tiles are extracted once per kind (512 px tiles at 0.5 µm/px, native for gbm40), then
each (kind, n tiles, seed) trains a head on pixels sampled from the chosen tiles. gbm40 is research-only
and never shipped or pretrained on; pass its folder:

    python benchmarks/label_efficiency.py /path/to/gbm40 --out docs/img
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLASSES = ("Background", "Nucleus")
NS = (1, 3, 10, 30)
HIDDEN = (64, 32)  # the product's default head (pdseg_qupath.learn.head), pinned so results stay comparable


def load_gbm40(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(40, 512, 512, 3) uint8 tiles and (40, 512, 512) labels (0 background, 1 nucleus, 255 none)."""
    from pdseg_qupath.core.annotations import ClassInfo, ClassMap
    from pdseg_qupath.core.grid import Window
    from pdseg_qupath.core.raster import AnnotationIndex
    from pdseg_qupath.core.slide import open_slide
    from pdseg_qupath.sources.qupath.geojson import read_geojson

    cmap = ClassMap(tuple(ClassInfo(n, (0, 0, 0)) for n in CLASSES))
    tiles, labels = [], []
    for i in range(1, 41):
        with open_slide(folder / f"{i:02d}.png", fallback_mpp=0.5) as s:
            w = Window(0, 0, s.width, s.height)
            tiles.append(s.read(w))
        anns = read_geojson(folder / f"{i:02d}.geojson")[0]
        labels.append(AnnotationIndex(anns, cmap).rasterize(w))
    return np.stack(tiles), np.stack(labels)


class RawPixels:
    """4x4 space-to-depth of the RGB tile: 48 channels at stride 4, the same grid as LDM features."""

    channels, out_stride = 48, 4

    def extract(self, tiles: np.ndarray, origins=None) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return F.pixel_unshuffle(x, 4)


def features_for(kind: str, backbone: str, tiles: np.ndarray, taps: dict | None = None) -> tuple[torch.Tensor, dict]:
    """``taps`` (t, blocks) of the pretrained backbone are reused for random weights: same taps."""
    if kind == "raw":
        ex, info = RawPixels(), {"label": "raw pixels (4x4 folded RGB)"}
    else:
        from pdseg_qupath.backbone.features import LDMFeatures
        from pdseg_qupath.backbone.model import describe
        from pdseg_qupath.backbone.spec import load_backbone
        bb = load_backbone(backbone if kind == "pretrained" else f"random:{load_backbone(backbone).config.name}")
        ex = LDMFeatures(bb, batch_size=2, **(taps or {}))
        info = {"label": describe(bb), "t": list(ex.t), "blocks": list(ex.blocks)}
    t0 = time.perf_counter()
    feats = torch.cat([ex.extract(tiles[i:i + 2], origins=np.zeros((len(tiles[i:i + 2]), 2), int)).half()
                       for i in range(0, len(tiles), 2)])
    info.update(channels=int(feats.shape[1]), extract_s=round(time.perf_counter() - t0, 1))
    return feats, info


def sample_pixels(labels: np.ndarray, idx: list[int], per_tile: int, rng: np.random.Generator):
    """Up to ``per_tile`` labelled pixels per tile, half per class where possible (stratified)."""
    out = []
    for i in idx:
        for k in range(len(CLASSES)):
            ys, xs = np.nonzero(labels[i] == k)
            n = min(len(ys), per_tile // len(CLASSES))
            pick = rng.choice(len(ys), size=n, replace=False)
            out.append(np.stack([np.full(n, i), ys[pick], xs[pick], np.full(n, k)], 1))
    return np.concatenate(out)


def train_head(feats: torch.Tensor, labels: np.ndarray, idx: list[int], seed: int, *, per_tile: int,
               iters: int, batch: int):
    from pdseg_qupath.learn.head import FCNHead, HeadConfig, sample_features

    rng = np.random.default_rng(seed)
    px = sample_pixels(labels, idx, per_tile, rng)
    f = torch.cat([sample_features(feats[i], torch.from_numpy(px[px[:, 0] == i, 1]),
                                   torch.from_numpy(px[px[:, 0] == i, 2]), 4) for i in idx])
    y = torch.cat([torch.from_numpy(px[px[:, 0] == i, 3]) for i in idx]).long()
    torch.manual_seed(seed)
    head = FCNHead(HeadConfig(int(feats.shape[1]), len(CLASSES), hidden=HIDDEN, dropout=0.1))
    head.set_normalization(f.mean(0), f.std(0))
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(iters):
        b = torch.randint(0, len(y), (batch,), generator=g)
        loss = F.cross_entropy(head.forward_pixels(f[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


@torch.no_grad()
def nucleus_dice(head, feats: torch.Tensor, labels: np.ndarray, test: range) -> float:
    tp = fp = fn = 0
    for i in test:
        pred = head(feats[i:i + 1].float()).argmax(1)[0].numpy()
        t = labels[i]
        valid = t != 255
        tp += int(((pred == 1) & (t == 1) & valid).sum())
        fp += int(((pred == 1) & (t == 0) & valid).sum())
        fn += int(((pred == 0) & (t == 1) & valid).sum())
    return 2 * tp / max(1, 2 * tp + fp + fn)


@torch.no_grad()
def gbm40_psnr(backbone: str, tiles: np.ndarray) -> float:
    """Cross-domain reconstruction quality of the autoencoder (gbm40 is never trained on)."""
    from pdseg_qupath.backbone.spec import load_backbone
    from pdseg_qupath.learn.pretrain import psnr

    crops = tiles[:, :256, :256]
    return psnr(load_backbone(backbone).vq, crops)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    for kind, color in (("pretrained", "C0"), ("random", "C1"), ("raw", "C2")):
        rows = results["curve"][kind]
        ns = sorted(int(n) for n in rows)
        m = [np.mean(rows[str(n)]) for n in ns]
        s = [np.std(rows[str(n)]) for n in ns]
        ax.errorbar(ns, m, yerr=s, marker="o", capsize=3, color=color, label=results["labels"][kind])
    ax.set_xscale("log")
    ax.set_xticks(list(NS), [str(n) for n in NS])
    ax.set_xlabel("labelled training tiles (of gbm40 01–30)")
    ax.set_ylabel("Nucleus Dice on tiles 31–40")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    ax.set_title("Label efficiency, same FCN head and budget")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gbm40", type=Path)
    ap.add_argument("--backbone", default="small", help="the pretrained backbone (default: shipped small)")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--per-tile", type=int, default=4096, help="labelled pixels sampled per training tile")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--batch", type=int, default=2048)
    args = ap.parse_args()
    t0 = time.perf_counter()
    tiles, labels = load_gbm40(args.gbm40)
    res: dict = {"protocol": {"train_pool": "01-30", "test": "31-40", "mpp": 0.5, "tile_px": 512,
                              "head": f"FCNHead hidden {HIDDEN}, dropout 0.1, AdamW 2e-3",
                              "per_tile_pixels": args.per_tile, "iters": args.iters, "batch": args.batch,
                              "seeds": args.seeds, "n_tiles": list(NS)},
                 "labels": {}, "features": {}, "curve": {}}
    for kind in ("pretrained", "random", "raw"):
        taps = {"t": res["features"]["pretrained"]["t"], "blocks": res["features"]["pretrained"]["blocks"]} \
            if kind == "random" else None
        feats, info = features_for(kind, args.backbone, tiles, taps)
        res["labels"][kind] = info["label"]
        res["features"][kind] = info
        res["curve"][kind] = {}
        for n in NS:
            scores = []
            for seed in range(args.seeds if n < 30 else min(args.seeds, 3)):
                idx = sorted(np.random.default_rng([n, seed]).choice(30, size=n, replace=False).tolist())
                head = train_head(feats, labels, idx, seed, per_tile=args.per_tile, iters=args.iters,
                                  batch=args.batch)
                scores.append(round(nucleus_dice(head, feats, labels, range(30, 40)), 4))
            res["curve"][kind][str(n)] = scores
            print(kind, n, scores, flush=True)
        del feats
    res["gbm40_psnr_db"] = round(gbm40_psnr(args.backbone, tiles), 2)
    res["summary"] = {k: {n: round(float(np.mean(v)), 4) for n, v in res["curve"][k].items()}
                      for k in res["curve"]}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["machine"] = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    plot(res, args.out / "label_efficiency.png")
    (args.out / "label_efficiency.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res["summary"], indent=2))


if __name__ == "__main__":
    main()
