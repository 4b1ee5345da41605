"""Prediction cost of two trained models side by side: tiles per second through features and head.

Meant for two models that differ in the head only (e.g. ``train --texture`` against ``--no-texture`` on
the same data): both run `Predictor.logits` on the same random H&E-coloured tiles, alternating model A and
model B in every round so that a busy machine slows both alike. Prints JSON: median tiles/s of each, the
ratio B/A, and the head-only time per tile (features computed once and reused).

    python benchmarks/head_cost.py MODEL_A MODEL_B [--tiles 16] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--tiles", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from pdseg_qupath.learn.modelio import load_model
    from pdseg_qupath.learn.predictor import Predictor

    preds = {k: Predictor(load_model(p), device="cpu") for k, p in (("a", args.a), ("b", args.b))}
    size = preds["a"].model.io.tile
    rng = np.random.default_rng(0)
    tiles = np.clip(rng.normal((200, 130, 190), 30, (args.tiles, size, size, 3)), 0, 255).astype(np.uint8)
    origins = [(i * size, 0) for i in range(args.tiles)]
    for p in preds.values():  # warm-up
        p.logits(tiles[:2], origins[:2])
    full: dict[str, list[float]] = {"a": [], "b": []}
    head: dict[str, list[float]] = {"a": [], "b": []}
    x = torch.from_numpy(tiles)
    feats = preds["a"].extractor.extract(x, origins=origins).float()
    rgb = x.permute(0, 3, 1, 2).float()
    for _ in range(args.rounds):
        for k, p in preds.items():
            t = time.perf_counter()
            p.logits(tiles, origins)
            full[k].append(args.tiles / (time.perf_counter() - t))
            t = time.perf_counter()
            with torch.no_grad():
                for j in range(args.tiles):
                    p.head(feats[j : j + 1], rgb[j : j + 1])
            head[k].append((time.perf_counter() - t) / args.tiles)
    med = {k: statistics.median(v) for k, v in full.items()}
    print(json.dumps({
        "models": {"a": str(args.a), "b": str(args.b)},
        "texture": {k: bool(p.model.head.config.texture) for k, p in preds.items()},
        "tiles_per_s": {k: round(v, 2) for k, v in med.items()},
        "ratio_b_over_a": round(med["b"] / med["a"], 3),
        "head_ms_per_tile": {k: round(1000 * statistics.median(v), 1) for k, v in head.items()},
        "tiles": args.tiles, "tile_px": size, "rounds": args.rounds, "threads": args.threads,
    }, indent=1))


if __name__ == "__main__":
    main()
