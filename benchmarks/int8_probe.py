"""Feasibility probe: int8 convolutions (oneDNN, x86 VNNI) for the CPU feature pass of ``small``.

Not a test and not product code: it builds int8 copies of the backbone here and times them against
today's fp32 fast path (``LDMFeatures`` defaults on CPU) in one process, alternating variants every
round, and measures the feature error ``||f_int8 - f_fp32|| / ||f_fp32||`` on real H&E tiles.

How the int8 convolutions work: weights int8, symmetric, one scale per output channel; activations
uint8, asymmetric, one scale per tensor -- either calibrated (min/max over calibration tiles, "static")
or taken from each input ("dynamic", one extra min/max pass); the convolution is oneDNN's
``torch.ops.onednn.qconv2d_pointwise`` (what inductor's x86 int8 path calls), which reads uint8 NHWC,
adds the bias and writes fp32, so GroupNorm, SiLU and residual sums stay fp32. Convolutions with
fewer than 16 input or output channels (VQ conv_in/conv_out, UNet conv_in) and, with ``skip
shortcuts``, the 1x1 shortcuts (whose input is the un-normalised concatenated skip stream) stay fp32.

Calibration uses gbm40 tiles 01-02 (8 tiles of 256 px); the error is measured on gbm40 tiles 31-40
(40 tiles) and, as a stain/organ shift from the calibration, on EBHI-Seg test images resized to 256 px.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/int8_probe.py --threads 1 --rounds 5 --out int8.json
    python benchmarks/int8_probe.py --compile      # adds torch.compile of the int8 pass (minutes to compile)

Needs ``/work/shared/data`` (or ``--data``); results: docs/PERFORMANCE.md, "int8 on CPU: probe".
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

# pdseg first, as the CLI does: it sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP.
from pdseg_qupath.backbone.bench import gflop_per_tile  # isort: skip
import numpy as np
import torch
from PIL import Image
from torch import nn

from pdseg_qupath.backbone.encoder import encode
from pdseg_qupath.backbone.features import LDMFeatures
from pdseg_qupath.backbone.spec import load_backbone

warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
_TRACEABLE = False  # True while torch.compile traces: quantize with plain ops inductor can fuse


def _u8(q: torch.Tensor) -> torch.Tensor:
    """The uint8 codes of a quint8 tensor, without the copy ``int_repr`` makes."""
    return torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.size(), q.stride())


class Int8Conv2d(nn.Module):
    """``conv`` with int8 weights (per output channel) and uint8 activations (per tensor), fp32 out."""

    def __init__(self, conv: nn.Conv2d, act_range: tuple[torch.Tensor, torch.Tensor] | None,
                 per_channel: bool = False) -> None:
        super().__init__()
        w = conv.weight.detach().float()
        self.act_range = None if act_range is None else (float(act_range[0].min()), float(act_range[1].max()))
        self.inv_scale = None
        if per_channel:  # calibrated per-channel scales, one zero point: fold the scales into the weights
            zp, scale = channel_scales(*act_range)
            w = w * scale.view(1, -1, 1, 1)
            self.inv_scale, self.zp = (1.0 / scale).view(1, -1, 1, 1), zp
        self.w_scale = (w.abs().amax(dim=(1, 2, 3)) / 127.0).clamp_min(1e-12)
        wq = torch.clamp(torch.round(w / self.w_scale.view(-1, 1, 1, 1)), -128, 127).to(torch.int8)
        self.w_zp = torch.zeros(len(self.w_scale), dtype=torch.int64)
        self.args = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        self.packed = torch.ops.onednn.qconv_prepack(wq, self.w_scale, 1.0, 0, *self.args, None)
        self.bias = None if conv.bias is None else conv.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        if self.inv_scale is not None:
            x, scale, zp = x * self.inv_scale, 1.0, self.zp
        else:
            if self.act_range is None:  # dynamic: this input's own range (NHWC is dense: a flat view is free)
                lo, hi = (float(v) for v in torch.aminmax(x.permute(0, 2, 3, 1).reshape(-1)))
            else:
                lo, hi = self.act_range
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            scale = max((hi - lo) / 255.0, 1e-8)
            zp = int(min(255, max(0, round(-lo / scale))))
        if _TRACEABLE:
            xq = torch.clamp(torch.round(x * (1.0 / scale)) + zp, 0, 255).to(torch.uint8)
        else:
            xq = _u8(torch.quantize_per_tensor(x, scale, zp, torch.quint8))
        return torch.ops.onednn.qconv2d_pointwise(xq, scale, zp, self.packed, self.w_scale, self.w_zp, self.bias,
                                                  *self.args, 1.0, 0, torch.float32, "none", [], "")


def channel_scales(lo: torch.Tensor, hi: torch.Tensor) -> tuple[int, torch.Tensor]:
    """One zero point and per-channel scales covering [lo_c, hi_c] (least mean squared step)."""
    lo, hi = lo.clamp(max=0).double(), hi.clamp(min=0).double()
    best = None
    for zp in range(1, 255):
        s = torch.maximum(-lo / zp, hi / (255 - zp)).clamp_min(1e-8)
        m = float((s * s).mean())
        if best is None or m < best[0]:
            best = (m, zp, s)
    return best[1], best[2].float()


class _Record(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv, self.lo, self.hi = conv, None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3))
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        return self.conv(x)


def _targets(bb, parts: tuple[str, ...], skip_shortcuts: bool) -> dict[str, tuple[nn.Module, str]]:
    roots = {"encoder": bb.vq.encoder, "unet": bb.unet}
    out = {}
    for p in parts:
        for name, m in roots[p].named_modules():
            if not isinstance(m, nn.Conv2d) or m.in_channels < 16 or m.out_channels < 16:
                continue
            if skip_shortcuts and name.endswith("conv_shortcut"):
                continue
            out[f"{p}.{name}"] = (roots[p], name)
    return out


def _swap(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def int8_copy(bb, parts: tuple[str, ...], ranges: dict | None, skip_shortcuts: bool, per_channel: tuple[str, ...] = ()):
    """A deep copy of ``bb`` whose convolutions in ``parts`` are int8 (``ranges`` None: dynamic); in the parts
    named in ``per_channel``, activations get calibrated per-channel scales."""
    q = copy.deepcopy(bb)
    for key, (root, name) in _targets(q, parts, skip_shortcuts).items():
        _swap(root, name, Int8Conv2d(root.get_submodule(name), None if ranges is None else ranges[key],
                                     key.split(".")[0] in per_channel))
    return q


def calibrate(bb, tiles: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel min/max of every candidate convolution's input over ``tiles`` (fp32 pass)."""
    q = copy.deepcopy(bb)
    rec = {}
    for key, (root, name) in _targets(q, ("encoder", "unet"), False).items():
        rec[key] = _Record(root.get_submodule(name))
        _swap(root, name, rec[key])
    LDMFeatures(q, device="cpu", batch_size=4).extract(tiles)
    return {k: (r.lo, r.hi) for k, r in rec.items()}


class _PerTile(nn.Module):
    """The encoder run one tile at a time (full-resolution int8 activations then stay in cache)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([encode(self.encoder, x[i:i + 1]) for i in range(x.shape[0])])


def per_tile_encoder(bb):
    bb.vq.encoder = _PerTile(bb.vq.encoder)
    return bb


def gbm40_tiles(data: Path, ids: list[int]) -> torch.Tensor:
    out = []
    for i in ids:
        a = np.asarray(Image.open(data / "gbm40" / f"{i:02d}.png").convert("RGB"))  # 512 px at 0.5 um/px
        out += [a[y:y + 256, x:x + 256] for y in (0, 256) for x in (0, 256)]
    return torch.from_numpy(np.stack(out))


def ebhi_tiles(data: Path, n: int) -> torch.Tensor:
    files = sorted((data / "ebhi-seg" / "test").glob("*.png"))[::max(1, 120 // n)][:n]
    ims = [np.asarray(Image.open(f).convert("RGB").resize((256, 256), Image.BILINEAR)) for f in files]
    return torch.from_numpy(np.stack(ims))


def rel_error(f: LDMFeatures, tiles: torch.Tensor, ref: torch.Tensor) -> float:
    y = f.extract(tiles)
    return float((y - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--backbone", default="small")
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the best int8 variant")
    ap.add_argument("--only", nargs="*", default=None, help="time only the variants whose names contain one of these")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global _TRACEABLE

    bb = load_backbone(args.backbone, "cpu")
    calib = gbm40_tiles(args.data, [1, 2])
    test_sets = {"gbm40 31-40": gbm40_tiles(args.data, list(range(31, 41))),
                 "ebhi-seg test (resized)": ebhi_tiles(args.data, 24)}
    ranges = calibrate(bb, calib)

    def make(b, channels_last: bool = False) -> LDMFeatures:
        return LDMFeatures(b, device="cpu", batch_size=args.batch_size, channels_last=channels_last)

    builders = {
        "int8 encoder, static": lambda: make(int8_copy(bb, ("encoder",), ranges, True)),
        "int8 encoder, dynamic": lambda: make(int8_copy(bb, ("encoder",), None, True)),
        "int8 encoder+UNet, static": lambda: make(int8_copy(bb, ("encoder", "unet"), ranges, True)),
        "int8 encoder+UNet, dynamic": lambda: make(int8_copy(bb, ("encoder", "unet"), None, True)),
        "int8 encoder+UNet, static, UNet per-channel": lambda: make(
            int8_copy(bb, ("encoder", "unet"), ranges, True, ("unet",))),
        "int8 encoder+UNet, static, UNet per-channel, channels-last": lambda: make(
            int8_copy(bb, ("encoder", "unet"), ranges, True, ("unet",)), channels_last=True),
        "int8 encoder+UNet, static, UNet per-channel, channels-last, encoder per tile": lambda: make(
            per_tile_encoder(int8_copy(bb, ("encoder", "unet"), ranges, True, ("unet",))), channels_last=True),
        "int8 encoder+UNet, static, all per-channel": lambda: make(
            int8_copy(bb, ("encoder", "unet"), ranges, True, ("encoder", "unet"))),
        "int8 encoder+UNet incl. 1x1 shortcuts, static": lambda: make(int8_copy(bb, ("encoder", "unet"), ranges, False)),
    }
    variants: dict[str, LDMFeatures] = {"fp32 (today's fast path)": make(bb)}
    for name, build in builders.items():
        if not args.only or any(o in name for o in args.only):
            variants[name] = build()
    compile_s = None
    if args.compile:
        _TRACEABLE = True
        f = LDMFeatures(int8_copy(bb, ("encoder", "unet"), ranges, True), device="cpu", batch_size=args.batch_size,
                        compile=True)
        t0 = time.perf_counter()
        f.extract(calib[:args.batch_size])
        compile_s = round(time.perf_counter() - t0, 1)
        variants["int8 encoder+UNet, static, torch.compile"] = f
        _TRACEABLE = False

    refs = {k: variants["fp32 (today's fast path)"].extract(v) for k, v in test_sets.items()}
    errors = {}
    for name, f in variants.items():
        _TRACEABLE = "compile" in name
        errors[name] = {k: rel_error(f, test_sets[k], refs[k]) for k in test_sets}
        print(f"{name}: rel. error " + ", ".join(f"{k} {e:.2e}" for k, e in errors[name].items()), file=sys.stderr,
              flush=True)

    x = test_sets["gbm40 31-40"][:args.batch_size]
    xin = (x.permute(0, 3, 1, 2).float() / 127.5 - 1).contiguous(memory_format=torch.channels_last)
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": [], "enc_cpu": []} for k in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            f = variants[name]
            _TRACEABLE = "compile" in name
            f.extract(x)  # warm
            w0, c0 = time.perf_counter(), time.process_time()
            f.extract(x)
            w1, c1 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                encode(f.backbone.vq.encoder, xin)
            c2 = time.process_time()
            n = len(x)
            times[name]["wall"].append((w1 - w0) / n * 1000)
            times[name]["cpu"].append((c1 - c0) / n * 1000)
            times[name]["enc_cpu"].append((c2 - c1) / n * 1000)
        print(f"round {r + 1}/{args.rounds} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)

    base = times["fp32 (today's fast path)"]
    rows = []
    for name, t in times.items():
        # per-round ratios against fp32 of the same round, then the median
        sp_wall = statistics.median(b / v for b, v in zip(base["wall"], t["wall"]))
        sp_cpu = statistics.median(b / v for b, v in zip(base["cpu"], t["cpu"]))
        sp_enc = statistics.median(b / v for b, v in zip(base["enc_cpu"], t["enc_cpu"]))
        rest = [a - e for a, e in zip(t["cpu"], t["enc_cpu"])]
        base_rest = [a - e for a, e in zip(base["cpu"], base["enc_cpu"])]
        sp_rest = statistics.median(b / v for b, v in zip(base_rest, rest))
        rows.append({"variant": name, "ms_per_tile_wall": round(statistics.median(t["wall"]), 1),
                     "cpu_ms_per_tile": round(statistics.median(t["cpu"]), 1),
                     "encoder_cpu_ms_per_tile": round(statistics.median(t["enc_cpu"]), 1),
                     "rest_cpu_ms_per_tile": round(statistics.median(rest), 1),
                     "speedup_wall": round(sp_wall, 2), "speedup_cpu": round(sp_cpu, 2),
                     "speedup_encoder_cpu": round(sp_enc, 2), "speedup_rest_cpu": round(sp_rest, 2),
                     "rel_error": {k: float(f"{e:.3g}") for k, e in errors[name].items()}, "raw": t})
        print(f"{name:48s} {rows[-1]['cpu_ms_per_tile']:6.1f} CPU ms/tile (x{sp_cpu:.2f}, wall x{sp_wall:.2f}) "
              f"encoder {rows[-1]['encoder_cpu_ms_per_tile']:6.1f} (x{sp_enc:.2f}) rest {rows[-1]['rest_cpu_ms_per_tile']:6.1f} "
              f"(x{sp_rest:.2f}) err " + " / ".join(f"{e:.1e}" for e in errors[name].values()))
    out = {"what": "int8 (oneDNN qconv) vs fp32 fast path, small, CPU; speed-ups are per-round medians",
           "machine": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                            if ln.startswith("model name")), "?"),
           "threads": args.threads, "batch_size": args.batch_size, "rounds": args.rounds, "torch": torch.__version__,
           "gflop_per_tile": round(gflop_per_tile(bb, variants["fp32 (today's fast path)"].t,
                                                  variants["fp32 (today's fast path)"].blocks, 256), 2),
           "compile_s": compile_s, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
