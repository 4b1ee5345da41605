"""Backbone feature-extraction benchmark: runs bench_features over a list of settings, writes JSON.

    python benchmarks/bench_backbone.py --device cpu --out results.json                  # CPU set
    python benchmarks/bench_backbone.py --device cuda --out results.json --gpu           # GPU set

Each setting runs in this process one after another; the eager fp32 reference is recomputed per
setting on the same device, so every row carries its own accuracy figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback

import torch

from pdseg_qupath.backbone.bench import bench_features

CPU_SETS = [
    dict(spec="random:small", batch_size=4, steps=3),
    dict(spec="random:small", batch_size=4, steps=3, compile=True),
    dict(spec="random:base", batch_size=4, steps=2),
    dict(spec="random:pathsegdiff-brca-20x", batch_size=1, steps=1, ref_tiles=1),
]

GPU_BATCH = 128
GPU_SETS = [
    # the reference: eager diffusers-equivalent walk, bf16 autocast, batch 128
    dict(spec="random:pathsegdiff-brca-20x", batch_size=GPU_BATCH, steps=10, blocks=[0, 1, 2, 3]),
    dict(spec="random:pathsegdiff-brca-20x", batch_size=GPU_BATCH, steps=10),  # default taps: stop after block 2
    dict(spec="random:pathsegdiff-brca-20x", batch_size=GPU_BATCH, steps=20, compile="default", warmup_steps=3),
    dict(spec="random:pathsegdiff-brca-20x", batch_size=GPU_BATCH, steps=20, compile="default",
         channels_last=True, warmup_steps=3),
    dict(spec="random:pathsegdiff-brca-20x", batch_size=GPU_BATCH, steps=20, compile="max-autotune-no-cudagraphs",
         warmup_steps=3),
    dict(spec="random:pathsegdiff-brca-20x", batch_size=GPU_BATCH, steps=20, compile="max-autotune", warmup_steps=3),
    dict(spec="random:pathsegdiff-brca-20x", batch_size=GPU_BATCH, steps=20, compile="default",
         attention="math", warmup_steps=3),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--gpu", action="store_true", help="run the GPU set (pathsegdiff-brca-20x, batch 128)")
    ap.add_argument("--only", type=int, nargs="*", help="indices of the settings to run")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new settings after this")
    args = ap.parse_args()
    sets = GPU_SETS if args.gpu else CPU_SETS
    if args.only:
        sets = [sets[i] for i in args.only]
    rows = []
    t_start = time.time()
    for s in sets:
        if time.time() - t_start > args.budget_s:
            rows.append({"setting": s, "skipped": "time budget"})
            continue
        t0 = time.time()
        try:
            r = bench_features(device=args.device, **s)
            r["wall_s"] = round(time.time() - t0, 1)
            rows.append({"setting": s, **r})
            print(json.dumps(rows[-1]), flush=True)
        except Exception as e:  # keep going: one failing setting must not lose the others
            rows.append({"setting": s, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
            print(json.dumps(rows[-1]), flush=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
