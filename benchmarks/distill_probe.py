"""Distil ``small``'s VQ-f4 encoder (+ quant_conv) into the fast encoder (``pdseg_qupath/backbone/fast_encoder.py``).

Not product code and not a test: how the shipped ``pdseg_qupath/weights/small/fast_encoder/`` was made and
checked. Five steps, each a subcommand:

    prep   teacher targets z0 = quant_conv(encoder(x)) * scale (the fp32 path of ``LDMFeatures._core``)
           on 256-px tiles at 0.5 um/px from unlabelled H&E (GlaS, CMU-1-Small-Region, gbm40 01-30,
           EBHI-Seg train/, and with --pool the unlabelled EBHI-Seg pool of prepare_ebhi_pool.py), random
           crops with flips / 90-degree rotations; held-out tiles from gbm40 31-40 and 24 EBHI-Seg test
           images (never trained on); cached as .npz under --work. ``train --sources`` picks the sources.
    train  one student (the product's FastEncoder: pixel-unshuffle to 64x64, 3x3 residual conv blocks, a conv
           to the 3 latent channels), MSE on z0, wall-clock budget, optional warm start; safetensors + JSON.
    eval   latent and whole-pass feature errors on the held-out tiles (the student as the extractor's
           encoder, default t and blocks), fp32 and bf16; GFLOP/tile.
    bench  fresh-process, alternating speed rounds: old (reference) path, fp32 fast path, bf16 path,
           student pass fp32 and bf16 (as ``benchmarks/cpu_speed.py``), the 1-minute load average with each.
    export write a student as a backbone folder's fast_encoder/ (sha256 and the backbone's sha256 recorded).

The shipped one (docs/PERFORMANCE.md, "The fast encoder"):

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/distill_probe.py prep --pool /work/data/ebhi-pool --work W
    python benchmarks/distill_probe.py train --work W --threads 2 --name ship48x3 --sources glas,cmu1 --minutes 20
    python benchmarks/distill_probe.py train --work W --threads 2 --name pool48x3 --init W/ship48x3 \
        --sources glas,cmu1,ebhi_pool,ebhi_train --minutes 20
    python benchmarks/distill_probe.py eval --work W W/ship48x3 pool48x3 --out fast_encoder_eval.json
    python benchmarks/distill_probe.py export W/pool48x3      # into pdseg_qupath/weights/small/fast_encoder/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

# pdseg first, as the CLI does: it sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP.
from pdseg_qupath.backbone.bench import gflop_per_tile  # isort: skip
from pdseg_qupath.backbone.fast_encoder import FastEncoder, save_fast_encoder  # isort: skip
from cpu_speed import alternate, machine  # the rounds and machine line of cpu_speed.py  # isort: skip
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # the test data beside a checkout; --data
WORK = Path("distill-work")
TILE = 256


# ----------------------------------------------------------------------------------------- student
# The student is the product's FastEncoder (pdseg_qupath/backbone/fast_encoder.py): pixel-unshuffle to latent
# resolution, residual 3x3 blocks, a conv to the latent channels; it outputs z0 itself.
def load_student(folder: Path) -> FastEncoder:
    """A student saved by ``train`` (student.json + student.safetensors)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "student.json").read_text())
    s = FastEncoder(**{k: cfg[k] for k in ("width", "blocks", "factor", "in_ch", "out_ch")})
    s.load_state_dict(load_file(str(folder / "student.safetensors")))
    return s.eval().requires_grad_(False)


def student_gflop(s: FastEncoder) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as c:
        s(torch.zeros(1, 3, TILE, TILE))
    return c.get_total_flops() / 1e9


# ------------------------------------------------------------------------------------------- data
def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _resize(img: np.ndarray, f: float) -> np.ndarray:
    if abs(f - 1) < 1e-3:
        return img
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((round(w * f), round(h * f)), Image.BICUBIC))


def _white(tile: np.ndarray) -> bool:
    """Mostly glass: over 70 % of pixels bright and unsaturated."""
    t = tile.astype(np.int16)
    bright = t.min(-1) > 200
    flat = (t.max(-1) - t.min(-1)) < 25
    return float((bright & flat).mean()) > 0.7


def _crops(img: np.ndarray, n: int, rng: np.random.Generator, skip_white: bool = False) -> list[np.ndarray]:
    h, w = img.shape[:2]
    out, tries = [], 0
    while len(out) < n and tries < n * 20:
        tries += 1
        y, x = rng.integers(0, h - TILE + 1), rng.integers(0, w - TILE + 1)
        t = img[y:y + TILE, x:x + TILE]
        if skip_white and _white(t):
            continue
        t = np.rot90(t, int(rng.integers(4)))
        if rng.random() < 0.5:
            t = t[:, ::-1]
        out.append(np.ascontiguousarray(t))
    return out


def train_tiles(rng: np.random.Generator, scale: float = 1.0, pool: Path | None = None) -> tuple[np.ndarray, list[str]]:
    tiles: list[np.ndarray] = []
    src: list[str] = []

    def add(name: str, ts: list[np.ndarray]) -> None:
        tiles.extend(ts)
        src.extend([name] * len(ts))

    for p in sorted((DATA / "he-unlabeled/glas").glob("*.png")):
        add("glas", _crops(_resize(_rgb(p), 0.62 / 0.5), round(8 * scale), rng))
    import tiffslide

    slide = tiffslide.TiffSlide(str(DATA / "wsi/CMU-1-Small-Region.svs"))
    w, h = slide.dimensions
    svs = np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"))
    add("cmu1", _crops(_resize(svs, 0.499 / 0.5), round(700 * scale), rng, skip_white=True))
    for i in range(1, 31):  # gbm40 01-30 only: 31-40 are held out
        add("gbm40", _crops(_rgb(DATA / f"gbm40/{i:02d}.png"), round(22 * scale), rng))
    for p in sorted((DATA / "ebhi-seg/train").glob("*.png")):  # train/ only: test/ is held out
        add("ebhi_train", _crops(_resize(_rgb(p), 1.2 / 0.5), round(40 * scale), rng))
    if pool is not None:  # benchmarks/prepare_ebhi_pool.py: unlabelled EBHI-Seg without any test image or patient
        for p in sorted(pool.glob("*.png")):
            add("ebhi_pool", _crops(_resize(_rgb(p), 1.2 / 0.5), round(2 * scale), rng))
    return np.stack(tiles), src


def heldout_tiles() -> dict[str, np.ndarray]:
    g = []
    for i in range(31, 41):
        img = _rgb(DATA / f"gbm40/{i:02d}.png")
        g += [img[y:y + TILE, x:x + TILE] for y in (0, 256) for x in (0, 256)]
    names = sorted(p for p in (DATA / "ebhi-seg/test").glob("*.png"))
    cats: dict[str, list[Path]] = {}
    for p in names:
        cats.setdefault(p.name.split("_")[0], []).append(p)
    e = []
    for c in sorted(cats):
        for p in cats[c][:4]:  # first 4 of each of the 6 categories: 24 images
            img = _resize(_rgb(p), 1.2 / 0.5)
            y0, x0 = (img.shape[0] - TILE) // 2, (img.shape[1] - TILE) // 2
            e.append(img[y0:y0 + TILE, x0:x0 + TILE])
    return {"gbm40_31_40": np.stack(g), "ebhi_test24": np.stack(e)}


@torch.no_grad()
def teacher_z0(bb, tiles: np.ndarray, batch: int = 8) -> np.ndarray:
    """Exactly the fp32 fast path of ``LDMFeatures._core`` up to z0."""
    from pdseg_qupath.backbone.encoder import encode

    scale = float(bb.vq.config.get("scaling_factor", 1.0) or 1.0)
    out = []
    for s in range(0, len(tiles), batch):
        x = torch.from_numpy(tiles[s:s + batch]).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
        x = x.contiguous(memory_format=torch.channels_last)
        z = bb.vq.quant_conv(encode(bb.vq.encoder, x)).float() * scale
        out.append(z.contiguous().numpy())
    return np.concatenate(out)


def cmd_prep(a: argparse.Namespace) -> None:
    from pdseg_qupath.backbone.spec import load_backbone

    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    bb = load_backbone("small", torch.device("cpu"))
    rng = np.random.default_rng(0)
    t0 = time.time()
    tiles, src = train_tiles(rng, a.scale, a.pool)
    print(f"{len(tiles)} training tiles ({ {s: src.count(s) for s in sorted(set(src))} }) in {time.time() - t0:.0f} s",
          flush=True)
    t0 = time.time()
    z = teacher_z0(bb, tiles)
    print(f"teacher z0 for training tiles in {time.time() - t0:.0f} s", flush=True)
    np.savez(a.work / "train.npz", x=tiles, z=z, src=np.array(src))
    ho = heldout_tiles()
    np.savez(a.work / "heldout.npz", **{f"x_{k}": v for k, v in ho.items()},
             **{f"z_{k}": teacher_z0(bb, v) for k, v in ho.items()})
    print({k: v.shape for k, v in ho.items()}, "z std", float(z.std()), flush=True)


# ------------------------------------------------------------------------------------------ train
def cmd_train(a: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    d = np.load(a.work / "train.npz")
    x_all, z_all = d["x"], d["z"]
    if a.sources:  # e.g. only the images whose terms allow shipping weights trained on them
        keep = np.isin(d["src"], a.sources.split(","))
        x_all, z_all = x_all[keep], z_all[keep]
    n = len(x_all)
    perm = np.random.default_rng(1).permutation(n)
    n_val = max(32, n // 20)
    val, tr = perm[:n_val], perm[n_val:]
    s = FastEncoder(a.width, a.blocks)
    prior: dict = {}
    if a.init:  # warm start: continue training a saved student (same architecture)
        from safetensors.torch import load_file

        s.load_state_dict(load_file(str(a.init / "student.safetensors")))
        prior = json.loads((a.init / "student.json").read_text())["train"]
    n_params = sum(p.numel() for p in s.parameters())
    gf = student_gflop(s)
    print(f"{a.name}: {n_params} params, {gf:.3f} GFLOP/tile; {len(tr)} train / {len(val)} val tiles", flush=True)
    opt = torch.optim.AdamW(s.parameters(), lr=a.lr, weight_decay=1e-4)
    budget = a.minutes * 60
    t0 = time.time()

    def xb(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(x_all[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x, torch.from_numpy(z_all[idx])

    def val_err() -> float:
        s.eval()
        num = den = 0.0
        with torch.no_grad():
            for i in range(0, len(val), 32):
                x, z = xb(val[i:i + 32])
                num += float(((s(x) - z) ** 2).sum())
                den += float((z ** 2).sum())
        s.train()
        return math.sqrt(num / den)

    step, epoch, best, log = 0, 0, float("inf"), []
    rng = np.random.default_rng(a.seed)
    out = a.work / a.name
    out.mkdir(parents=True, exist_ok=True)
    done = False
    while not done:
        epoch += 1
        order = rng.permutation(tr)
        for i in range(0, len(order) - a.batch + 1, a.batch):
            frac = (time.time() - t0) / budget
            if frac >= 1:
                done = True
                break
            lr = a.lr * (min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
            for g in opt.param_groups:
                g["lr"] = lr
            x, z = xb(np.sort(order[i:i + a.batch]))
            # no on-the-fly flips/rotations: the encoder is not equivariant, so rot(z(x)) != z(rot(x));
            # the crops were flipped/rotated before the teacher ran (prep)
            loss = F.mse_loss(s(x), z)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0:
                print(f"  step {step} {time.time() - t0:.0f}s lr {lr:.2e} loss {float(loss.detach()):.5f}", flush=True)
        v = val_err()
        log.append(dict(epoch=epoch, step=step, s=round(time.time() - t0, 1), train_loss=float(loss.detach()), val_rel=v))
        print(f"epoch {epoch} step {step} {time.time() - t0:.0f}s loss {float(loss):.5f} val rel {v:.4f}", flush=True)
        if v < best:
            best = v
            save_file({k: t.contiguous() for k, t in s.state_dict().items()}, str(out / "student.safetensors"))
    cfg = dict(s.arch, name=a.name, params=n_params, gflop_per_256_tile=round(gf, 4),
               replaces="small: vq.encoder + vq.quant_conv, output = z0 (times latent scale 1.0)",
               input="RGB uint8 / 127.5 - 1, (B, 3, H, W), H and W multiples of 4",
               output="(B, 3, H/4, W/4) latent z0 as LDMFeatures._core computes it",
               train=dict(tiles=len(tr), val_tiles=len(val), minutes=a.minutes + prior.get("minutes", 0),
                          lr=a.lr, batch=a.batch, steps=step + prior.get("steps", 0), epochs=epoch,
                          best_val_rel=best, threads=a.threads, log=log, init=str(a.init) if a.init else None,
                          sources=a.sources or "all",
                          prior=prior or None))
    (out / "student.json").write_text(json.dumps(cfg, indent=1) + "\n")
    print(json.dumps({k: v for k, v in cfg.items() if k != "train"}), "best val rel", best)


# ------------------------------------------------------------------------------------------- eval
def pass_gflop(bb, student: FastEncoder) -> float:
    return gflop_per_tile(bb, (bb.config.default_t,), bb.config.default_blocks, TILE, fast=student)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def cmd_eval(a: argparse.Namespace) -> None:
    from pdseg_qupath.backbone.features import LDMFeatures
    from pdseg_qupath.backbone.spec import load_backbone

    torch.set_num_threads(a.threads)
    bb = load_backbone("small", torch.device("cpu"))
    ho = np.load(a.work / "heldout.npz")
    sets = [k[2:] for k in ho.files if k.startswith("x_")]
    res: dict = {"heldout": {k: len(ho[f"x_{k}"]) for k in sets}, "students": {},
                 "teacher_gflop_per_tile_pass": round(gflop_per_tile(bb, (bb.config.default_t,),
                                                                     bb.config.default_blocks, TILE), 3),
                 "t": bb.config.default_t, "blocks": list(bb.config.default_blocks)}
    teach: dict = {}
    for k in sets:
        x = ho[f"x_{k}"]
        org = np.stack([np.arange(len(x)) * TILE, np.zeros(len(x), np.int64)], 1)
        f32 = LDMFeatures(bb, device="cpu", precision="fp32").extract(x, origins=org)
        f16 = LDMFeatures(bb, device="cpu", precision="bf16").extract(x, origins=org)
        teach[k] = (x, org, f32)
        res.setdefault("teacher_bf16_feature_rel_error", {})[k] = _rel(f16, f32)
    print("teacher bf16 vs fp32:", res["teacher_bf16_feature_rel_error"], flush=True)
    for name in a.students:
        folder = a.work / name if not Path(name).is_dir() else Path(name)
        s = load_student(folder)
        cfg = json.loads((folder / "student.json").read_text())
        r = {"params": cfg["params"], "student_gflop_per_tile": round(student_gflop(s), 4),
             "pass_gflop_per_tile": round(pass_gflop(bb, s), 3), "config": {k: cfg[k] for k in ("width", "blocks")},
             "train_minutes": cfg["train"]["minutes"], "train_steps": cfg["train"]["steps"],
             "best_val_rel_latent": cfg["train"]["best_val_rel"]}
        for k in sets:
            x, org, f32 = teach[k]
            with torch.no_grad():
                zs = s(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
            zt = torch.from_numpy(ho[f"z_{k}"])
            per = [_rel(zs[i], zt[i]) for i in range(len(x))]
            r.setdefault("latent_rel_error", {})[k] = _rel(zs, zt)
            r.setdefault("latent_rel_error_per_tile_median_max", {})[k] = [statistics.median(per), max(per)]
            for prec in ("fp32", "bf16"):
                fs = LDMFeatures(bb, device="cpu", precision=prec, encoder=s).extract(x, origins=org)
                r.setdefault(f"feature_rel_error_{prec}", {})[k] = _rel(fs, f32)
        res["students"][name] = r
        print(name, json.dumps(r), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    prev = json.loads(a.out.read_text()) if a.out.is_file() else {}
    prev["accuracy"] = res
    prev["machine"] = machine()
    a.out.write_text(json.dumps(prev, indent=1) + "\n")


# ------------------------------------------------------------------------------------------ bench
SIDES = ("old", "fp32", "bf16", "student_fp32", "student_bf16")


def worker(a: argparse.Namespace) -> None:
    from pdseg_qupath.backbone import bench

    torch.set_num_threads(a.threads)
    v = a.worker
    encoder = load_student(a.student) if v.startswith("student") else "vq"
    prec = {"old": "fp32", "fp32": "fp32", "bf16": "bf16", "student_fp32": "fp32", "student_bf16": "bf16"}[v]
    r = bench.bench_features("small", "cpu", a.batch_size, a.steps, reference=v == "old", precision=prec,
                             warmup_steps=1, ref_tiles=a.batch_size, encoder=encoder)
    print("RESULT " + json.dumps(r))


def cmd_bench(a: argparse.Namespace) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    cmd = [sys.executable, __file__, "bench", "--student", str(a.student), "--threads", str(a.threads),
           "--batch-size", str(a.batch_size), "--steps", str(a.steps)]
    rows = alternate(cmd, SIDES, a.rounds, env)
    med = {v: {"tiles_per_s_median": statistics.median(x["tiles_per_s"] for x in rows[v]),
               "cpu_s_per_tile_median": statistics.median(x["cpu_s_per_tile"] for x in rows[v])} for v in SIDES}
    for v in SIDES:
        med[v]["wall_speedup_vs_old_per_round"] = [round(n["tiles_per_s"] / o["tiles_per_s"], 3)
                                                  for o, n in zip(rows["old"], rows[v])]
        med[v]["wall_speedup_vs_old_median"] = statistics.median(med[v]["wall_speedup_vs_old_per_round"])
        med[v]["cpu_speedup_vs_old_median"] = statistics.median(
            round(o["cpu_s_per_tile"] / n["cpu_s_per_tile"], 3) for o, n in zip(rows["old"], rows[v]))
    summary = {"what": "bench_features small on CPU, fresh process per side, sides alternating each round; "
                       "the student sides swap the student in for vq.encoder + quant_conv "
                       "(their ref_rel_error is against the teacher on random-noise tiles: not meaningful)",
               "student": str(a.student), "machine": machine(), "threads": a.threads, "batch_size": a.batch_size,
               "steps": a.steps, "rounds": a.rounds, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
               "command": " ".join(sys.argv), "summary": med, "runs": rows}
    print(json.dumps(med, indent=1))
    prev = json.loads(a.out.read_text()) if a.out.is_file() else {}
    prev["speed"] = summary
    a.out.write_text(json.dumps(prev, indent=1) + "\n")


# ----------------------------------------------------------------------------------------- export
def cmd_export(a: argparse.Namespace) -> None:
    """Write a trained student as the backbone's ``fast_encoder/`` (what the product loads and verifies)."""
    from pdseg_qupath.backbone.spec import load_backbone

    bb = load_backbone(a.backbone_folder)
    cfg = json.loads((a.student / "student.json").read_text())
    train = {k: v for k, v in cfg["train"].items() if k not in ("log", "prior")}
    record = {"made_by": "benchmarks/distill_probe.py train + export", "name": cfg["name"],
              "params": cfg["params"], "gflop_per_256_tile": cfg["gflop_per_256_tile"], "train": train,
              "data": "random 256-px crops at 0.5 um/px with flips/rotations; targets from this backbone's fp32 "
                      "fast path (prep)"}
    out = save_fast_encoder(load_student(a.student), bb, a.backbone_folder, record)
    print(f"wrote {out}: {json.dumps(record)}")


def main() -> None:
    global DATA
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prep")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the number of crops per source")
    p.add_argument("--pool", type=Path, default=None,
                   help="also 2 crops of each image of this unlabelled EBHI-Seg pool (benchmarks/prepare_ebhi_pool.py)")
    p = sub.add_parser("train")
    p.add_argument("--name", required=True)
    p.add_argument("--width", type=int, default=48)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--minutes", type=float, default=12)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", type=Path, default=None, help="warm start from a saved student folder")
    p.add_argument("--sources", default=None, help="train on these sources only, e.g. glas,cmu1 (default: all)")
    p = sub.add_parser("export")
    p.add_argument("student", type=Path, help="a student folder written by train")
    p.add_argument("--backbone-folder", type=Path, default=Path(__file__).resolve().parents[1] / "pdseg_qupath/weights/small",
                   help="the backbone folder it was distilled from; fast_encoder/ is written inside it")
    p = sub.add_parser("eval")
    p.add_argument("students", nargs="+")
    p = sub.add_parser("bench")
    p.add_argument("--student", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--worker", choices=SIDES, default=None, help=argparse.SUPPRESS)
    for p in sub.choices.values():
        p.add_argument("--threads", type=int, default={"prep": 2, "train": 1, "eval": 2, "bench": 2, "export": 1}[p.prog.split()[-1]])
        p.add_argument("--data", type=Path, default=DATA, help="the test data folder (gbm40/, ebhi-seg/, he-unlabeled/, wsi/)")
        p.add_argument("--work", type=Path, default=WORK, help="where targets and students are kept")
        p.add_argument("--out", type=Path, default=Path("distill.json"))
    a = ap.parse_args()
    DATA = a.data
    if a.cmd == "bench" and a.worker:
        worker(a)
        return
    {"prep": cmd_prep, "train": cmd_train, "eval": cmd_eval, "bench": cmd_bench, "export": cmd_export}[a.cmd](a)


if __name__ == "__main__":
    main()
