"""``pdseg-qupath bench features``: throughput, FLOPs, memory and accuracy of feature extraction.

FLOPs are counted with ``torch.utils.flop_counter`` on a meta-device copy (free, exact shapes), so the
figure is the same on every machine. Accuracy is measured against the reference path (``reference=True``:
diffusers' modules as shipped, eager fp32, NCHW, TF32 off) on the same device and weights, so a compiled,
channels-last or bf16 setting reports what it costs. ``reference=True`` times that path itself: it is
what the extractor did before the CPU fast path (``benchmarks/cpu_speed.py`` runs both side by side).
"""

from __future__ import annotations

import os
import platform
import resource
import time
from typing import Any, Sequence

import numpy as np
import torch

from pdseg_qupath.backbone.fast_encoder import FastEncoder
from pdseg_qupath.backbone.features import LDMFeatures
from pdseg_qupath.backbone.model import Backbone, build_backbone, describe
from pdseg_qupath.backbone.spec import load_backbone


def gflop_per_tile(backbone: Backbone, t: Sequence[int], blocks: Sequence[int], tile_size: int,
                   fast: FastEncoder | None = None) -> float:
    """Forward GFLOP for one tile (VQ encoder, or the fast encoder ``fast`` is shaped like, + UNet up to the
    last tap + resizing), by shape only."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = build_backbone(backbone.config, "meta")
    encoder: str | FastEncoder = "vq"
    if fast is not None:
        with torch.device("meta"):
            encoder = FastEncoder(**fast.arch)
    f = LDMFeatures(meta, t=list(t), blocks=blocks, device="meta", precision="fp32", encoder=encoder)
    lat = tile_size // f.out_stride
    x = torch.zeros(1, tile_size, tile_size, 3, dtype=torch.uint8, device="meta")
    noise = torch.zeros(len(f.t), 1, backbone.config.latent_channels, lat, lat, device="meta")
    ctx = meta.null_context(1, "meta")
    with FlopCounterMode(display=False) as counter:
        f._core(x, noise, ctx)
    return counter.get_total_flops() / 1e9


def bench_features(spec: str = "pathsegdiff-brca-20x", device: str = "cpu", batch_size: int = 4,
                   steps: int = 5, compile: bool | str = False, *, t: int | Sequence[int] | None = None,
                   blocks: Sequence[int] | None = None, tile_size: int | None = None,
                   channels_last: bool = False, attention: str | None = None, precision: str = "auto",
                   warmup_steps: int = 1, ref_tiles: int = 2, reference: bool = False,
                   encoder: str | FastEncoder = "auto") -> dict[str, Any]:
    """Time ``LDMFeatures.extract`` on random tiles; returns a JSON-ready dict (see docs/PERFORMANCE.md)."""
    dev = torch.device(device)
    bb = load_backbone(spec, dev)
    size = tile_size or bb.config.tile_size
    feats = LDMFeatures(bb, t=t, blocks=blocks, device=dev, batch_size=batch_size, compile=compile,
                        channels_last=channels_last, attention=attention, precision=precision, reference=reference,
                        encoder=encoder)
    rng = np.random.default_rng(0)
    tiles = torch.from_numpy(rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8))
    origins = np.stack([np.arange(batch_size) * size, np.zeros(batch_size, dtype=np.int64)], 1)
    if dev.type == "cuda":
        tiles = tiles.pin_memory()
        torch.cuda.reset_peak_memory_stats(dev)

    def run() -> torch.Tensor:
        y = feats.extract(tiles, origins=origins)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return y

    t0 = time.perf_counter()
    y = run()
    first_s = time.perf_counter() - t0
    for _ in range(max(0, warmup_steps - 1)):
        run()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        y = run()
    elapsed = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    n_tiles = steps * batch_size
    tiles_per_s = n_tiles / elapsed
    peak_gib, peak_kind = _peak_memory(dev)

    n_ref = max(1, min(ref_tiles, batch_size))
    ref = _eager_fp32_reference(bb, feats, tiles[:n_ref], origins[:n_ref])
    got = y[:n_ref].float()
    rel = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    gflop = gflop_per_tile(bb, feats.t, feats.blocks, size, feats._fast)
    return {
        "backbone": describe(bb),
        "spec": spec,
        "random_weights": bb.random_weights,
        "device": _device_name(dev),
        "torch": torch.__version__,
        "precision": feats.precision,
        "encoder": feats.encoder,
        "compile": feats.compile_mode,
        "channels_last": channels_last,
        "reference_path": feats.reference,
        "threads": torch.get_num_threads(),
        "attention": attention or "auto",
        "batch_size": feats.batch_size,
        "tile_size": size,
        "t": list(feats.t),
        "blocks": list(feats.blocks),
        "channels": feats.channels,
        "steps": steps,
        "first_call_s": round(first_s, 3),
        "tiles_per_s": round(tiles_per_s, 3),
        "s_per_tile": round(1.0 / tiles_per_s, 5),
        # Process CPU time (all threads) and minor page faults per tile: less load-dependent than wall time.
        "cpu_s_per_tile": round((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / n_tiles, 5),
        "page_faults_per_tile": round((r1.ru_minflt - r0.ru_minflt) / n_tiles, 1),
        "gflop_per_tile": round(gflop, 2),
        "tflop_per_s": round(gflop * tiles_per_s / 1000.0, 3),
        "peak_memory_gib": round(peak_gib, 3),
        "peak_memory_kind": peak_kind,
        "ref": "reference path: eager fp32, diffusers modules, NCHW (TF32 off), same device and weights",
        "ref_rel_error": rel,
        "ref_max_abs_error": float((got - ref).abs().max()),
        "ref_tiles": n_ref,
        **({"ref_note": "the fast encoder learned from H&E; on these random-noise tiles its error says little "
                        "about H&E (about 3 % on held-out H&E tiles: docs/PERFORMANCE.md)"}
           if feats.encoder == "fast" else {}),
    }


def _eager_fp32_reference(bb: Backbone, feats: LDMFeatures, tiles: torch.Tensor, origins: np.ndarray) -> torch.Tensor:
    if feats.reference and feats.compile_mode is None and feats.precision == "fp32" and not feats.channels_last:
        ref_f = feats
    else:
        ref_f = LDMFeatures(bb, t=list(feats.t), blocks=feats.blocks, device=feats.device,
                            batch_size=len(tiles), precision="fp32", seed=feats.seed, reference=True, encoder="vq")
    cuda = feats.device.type == "cuda"
    if cuda:
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return ref_f.extract(tiles, origins=origins).float()
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _peak_memory(dev: torch.device) -> tuple[float, str]:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30, "cuda max_memory_allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20, "process peak RSS"


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU {platform.machine()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"
