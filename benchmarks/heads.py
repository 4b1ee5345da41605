"""Pixel head against context head on EBHI-Seg (8 → 120) and gbm40 (01–30 → 31–40), several seeds (prints JSON).

Each run is the user's loop through the Python API: ``train`` on the training folder, ``evaluate`` on the
test folder (overlapping tiles, stitching, Dice on annotated pixels), exactly as the CLI does. Only the
backbone pass is shared between runs: every tile the backbone sees is keyed by its pixels, its work-grid
origin, t and blocks, and its features are kept on disk (fp16) under ``--feature-cache``, so the 120
EBHI test images are encoded once for all heads and seeds, and the training tiles of a seed once for
both heads. Blocks 0, 1, 2 are extracted together and sliced (the UNet pass is the same).

    python benchmarks/heads.py --ebhi DIR --gbm40 DIR --seeds 0 1 --out /tmp/heads --json benchmarks/results/heads.json

The data sets are research-only and never shipped; pass their folders on the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

HEADS = {
    # name: (head, blocks or None for the backbone's default, t or None for the backbone's default)
    "pixel": ("pixel", None, None),
    "context": ("context", (0, 1, 2), None),
    "context-auto": ("context", "auto", "auto"),  # train --t auto --blocks auto
}


class CachedExtractor:
    """An ``LDMFeatures`` stand-in: the same ``extract`` results, read from disk when seen before."""

    def __init__(self, inner, blocks, folder: Path) -> None:
        self.inner, self.folder = inner, folder
        folder.mkdir(parents=True, exist_ok=True)
        up = inner.backbone.config.up_block_channels()
        offsets = np.cumsum([0] + [up[b] for b in inner.blocks])
        want = tuple(blocks) if blocks is not None else inner.backbone.config.default_blocks
        at = [inner.blocks.index(b) for b in want]
        per_t = int(offsets[-1])  # the inner pass is timestep-major: each t's blocks in turn
        self.slices = [slice(k * per_t + int(offsets[i]), k * per_t + int(offsets[i + 1]))
                       for k in range(len(inner.t)) for i in at]
        self.blocks, self.t = want, inner.t
        self.channels = len(inner.t) * sum(up[b] for b in want)
        self.out_stride, self.seed, self.backbone = inner.out_stride, inner.seed, inner.backbone
        self.precision, self.encoder = inner.precision, inner.encoder  # what train records and prints
        self.hits = self.misses = 0

    def summary(self) -> str:
        return self.inner.summary() + " (cached)"

    def _key(self, tile: np.ndarray, origin) -> Path:
        h = hashlib.sha1(np.ascontiguousarray(tile).tobytes())
        h.update(f"{tuple(int(v) for v in origin)}".encode())
        return self.folder / f"{h.hexdigest()}.safetensors"

    def extract(self, tiles, origins=None, **kw):
        arr = tiles.cpu().numpy() if isinstance(tiles, torch.Tensor) else np.asarray(tiles)
        origins = list(origins) if origins is not None else [(0, 0)] * len(arr)
        keys = [self._key(a, o) for a, o in zip(arr, origins)]
        out: list[torch.Tensor | None] = [None] * len(arr)
        todo = []
        for i, k in enumerate(keys):
            if k.is_file():
                out[i] = load_file(str(k))["f"]
                self.hits += 1
            else:
                todo.append(i)
        if todo:
            with torch.no_grad():
                f = self.inner.extract(arr[todo], origins=[origins[i] for i in todo]).float().cpu()
            for j, i in enumerate(todo):
                out[i] = f[j].to(torch.float16)
                tmp = keys[i].with_name(f"{keys[i].stem}.{os.getpid()}.tmp")  # processes may share the cache
                save_file({"f": out[i].contiguous()}, str(tmp))
                os.replace(tmp, keys[i])
            self.misses += len(todo)
        full = torch.stack(out).float()  # type: ignore[arg-type]
        return torch.cat([full[:, s] for s in self.slices], dim=1) if len(self.slices) > 1 else full[:, self.slices[0]]


def install_cache(root: Path) -> list[CachedExtractor]:
    """Route train's and predict's backbone through :class:`CachedExtractor` (blocks 0-2, the requested t)."""
    import pdseg_qupath.learn.predictor as predictor
    import pdseg_qupath.tasks.train as train_task

    real = predictor.load_extractor
    made: list[CachedExtractor] = []

    def load(spec, device, t=None, blocks=None, seed=0, **kw):
        bb, inner = real(spec, device, t=t, blocks=(0, 1, 2), seed=seed, **kw)
        sha = bb.sha256[:8] if bb.sha256 else "random"
        prec = "" if inner.precision == "fp32" else f"-{inner.precision}"  # fp32 keeps the old folder names
        enc = "" if inner.encoder == "vq" else f"-{inner.encoder}"  # so do VQ-encoder features
        tag = f"{Path(str(spec)).name}-{sha}-t{'_'.join(map(str, inner.t))}-s{seed}{prec}{enc}"
        ex = CachedExtractor(inner, blocks, root / tag)
        made.append(ex)
        return bb, ex

    predictor.load_extractor = load
    train_task.load_extractor = load
    return made


def link_split(src: Path, dst: Path, names: list[str]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        for f in (src / f"{n}.png", src / f"{n}.geojson"):
            if not (dst / f.name).exists():
                os.symlink(f.resolve(), dst / f.name)
    return dst


def table(runs: list[dict]) -> str:
    """A markdown table of the runs: per data set and head, each seed's score, mean and spread."""
    rows = ["| data set (score) | head | t | blocks | per seed | mean | spread (max − min) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r["dataset"], r["head"]) for r in runs})
    for ds, head in keys:
        rs = sorted((r for r in runs if (r["dataset"], r["head"]) == (ds, head)), key=lambda r: r["seed"])
        sc = [r["score"] for r in rs]
        per = ", ".join(f"{r['score']:.3f} (s{r['seed']})" for r in rs)
        rows.append(f"| {ds} ({rs[0]['score_name']}) | {head} | {rs[0]['t']} | {rs[0]['blocks']} | {per} | "
                    f"{np.mean(sc):.3f} | {max(sc) - min(sc):.3f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ebhi", type=Path, help="ebhi-seg folder (train/ and test/)")
    ap.add_argument("--gbm40", type=Path, help="gbm40 folder (NN.png + NN.geojson)")
    ap.add_argument("--heads", nargs="+", default=list(HEADS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--backbone", default="small")
    ap.add_argument("--out", type=Path, default=Path("/tmp/pdseg-heads"))
    ap.add_argument("--feature-cache", type=Path, default=Path("/tmp/pdseg-featcache"))
    ap.add_argument("--json", type=Path, default=None, help="append each run's result to this JSON file")
    ap.add_argument("--table", nargs="*", type=Path, help="only print the markdown table of these JSON files")
    args = ap.parse_args()
    if args.table:
        print(table([r for f in args.table for r in json.loads(f.read_text())["runs"]]))
        return

    from rich.console import Console

    from pdseg_qupath.learn.options import TrainOptions
    from pdseg_qupath.sources.inputs import open_source
    from pdseg_qupath.tasks.evaluate import evaluate
    from pdseg_qupath.tasks.train import train
    from pdseg_qupath.ui import ConsoleEvents

    made = install_cache(args.feature_cache)
    events = ConsoleEvents(Console(stderr=True), plain=True)
    sets = []
    if args.ebhi:
        sets.append(("ebhi-seg", args.ebhi / "train", args.ebhi / "test", 1.2, None))
    if args.gbm40:
        split = args.out / "gbm40-split"
        tr = link_split(args.gbm40, split / "train", [f"{i:02d}" for i in range(1, 31)])
        te = link_split(args.gbm40, split / "test", [f"{i:02d}" for i in range(31, 41)])
        sets.append(("gbm40", tr, te, 0.5, "Nucleus"))
    results = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {"runs": []}
    for seed in args.seeds:
        for name, train_dir, test_dir, mpp, cls in sets:
            for head in args.heads:
                kind, blocks, t = HEADS[head]
                done = [r for r in results["runs"] if (r["dataset"], r["head"], r["seed"], r["backbone"]) ==
                        (name, head, seed, args.backbone)]
                if done:
                    continue
                run = args.out / f"{name}-{head}-s{seed}"
                opts = TrainOptions(head=kind, t=t, blocks=list(blocks) if isinstance(blocks, tuple) else blocks)
                t0 = time.perf_counter()
                res = train(open_source(train_dir), run / "model", backbone=args.backbone, mpp=mpp, image_mpp=mpp,
                            device="cpu", seed=seed, options=opts, events=events)
                t1 = time.perf_counter()
                m = evaluate(open_source(test_dir), run / "model", run / "report", image_mpp=mpp, device="cpu",
                             overlays=False, events=events)
                t2 = time.perf_counter()
                row = {
                    "dataset": name, "head": head, "seed": seed, "backbone": args.backbone,
                    "t": res.model.features["t"], "blocks": res.model.features["blocks"], "mpp": mpp,
                    "macro_dice": m["macro_dice"], "miou": m["miou"],
                    "per_class_dice": {k: v["dice"] for k, v in m["per_class"].items()},
                    "score": m["per_class"][cls]["dice"] if cls else m["macro_dice"],
                    "score_name": f"{cls} Dice" if cls else "macro Dice",
                    "val_miou": res.best["miou"], "best_epoch": res.best_epoch, "epochs_run": len(res.history),
                    "train_images": res.train_images, "val_images": res.val_images,
                    "train_s": round(t1 - t0, 1), "evaluate_s": round(t2 - t1, 1),
                }
                auto = res.model.training.get("auto")
                if auto:
                    row["auto"] = {k: auto[k] for k in ("choice", "estimate", "seconds", "candidates")}
                print(json.dumps(row), flush=True)
                results["runs"].append(row)
                if args.json:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({"feature_cache_hits": sum(e.hits for e in made),
                      "feature_cache_misses": sum(e.misses for e in made)}))


if __name__ == "__main__":
    main()
