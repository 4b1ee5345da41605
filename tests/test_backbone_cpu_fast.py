"""The CPU fast path gives the reference path's features: in-place encoder walk, channels-last encoder, allocator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import VQModel

from pdseg_qupath.backbone import features as features_mod
from pdseg_qupath.backbone.config import CONFIGS
from pdseg_qupath.backbone.encoder import encode
from pdseg_qupath.backbone.features import PRECISION_ENV, LDMFeatures, keep_freed_memory, resolve_precision
from pdseg_qupath.backbone.model import build_backbone
from pdseg_qupath.backbone.spec import load_backbone
from pdseg_qupath.core.errors import PdsegError


def _vq(**changes) -> VQModel:
    kw = dict(CONFIGS["tiny"].vq, **changes)
    torch.manual_seed(0)
    return VQModel(**kw).eval().requires_grad_(False)


@pytest.mark.parametrize("changes", [
    {},  # tiny: 32-32-32, one resnet per block, no mid attention
    # channel changes (1x1 shortcut convs), two resnets per block, attention in the mid block
    {"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
     "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 2, "mid_block_add_attention": True},
])
def test_encoder_walk_is_bit_identical(changes: dict) -> None:
    vq = _vq(**changes)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(encode(vq.encoder, x), vq.encoder(x))
        xc = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(encode(vq.encoder, xc), vq.encoder(x), rtol=1e-5, atol=1e-5)
    # the inputs are left alone (the walk is in place only on its own intermediates)
    assert torch.equal(x, torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1)


def test_encoder_walk_falls_back_under_autocast_and_grad() -> None:
    vq = _vq()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(encode(vq.encoder, x), vq.encoder(x))
    y = encode(vq.encoder, x.requires_grad_(True))  # gradients on: diffusers' own forward
    assert y.requires_grad


def test_fast_features_match_reference_path() -> None:
    tiles = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    origins = [(0, 0), (32, 0), (64, 32)]
    fast = LDMFeatures(build_backbone("tiny"), device="cpu", t=[10, 200])
    ref = LDMFeatures(build_backbone("tiny"), device="cpu", t=[10, 200], reference=True)
    assert not fast.reference and fast._encoder_channels_last
    a, b = fast.extract(tiles, origins=origins), ref.extract(tiles, origins=origins)
    assert a.shape == b.shape == (3, fast.channels, 8, 8) and a.is_contiguous()
    rel = float((a - b).norm() / b.norm())
    assert rel < 1e-5, rel
    assert not torch.equal(a, torch.zeros_like(a))


def test_keep_freed_memory_is_idempotent() -> None:
    first = keep_freed_memory()
    assert isinstance(first, bool) and keep_freed_memory() is first


def test_bf16_on_cpu_runs_a_bf16_copy_close_to_fp32() -> None:
    tiles = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    origins = [(0, 0), (32, 0), (64, 32)]
    bb = build_backbone("tiny")
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    half = LDMFeatures(bb, device="cpu", t=[10, 200], precision="bf16")
    full = LDMFeatures(bb, device="cpu", t=[10, 200], precision="fp32")
    assert half.precision == "bf16" and not half.autocast and full.precision == "fp32"
    assert {p.dtype for p in half._bf16.parameters()} == {torch.bfloat16}
    # the backbone itself is left in fp32, untouched (training, pretraining and fp32 extractors share it)
    assert all(v.dtype == before[k].dtype and torch.equal(v, before[k]) for k, v in bb.state_dict().items())
    a, b = half.extract(tiles, origins=origins), full.extract(tiles, origins=origins)
    assert a.dtype == torch.float32 and a.shape == b.shape and a.is_contiguous()
    rel = float((a - b).norm() / b.norm())
    assert 1e-5 < rel < 5e-2, rel  # really bf16 (not fp32); random tiny weights amplify rounding
    torch.testing.assert_close(half.extract(tiles, origins=origins), a, rtol=0, atol=0)  # deterministic


def test_bf16_features_of_the_shipped_small_are_close_to_fp32() -> None:
    bb = load_backbone("small", torch.device("cpu"))
    tiles = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    a = LDMFeatures(bb, device="cpu", precision="bf16").extract(tiles)
    b = LDMFeatures(bb, device="cpu", precision="fp32").extract(tiles)
    rel = float((a - b).norm() / b.norm())
    assert rel < 1e-2, rel  # 4.4e-3 at 256 px (docs/PERFORMANCE.md)


def test_bf16_on_cpu_with_conditioning() -> None:
    bb = build_backbone("tiny-cond")
    tiles = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    g = torch.Generator().manual_seed(0)
    cond = {"feat_20x": torch.randn(2, 12, generator=g), "feat_5x": torch.randn(2, 24, generator=g)}
    other = {k: torch.randn(v.shape, generator=g) for k, v in cond.items()}
    a = LDMFeatures(bb, device="cpu", precision="bf16").extract(tiles, cond)
    b = LDMFeatures(bb, device="cpu", precision="fp32").extract(tiles, cond)
    c = LDMFeatures(bb, device="cpu", precision="fp32").extract(tiles, other)
    # bf16's own error on this random tiny model: 1.8-2.5 % over 8 seeds with AMX (Intel Xeon), about 2 % with
    # AVX-512 BF16 (AMD EPYC); another conditioning moves fp32 features by about 8 %.
    err = float((a - b).norm() / b.norm())
    assert err < 4e-2
    assert err < 0.5 * float((c - b).norm() / b.norm())  # the conditioning is honoured in bf16


def test_precision_auto_follows_the_cpu_and_the_environment(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    monkeypatch.setattr(features_mod, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_precision("auto", cpu, cpu_bf16=False) == "fp32"  # the reference path stays fp32
    assert resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(features_mod, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("auto", cuda) == "bf16"
    assert resolve_precision("bf16", cpu) == "bf16"  # asked for: allowed (emulated on such a CPU)
    assert LDMFeatures(build_backbone("tiny"), device="cpu").precision == "fp32"
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_precision("fp32", cpu) == "fp32"  # an explicit argument wins over the variable
    assert LDMFeatures(build_backbone("tiny"), device="cpu").precision == "bf16"
    monkeypatch.setenv(PRECISION_ENV, "fp16")
    with pytest.raises(PdsegError, match=f"{PRECISION_ENV}='fp16'"):
        resolve_precision("auto", cpu)
    with pytest.raises(PdsegError, match="auto, bf16 or fp32"):
        resolve_precision("half", cpu)


def test_cpu_has_bf16_reads_the_cpu_flags(monkeypatch, tmp_path) -> None:
    import builtins

    real_open = builtins.open
    for flags, want in (("fpu sse2 avx512f avx512_bf16 avx512_vnni", True), ("fpu amx_bf16 amx_tile", True),
                        ("fpu sse2 avx512f avx512_vnni", False)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda f, *a, _i=info, **k: real_open(_i if f == "/proc/cpuinfo" else f, *a, **k))
        features_mod.cpu_has_bf16.cache_clear()
        try:
            assert features_mod.cpu_has_bf16() is want, flags
        finally:
            monkeypatch.setattr(builtins, "open", real_open)
            features_mod.cpu_has_bf16.cache_clear()
