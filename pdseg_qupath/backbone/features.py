"""PathSegDiff features: VQ-encode a tile, noise it to t, one UNet pass, tapped decoder activations.

Following Baranchuk et al. (ICLR 2022) as used by PathSegDiff: tiles are scaled to [-1, 1] as in LDM
training, encoded to the PRE-quantisation latent (what LDM training diffuses), noised with
``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps``, and passed once through the UNet. The chosen
up-block outputs are bilinearly resized to latent resolution (tile / 4) and concatenated; several
timesteps are concatenated too, timestep-major.

The noise ``eps`` is keyed by absolute latent position (``noise.position_noise``), so overlapping tiles
agree and runs are bit-identical. Precision (:func:`resolve_precision`): on CUDA the pass runs under bf16
autocast; on a CPU with bf16 instructions (AVX-512 BF16 or AMX) it runs a bf16 copy of the encoder and
UNet (features within ~5e-3 relative of fp32, docs/PERFORMANCE.md); elsewhere in fp32.
``PDSEG_PRECISION=fp32`` (or ``bf16``) overrides the automatic choice. ``encoder="fast"`` replaces the
VQ encoder with the backbone's distilled fast encoder (:mod:`pdseg_qupath.backbone.fast_encoder`; ``auto``
picks it on a CPU when the backbone has one, ``PDSEG_ENCODER`` overrides).
Batches are cut into chunks of ``batch_size`` tiles; out-of-memory back-off belongs to the caller
(:class:`pdseg_qupath.learn.runtime.BatchRunner`).

In fp32 the VQ encoder runs through :func:`pdseg_qupath.backbone.encoder.encode` (in-place, bit-identical).
On CPU, unless ``reference=True``, two more things make the pass ~1.45x faster (docs/PERFORMANCE.md):
the encoder's input is channels-last (oneDNN's faster convolutions; features within ~3e-7 relative of
NCHW, the UNet stays NCHW), and :func:`keep_freed_memory` stops glibc from returning every freed
activation to the kernel, which made each new one cost fresh page faults.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import os
import platform
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pdseg_qupath.backbone.config import requested_choice
from pdseg_qupath.backbone.encoder import encode
from pdseg_qupath.backbone.fast_encoder import FastEncoder, load_fast_encoder, resolve_encoder
from pdseg_qupath.backbone.model import Backbone
from pdseg_qupath.backbone.noise import position_noise
from pdseg_qupath.backbone.taps import check_supported, unet_taps
from pdseg_qupath.core.errors import PdsegError

#: ``compile="auto"`` compiles only when a run is long enough to repay compilation: with ~100 s to
#: compile cold and ~2.4 ms/tile saved on an H100 (235 -> 535 tiles/s), break-even is ~40k tiles cold;
#: a warm inductor cache cuts compile to seconds, so 20k tiles is where it starts to pay.
AUTO_COMPILE_TILES = 20_000
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PRECISIONS = ("auto", "bf16", "fp32")
PRECISION_ENV = "PDSEG_PRECISION"


class LDMFeatures:
    """Frozen-backbone feature extractor; ``extract`` maps uint8 RGB tiles to (B, C, H/4, W/4)."""

    def __init__(self, backbone: Backbone, t: int | Sequence[int] | None = None,
                 blocks: Sequence[int] | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, seed: int = 0, batch_size: int | None = None,
                 compile: bool | str = False, expected_tiles: int | None = None,
                 channels_last: bool = False, attention: str | None = None,
                 precision: str = "auto", reference: bool = False, encoder: str | FastEncoder = "vq") -> None:
        cfg = backbone.config
        self.device = torch.device(device) if device is not None else backbone.device
        self.backbone = backbone.to(self.device).eval().requires_grad_(False)
        check_supported(backbone.unet)
        ts = (cfg.default_t,) if t is None else ((t,) if isinstance(t, (int, np.integer)) else tuple(t))
        n_train = int(backbone.scheduler.config.num_train_timesteps)
        if not ts or any(not 0 <= int(x) < n_train for x in ts):
            raise PdsegError(f"timestep(s) {list(ts)} out of range: use 0..{n_train - 1}")
        self.t = tuple(int(x) for x in ts)
        self.blocks = tuple(int(b) for b in (cfg.default_blocks if blocks is None else blocks))
        n_up = len(backbone.unet.up_blocks)
        if not self.blocks or any(not 0 <= b < n_up for b in self.blocks):
            raise PdsegError(f"feature blocks {list(self.blocks)} out of range: this backbone has up "
                             f"blocks 0..{n_up - 1} (0 = coarsest)")
        up_ch = cfg.up_block_channels()
        self.channels = len(self.t) * sum(up_ch[b] for b in self.blocks)
        self.out_stride = cfg.vq_factor
        self.seed = int(seed)
        self.dtype = dtype or torch.float32
        # reference: diffusers' modules as shipped, NCHW, the system allocator (what bench compares with).
        self.reference = bool(reference)
        self.precision = resolve_precision(precision, self.device, cpu_bf16=not reference)
        # bf16 on CUDA is autocast; on a CPU, a bf16 copy of the modules (oneDNN's bf16 kernels, in-place walk).
        self._bf16 = _Bf16Modules(self.backbone) if self.precision == "bf16" and self.device.type == "cpu" else None
        self.autocast = self.precision == "bf16" and self._bf16 is None
        # The encoder: the VQ first stage's, or the backbone's fast encoder (or one given, for benchmarks).
        if isinstance(encoder, FastEncoder):
            self.encoder, fast = "fast", encoder.to(self.device).eval().requires_grad_(False)
        else:
            # the reference path is the VQ encoder's unless a fast one is asked for by name
            self.encoder = resolve_encoder("vq" if reference and encoder == "auto" else encoder, self.device, backbone)
            fast = load_fast_encoder(backbone, self.device) if self.encoder == "fast" else None
        self._fast = _bf16_copy(fast) if fast is not None and self._bf16 is not None else fast
        self.batch_size = int(batch_size) if batch_size else (128 if self.device.type == "cuda" else 4)
        self.channels_last = channels_last
        self.attention = attention
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self._encoder_channels_last = self.device.type == "cpu" and not reference and not channels_last
        if self.device.type == "cpu" and not reference:
            keep_freed_memory()
        abar = backbone.scheduler.alphas_cumprod.to(torch.float64)
        idx = torch.tensor(self.t)
        self._sqrt_ab = abar[idx].sqrt().to(torch.float32).to(self.device)
        self._sqrt_1mab = (1 - abar[idx]).sqrt().to(torch.float32).to(self.device)
        self._t_tensor = idx.to(self.device)
        self._latent_scale = float(backbone.vq.config.get("scaling_factor", 1.0) or 1.0)
        # Input side must be a multiple of the total down-sampling (VQ x UNet) to keep the grids aligned.
        self.multiple = self.out_stride * 2 ** (len(backbone.unet.down_blocks) - 1)
        self.compile_mode = _compile_mode(compile, self.device, expected_tiles)
        self.compile_seconds: float | None = None
        self._fn: Callable[..., torch.Tensor] = self._core
        if self.compile_mode is not None:
            self._fn = _compiled(self._core, self.compile_mode)

    # ------------------------------------------------------------------ the pass (compiled as one graph)
    def _core(self, x: torch.Tensor, noise: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        mods = self._bf16 if self._bf16 is not None else self.backbone.vq
        unet = self._bf16.unet if self._bf16 is not None else self.backbone.unet
        dtype = torch.bfloat16 if self._bf16 is not None else torch.float32
        x = (x.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0).to(dtype)
        if self.channels_last or self._encoder_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._fast is not None:
            z0 = self._fast(x).float()  # trained to give the scaled latent itself
        else:
            h = mods.encoder(x) if self.reference else encode(mods.encoder, x)
            z0 = mods.quant_conv(h).float() * self._latent_scale
        if self._encoder_channels_last:
            z0 = z0.contiguous()  # the UNet stays NCHW: channels-last gains it ~3 % and costs exactness
        nt, b = len(self.t), x.shape[0]
        zt = (self._sqrt_ab.view(nt, 1, 1, 1, 1) * z0.unsqueeze(0)
              + self._sqrt_1mab.view(nt, 1, 1, 1, 1) * noise)
        zt = zt.flatten(0, 1).to(dtype)
        tvec = self._t_tensor.repeat_interleave(b)
        feats = unet_taps(unet, zt, tvec, ctx.repeat(nt, 1, 1).to(dtype), self.blocks)
        size = z0.shape[-2:]
        feats = [f.float() if f.shape[-2:] == size else
                 F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False) for f in feats]
        out = torch.cat(feats, dim=1) if len(feats) > 1 else feats[0]
        if nt == 1:
            return out
        c = out.shape[1]
        return out.view(nt, b, c, *size).transpose(0, 1).reshape(b, nt * c, *size)

    # ------------------------------------------------------------------------------------ public API
    def summary(self) -> str:
        """How the pass runs, for the line train and predict print: ``bf16 features, fast encoder``."""
        return f"{self.precision} features" + (", fast encoder" if self.encoder == "fast" else "")

    @torch.no_grad()
    def extract(self, tiles: np.ndarray | torch.Tensor, cond: Any = None,
                origins: np.ndarray | torch.Tensor | Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """Features (B, channels, H/out_stride, W/out_stride) in ``self.dtype`` on ``self.device``.

        ``origins``: (B, 2) top-left (x, y) of each tile on the work-resolution pixel grid, so that
        overlapping tiles get the same noise; None puts every tile at (0, 0). ``cond``: None
        (unconditional), a (B, tokens, D) context, or a dict of per-tile embeddings for the conditioner.
        """
        x = self._as_tiles(tiles)
        b, h, w, _ = x.shape
        org = self._as_origins(origins, b)
        out = [self._chunk(x[s:s + self.batch_size], org[s:s + self.batch_size], _slice_cond(cond, s, self.batch_size))
               for s in range(0, b, self.batch_size)]
        return torch.cat(out) if len(out) > 1 else out[0]

    # --------------------------------------------------------------------------------------- helpers
    def _chunk(self, x: torch.Tensor, org: torch.Tensor, cond: Any) -> torch.Tensor:
        n = x.shape[0]
        pad = self.batch_size - n if self.compile_mode is not None else 0  # fixed shapes: no recompiles
        x = x.to(self.device, non_blocking=True)
        cfg = self.backbone.config
        lh, lw = x.shape[1] // self.out_stride, x.shape[2] // self.out_stride
        noise = torch.stack([position_noise(org, cfg.latent_channels, lh, lw, t, self.seed, self.device)
                             for t in self.t])
        ctx = self.backbone.context(n, cond, self.device)
        if pad:
            x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
            noise = torch.cat([noise, noise[:, -1:].expand(-1, pad, *noise.shape[2:])], dim=1)
            ctx = torch.cat([ctx, ctx[-1:].expand(pad, *ctx.shape[1:])])
        graphs = self.compile_mode in ("reduce-overhead", "max-autotune")
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with _precision(self.device, self.autocast), _sdpa(self.attention):
            y = self._fn(x, noise, ctx)
        y = y[:n].to(self.dtype)
        # CUDA-graph outputs live in a static buffer that the next replay overwrites.
        return y.clone() if graphs else y

    def _as_tiles(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(tiles)) if isinstance(tiles, np.ndarray) else tiles
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[-1] != 3:
            raise PdsegError(f"tiles must be uint8 RGB of shape (B, H, W, 3); got {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            raise PdsegError(f"tiles must be uint8 RGB (0..255); got {x.dtype}")
        h, w = x.shape[1:3]
        if h % self.multiple or w % self.multiple:
            raise PdsegError(f"tile size {h}x{w} px is not a multiple of {self.multiple} px, which this "
                             f"backbone needs ({self.backbone.config.name}); use e.g. "
                             f"{self.backbone.config.tile_size} px tiles")
        return x

    def _as_origins(self, origins: Any, b: int) -> torch.Tensor:
        if origins is None:
            return torch.zeros(b, 2, dtype=torch.int64)
        o = torch.as_tensor(np.asarray(origins), dtype=torch.int64).reshape(-1, 2)
        if o.shape[0] != b:
            raise PdsegError(f"got {o.shape[0]} tile origins for {b} tiles")
        # Latent pixel (X, Y) covers work pixels [4X, 4X+4): origins that are multiples of 4 make
        # overlapping tiles share noise exactly.
        return torch.div(o, self.out_stride, rounding_mode="floor")


def resolve_precision(precision: str, device: torch.device, *, cpu_bf16: bool = True) -> str:
    """``bf16`` or ``fp32`` for a requested ``auto``/``bf16``/``fp32`` on ``device``.

    ``auto`` reads ``PDSEG_PRECISION`` first; still ``auto``, it is bf16 on CUDA, bf16 on a CPU that
    computes bf16 in hardware (unless ``cpu_bf16`` is False: the reference path), fp32 elsewhere.
    """
    precision = requested_choice(precision, PRECISIONS, PRECISION_ENV, "precision")
    if precision != "auto":
        return precision
    if device.type == "cuda" or (device.type == "cpu" and cpu_bf16 and cpu_has_bf16()):
        return "bf16"
    return "fp32"


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (x86 ``avx512_bf16`` or ``amx_bf16``; read on Linux).

    Without it oneDNN would emulate bf16, which was never measured to pay off, so fp32 stays the choice."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(set(line.split(":", 1)[1].split()) & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


class _Bf16Modules(torch.nn.Module):
    """bf16 copies of the modules the feature pass runs on a CPU (the backbone itself stays as loaded)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.encoder = _bf16_copy(backbone.vq.encoder)
        self.quant_conv = _bf16_copy(backbone.vq.quant_conv)
        self.unet = _bf16_copy(backbone.unet)
        self.eval()


def _bf16_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` with its floating-point tensors in bf16, never holding a second fp32 copy."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = b.to(torch.bfloat16) if b.is_floating_point() else b.clone()
    return copy.deepcopy(module, memo)


_MALLOC_TUNED = False
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameter numbers (malloc.h)


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Make glibc keep freed blocks below ``threshold`` bytes for reuse; True when it took effect.

    By default glibc gives every block over 32 MB straight back to the kernel (mmap/munmap) and trims
    the heap's top, so a CPU feature pass paid fresh zeroed pages for each full-resolution activation:
    44k page faults per 256-px tile of ``small`` at batch 4, ~25 % of its CPU time on one thread and
    several times more with two threads (each munmap interrupts the other core). Process-wide and
    permanent (the resident set stays at its peak, which the pass reaches anyway); a no-op off glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, threshold) == 1
    except (OSError, AttributeError):
        return False
    _MALLOC_TUNED = ok
    return ok


def _slice_cond(cond: Any, start: int, n: int) -> Any:
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[start:start + n]
    if isinstance(cond, Mapping):
        return {k: v[start:start + n] for k, v in cond.items()}
    raise PdsegError("cond must be None, a (B, tokens, D) tensor or a dict of per-tile embeddings")


def _precision(device: torch.device, autocast: bool) -> AbstractContextManager[Any]:
    """bf16 autocast when asked (default on CUDA); otherwise plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()


_SDPA_NAMES = {"math": "MATH", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION",
               "cudnn": "CUDNN_ATTENTION"}


def _sdpa(name: str | None) -> AbstractContextManager[Any]:
    """Optionally pin the scaled-dot-product-attention backend (for benchmarking large head dims)."""
    if not name or name == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name not in _SDPA_NAMES:
        raise PdsegError(f"unknown attention backend {name!r}; use one of auto, {', '.join(_SDPA_NAMES)}")
    return sdpa_kernel(getattr(SDPBackend, _SDPA_NAMES[name]))


def _compile_mode(compile: bool | str, device: torch.device, expected_tiles: int | None) -> str | None:
    if compile is False or compile is None or compile == "off":
        return None
    if compile == "auto":
        if device.type == "cuda" and (expected_tiles or 0) >= AUTO_COMPILE_TILES:
            return "default"
        return None
    mode = "default" if compile is True or compile == "on" else str(compile)
    if mode not in COMPILE_MODES:
        raise PdsegError(f"unknown compile mode {mode!r}; use auto, off, on or one of {', '.join(COMPILE_MODES)}")
    return mode


def _compiled(fn: Callable[..., torch.Tensor], mode: str) -> Callable[..., torch.Tensor]:
    """torch.compile with a persistent cache, so users pay the compile once per machine."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                              / "pdseg-qupath" / "inductor"))
    try:
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
    except (ImportError, AttributeError):
        pass
    return torch.compile(fn, mode=None if mode == "default" else mode, dynamic=False, fullgraph=True)
