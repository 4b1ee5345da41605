"""One-shot GPU pretraining of the ``base`` backbone with fixed steps (driven by gpu_pretrain.sh).

Writes into OUT: ``record.json`` (the pretraining record: data, steps, losses, PSNR, seconds and
samples/s per stage, GPU name), ``throughput.json`` (samples/s per stage), the loss-curve and
reconstruction PNGs, and the backbone folder with every safetensors file split into parts of at most
15 MiB (``<file>.partNN``; rebuild with ``cat <file>.part* > <file>``, sha256 in ``shards.json``).
If the time limit hits first, the resumable state is left in ``OUT/base.pretrain-state`` and the
figures of what finished are written anyway.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

PART = 15 * 1024 * 1024


def shard(folder: Path) -> dict:
    index = {}
    for f in sorted(folder.rglob("*.safetensors")):
        data = f.read_bytes()
        parts = []
        for k in range(0, len(data), PART):
            p = f.with_name(f"{f.name}.part{k // PART:02d}")
            p.write_bytes(data[k:k + PART])
            parts.append(p.name)
        index[str(f.relative_to(folder))] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                                             "parts": parts}
        f.unlink()
    (folder / "shards.json").write_text(json.dumps(index, indent=2))
    return index


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", default="base")
    ap.add_argument("--steps-ae", type=int, default=1500)
    ap.add_argument("--steps-unet", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-mpp", type=float, default=0.62)
    ap.add_argument("--no-weights", action="store_true")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    import torch
    from rich.console import Console

    from pdseg_qupath.tasks.pretrain import pretrain
    from pdseg_qupath.ui import ConsoleEvents

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    bb_dir = args.out / args.config
    extra = {"pool_size": 16, "heldout": 4} if args.config == "tiny" else {}  # smoke tests only
    t0 = time.time()
    rec = pretrain(args.sources, bb_dir, config=args.config, steps_ae=args.steps_ae,
                   steps_unet=args.steps_unet, batch_size=args.batch_size, device=args.device,
                   image_mpp=args.image_mpp, resume=True, checkpoint_every=250, **extra,
                   events=ConsoleEvents(Console(stderr=True, width=120), plain=True))
    thr = {"config": args.config, "gpu": rec["machine"].get("gpu"), "batch_size": args.batch_size,
           "ae": {k: rec["ae"].get(k) for k in ("steps", "crop_px", "seconds", "samples_per_s", "psnr_db")},
           "unet": {k: rec["unet"].get(k) for k in ("steps", "crop_px", "seconds", "samples_per_s",
                                                       "final_loss", "heldout_eps_loss")},
           "wall_s": round(time.time() - t0, 1)}
    (args.out / "throughput.json").write_text(json.dumps(thr, indent=2))
    (args.out / "record.json").write_text(json.dumps(rec, indent=2))
    for png in (bb_dir / "pretrain").glob("*.png"):
        shutil.copy(png, args.out / f"{args.config}_{png.name}")
    if args.no_weights:
        shutil.rmtree(bb_dir)
    else:
        shard(bb_dir)
    print(json.dumps(thr, indent=2))


if __name__ == "__main__":
    main()
