"""CPU feature throughput, old against new, in one run (not a test; prints and writes JSON).

"old" is ``bench features --reference``: diffusers' modules as shipped, NCHW, the system allocator —
what ``pdseg-qupath bench features --backbone small --device cpu`` timed before the CPU fast path. "new"
is the same command today. Each measurement runs in a fresh process (the allocator setting is
process-wide), with the same torch thread count, batch size, tiles and weights; old and new alternate,
with the order flipped every round, so that load from other programs hits both alike. The speed-up
is reported per round (new tiles/s over the old of the same round) and as the median over rounds,
for wall time and for process CPU time (all threads), which depends less on the machine's load.

    python benchmarks/cpu_speed.py --backbone small --threads 2 --rounds 5 --out cpu_speed.json

"new" takes the default precision, which is bf16 on a CPU with bf16 instructions (AVX-512 BF16 or AMX)
and fp32 elsewhere; ``--fp32`` adds a side "fp32": the new path with ``precision="fp32"``, so that on
such a CPU the fp32 fast path and bf16 are timed in the same rounds. "new" also takes the default
encoder, which on a CPU is the backbone's fast encoder where it has one (``pdseg_qupath/backbone/fast_encoder.py``);
``--vq`` adds a side "vq": the new path with the VQ encoder (what "new" was before the fast encoder).

``--int8 DATA`` adds a side, "int8": the new path with the int8 convolutions of
``benchmarks/int8_probe.py`` (a probe, not a product option; ranges calibrated on DATA/gbm40 tiles
01-02), timed in the same rounds, its feature error measured against the old path like the others.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    # pdseg first, as the CLI does: it sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP.
    from pdseg_qupath.backbone.bench import bench_features  # isort: skip
    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "int8":
        _use_int8(args.int8)
    r = bench_features(args.backbone, "cpu", args.batch_size, args.steps, reference=args.worker == "old",
                       precision="fp32" if args.worker == "fp32" else "auto", warmup_steps=1,
                       ref_tiles=args.batch_size, encoder="vq" if args.worker == "vq" else "auto")
    print("RESULT " + json.dumps(r))


def _use_int8(data: Path) -> None:
    """Make ``bench_features`` time the int8 probe's extractor (its fp32 reference stays fp32)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import int8_probe

    from pdseg_qupath.backbone import bench

    fp32 = bench.LDMFeatures

    def features(backbone, *a, reference: bool = False, **kw):
        if reference or backbone.device.type == "meta":
            return fp32(backbone, *a, reference=reference, **kw)
        ranges = int8_probe.calibrate(backbone, int8_probe.gbm40_tiles(data, [1, 2]))
        return fp32(int8_probe.int8_copy(backbone, ("encoder", "unet"), ranges, True, ("unet",)), *a, **kw)

    bench.LDMFeatures = features


def machine() -> str:
    """The CPU's model name and logical core count, for the JSON."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical cores"


def alternate(cmd: list[str], sides: tuple[str, ...], rounds: int, env: dict[str, str]) -> dict[str, list[dict]]:
    """Run ``cmd --worker SIDE`` once per side and round, each in a fresh process, the order of the sides
    flipped every round (so that load from other programs hits all sides alike); each side's results (the
    worker's ``RESULT`` JSON line, plus the 1-minute load average before it), in round order."""
    rows: dict[str, list[dict]] = {v: [] for v in sides}
    for r in range(rounds):
        for variant in sides if r % 2 == 0 else sides[::-1]:
            load = os.getloadavg()[0]
            out = subprocess.run(cmd + ["--worker", variant], env=env, capture_output=True, text=True, check=False)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if out.returncode or line is None:
                sys.exit(f"{variant} worker failed:\n{out.stderr[-3000:]}")
            res = json.loads(line[len("RESULT "):])
            res["load_avg_1min_before"] = round(load, 2)
            rows[variant].append(res)
            print(f"round {r + 1}/{rounds} {variant}: {res['tiles_per_s']:.3f} tiles/s, "
                  f"{res['cpu_s_per_tile']:.3f} CPU s/tile, {res['page_faults_per_tile']:.0f} page faults/tile, "
                  f"rel. error {res['ref_rel_error']:.1e} (load {load:.1f})", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="small")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each worker (OMP_NUM_THREADS too)")
    ap.add_argument("--batch-size", type=int, default=4, help="tiles per pass (4 is bench features' default)")
    ap.add_argument("--steps", type=int, default=3, help="timed batches per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="old/new pairs")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--int8", type=Path, default=None, metavar="DATA",
                    help="also time the int8 probe (benchmarks/int8_probe.py), calibrated on DATA/gbm40")
    ap.add_argument("--fp32", action="store_true", help="also time the new path forced to fp32")
    ap.add_argument("--vq", action="store_true", help="also time the new path with the VQ encoder")
    ap.add_argument("--worker", choices=("old", "new", "fp32", "vq", "int8"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--backbone", args.backbone, "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    sides: tuple[str, ...] = ("old", "new") + (("fp32",) if args.fp32 else ()) + (("vq",) if args.vq else ())
    if args.int8:
        cmd += ["--int8", str(args.int8)]
        sides += ("int8",)
    rows = alternate(cmd, sides, args.rounds, env)

    def ratios(key: str, invert: bool = False, side: str = "new") -> list[float]:
        return [round((o[key] / n[key]) if invert else (n[key] / o[key]), 3)
                for o, n in zip(rows["old"], rows[side])]

    wall, cpu = ratios("tiles_per_s"), ratios("cpu_s_per_tile", invert=True)
    summary = {
        "what": "bench features, old (reference path) against new (default path), alternating fresh processes",
        "machine": machine(),
        "backbone": rows["new"][0]["backbone"],
        "threads": args.threads,
        "batch_size": args.batch_size,
        "tile_size": rows["new"][0]["tile_size"],
        "gflop_per_tile": rows["new"][0]["gflop_per_tile"],
        "rounds": args.rounds,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "old_tiles_per_s": [o["tiles_per_s"] for o in rows["old"]],
        "new_precision": rows["new"][0]["precision"],
        "new_encoder": rows["new"][0].get("encoder", "vq"),
        "new_tiles_per_s": [n["tiles_per_s"] for n in rows["new"]],
        "speedup_wall_per_round": wall,
        "speedup_wall_median": statistics.median(wall),
        "old_cpu_s_per_tile": [o["cpu_s_per_tile"] for o in rows["old"]],
        "new_cpu_s_per_tile": [n["cpu_s_per_tile"] for n in rows["new"]],
        "speedup_cpu_time_per_round": cpu,
        "speedup_cpu_time_median": statistics.median(cpu),
        "old_page_faults_per_tile": statistics.median(o["page_faults_per_tile"] for o in rows["old"]),
        "new_page_faults_per_tile": statistics.median(n["page_faults_per_tile"] for n in rows["new"]),
        "new_rel_error_vs_old_path": max(n["ref_rel_error"] for n in rows["new"]),
        "new_max_abs_error_vs_old_path": max(n["ref_max_abs_error"] for n in rows["new"]),
        "load_avg_1min": [r["load_avg_1min_before"] for v in sides for r in rows[v]],
        "runs": rows,
    }

    def side(name: str) -> dict:
        """An extra side's tiles/s and speed-ups over old, and new's wall speed-up over it."""
        w, c = ratios("tiles_per_s", side=name), ratios("cpu_s_per_tile", invert=True, side=name)
        return {f"{name}_tiles_per_s": [n["tiles_per_s"] for n in rows[name]],
                f"{name}_speedup_wall_per_round": w, f"{name}_speedup_wall_median": statistics.median(w),
                f"{name}_speedup_cpu_time_per_round": c, f"{name}_speedup_cpu_time_median": statistics.median(c),
                f"new_over_{name}_wall_median": statistics.median(
                    round(n["tiles_per_s"] / f["tiles_per_s"], 3) for n, f in zip(rows["new"], rows[name]))}

    for name in ("fp32", "vq"):
        if getattr(args, name):
            summary.update(side(name))
    if args.int8:
        w8, c8 = ratios("tiles_per_s", side="int8"), ratios("cpu_s_per_tile", invert=True, side="int8")
        summary.update({
            "int8_tiles_per_s": [n["tiles_per_s"] for n in rows["int8"]],
            "int8_speedup_wall_per_round": w8, "int8_speedup_wall_median": statistics.median(w8),
            "int8_cpu_s_per_tile": [n["cpu_s_per_tile"] for n in rows["int8"]],
            "int8_speedup_cpu_time_per_round": c8, "int8_speedup_cpu_time_median": statistics.median(c8),
            "int8_over_new_wall_median": statistics.median(
                round(i["tiles_per_s"] / n["tiles_per_s"], 3) for n, i in zip(rows["new"], rows["int8"])),
            "int8_rel_error_vs_old_path": max(n["ref_rel_error"] for n in rows["int8"]),
        })
    text = json.dumps(summary, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
