"""LDMFeatures: shapes, the hook-free forward vs diffusers, determinism, position-keyed noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdseg_qupath.backbone.features import LDMFeatures, _compile_mode
from pdseg_qupath.backbone.model import build_backbone
from pdseg_qupath.backbone.noise import position_noise
from pdseg_qupath.backbone.taps import unet_taps
from pdseg_qupath.core.errors import PdsegError


@pytest.fixture(scope="module")
def tiny():
    return build_backbone("tiny")


@pytest.fixture(scope="module")
def tiny_cond():
    return build_backbone("tiny-cond")


def _tiles(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _hooked_up_blocks(unet, sample, t, ctx) -> list[torch.Tensor]:
    """Reference: diffusers' own forward, up-block outputs captured with hooks (tests only)."""
    got: dict[int, torch.Tensor] = {}
    hooks = [blk.register_forward_hook(lambda m, i, o, k=k: got.__setitem__(k, o))
             for k, blk in enumerate(unet.up_blocks)]
    try:
        with torch.no_grad():
            unet(sample, t, ctx)
    finally:
        for h in hooks:
            h.remove()
    return [got[k] for k in range(len(unet.up_blocks))]


@pytest.mark.parametrize("name", ["tiny", "tiny-cond", "small"])
def test_hook_free_forward_equals_diffusers(name: str) -> None:
    bb = build_backbone(name)
    g = torch.Generator().manual_seed(0)
    size = 16 if name == "small" else 8
    z = torch.randn(2, 3, size, size, generator=g)
    t = torch.tensor([10, 600])
    ctx = torch.randn(2, 2, bb.config.context_dim, generator=g)
    ref = _hooked_up_blocks(bb.unet, z, t, ctx)
    taps = list(range(len(bb.unet.up_blocks)))
    with torch.no_grad():
        mine = unet_taps(bb.unet, z, t, ctx, taps)
    for a, b in zip(mine, ref):
        assert torch.equal(a, b)


def test_untapped_up_blocks_are_skipped(tiny) -> None:
    calls = []
    h = tiny.unet.up_blocks[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            unet_taps(tiny.unet, torch.randn(1, 3, 8, 8), torch.tensor([5]), torch.zeros(1, 1, 32), [0])
    finally:
        h.remove()
    assert calls == []


def test_shape_channels_and_defaults(tiny) -> None:
    f = LDMFeatures(tiny)
    assert f.t == (tiny.config.default_t,) and f.blocks == tiny.config.default_blocks
    y = f.extract(_tiles(3))
    assert y.shape == (3, f.channels, 8, 8) and y.dtype == torch.float32
    assert f.channels == 64 + 32 and f.out_stride == 4
    # a single tile without batch axis, and a tensor input, work too
    assert f.extract(torch.from_numpy(_tiles(1)[0])).shape == (1, f.channels, 8, 8)


def test_paper_defaults_on_meta() -> None:
    """Paper backbone: default taps are up blocks 1 and 2 (32 and 64 px): 576 + 384 channels at 64x64."""
    f = LDMFeatures(build_backbone("pathsegdiff-brca-20x", "meta"), device="meta")
    assert f.blocks == (1, 2) and f.channels == 960 and f.multiple == 32
    x = torch.zeros(1, 256, 256, 3, dtype=torch.uint8, device="meta")
    noise = torch.zeros(1, 1, 3, 64, 64, device="meta")
    out = f._core(x, noise, f.backbone.null_context(1, "meta"))
    assert out.shape == (1, 960, 64, 64)
    every = LDMFeatures(f.backbone, blocks=[0, 1, 2, 3], device="meta")
    assert every.channels == 2112


def test_bit_identical_between_runs_and_instances(tiny) -> None:
    tiles = _tiles(3)
    a = LDMFeatures(tiny).extract(tiles, origins=[[0, 0], [32, 0], [64, 96]])
    b = LDMFeatures(tiny, batch_size=2).extract(tiles, origins=[[0, 0], [32, 0], [64, 96]])
    c = LDMFeatures(tiny, batch_size=2).extract(tiles, origins=[[0, 0], [32, 0], [64, 96]])
    assert torch.equal(b, c)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # batch size may change float summation order
    assert not torch.equal(a, LDMFeatures(tiny, seed=1).extract(tiles, origins=[[0, 0], [32, 0], [64, 96]]))


def test_origins_default_to_zero_and_change_noise(tiny) -> None:
    f = LDMFeatures(tiny)
    tiles = _tiles(2)
    assert torch.equal(f.extract(tiles), f.extract(tiles, origins=[[0, 0], [0, 0]]))
    assert not torch.equal(f.extract(tiles), f.extract(tiles, origins=[[0, 0], [32, 0]]))


def test_noise_is_keyed_by_absolute_position() -> None:
    a = position_noise(torch.tensor([[0, 0]]), 3, 16, 16, t=50)
    b = position_noise(torch.tensor([[8, 4]]), 3, 16, 16, t=50)
    assert torch.equal(a[..., 4:, 8:], b[..., :12, :8])
    assert not torch.equal(a, position_noise(torch.tensor([[0, 0]]), 3, 16, 16, t=51))
    big = position_noise(torch.tensor([[0, 0], [1000, 7]]), 4, 64, 64, t=50, seed=3)
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.02
    nb = torch.corrcoef(torch.stack([big[..., 1:].flatten(), big[..., :-1].flatten()]))[0, 1]
    assert abs(float(nb)) < 0.02


def test_overlapping_tiles_agree_in_the_interior(tiny) -> None:
    """Position-keyed noise makes the overlap agree; per-tile noise does not. Exact agreement is
    impossible by design (GroupNorm statistics and self-attention span the whole tile)."""
    img = np.random.default_rng(5).integers(0, 256, (128, 192, 3), dtype=np.uint8)
    f = LDMFeatures(tiny, t=200)
    left, right = img[None, :, :128], img[None, :, 64:192]
    fa = f.extract(left, origins=[[0, 0]])
    fb = f.extract(right, origins=[[64, 0]])
    fb_wrong = f.extract(right)  # every tile at origin (0, 0): other noise over the same tissue
    m = 4
    a = fa[..., m:32 - m, 16 + m:32 - m]
    b = fb[..., m:32 - m, m:16 - m]
    b_wrong = fb_wrong[..., m:32 - m, m:16 - m]
    err = float((a - b).norm() / a.norm())
    err_wrong = float((a - b_wrong).norm() / a.norm())
    assert err < 0.6 and err < 0.5 * err_wrong
    corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    assert corr > 0.85


def test_several_timesteps_are_concatenated(tiny) -> None:
    tiles = _tiles(2)
    both = LDMFeatures(tiny, t=[10, 300]).extract(tiles)
    one = LDMFeatures(tiny, t=10).extract(tiles)
    two = LDMFeatures(tiny, t=300).extract(tiles)
    assert both.shape[1] == one.shape[1] * 2
    torch.testing.assert_close(both, torch.cat([one, two], 1), rtol=1e-5, atol=1e-5)


def test_conditioning(tiny_cond) -> None:
    f = LDMFeatures(tiny_cond)
    tiles = _tiles(2)
    zero = {"feat_20x": torch.zeros(2, 12), "feat_5x": torch.zeros(2, 24)}
    assert torch.equal(f.extract(tiles), f.extract(tiles, cond=zero))  # None == zeroed embeddings
    g = torch.Generator().manual_seed(0)
    cond = {"feat_20x": torch.randn(2, 12, generator=g), "feat_5x": torch.randn(2, 24, generator=g)}
    y = f.extract(tiles, cond=cond)
    assert not torch.equal(y, f.extract(tiles))
    # per-tile conditioning is sliced with the batch
    y1 = LDMFeatures(tiny_cond, batch_size=1).extract(tiles, cond=cond)
    torch.testing.assert_close(y, y1, rtol=1e-5, atol=1e-5)
    ctx = tiny_cond.context(2, cond)
    torch.testing.assert_close(f.extract(tiles, cond=ctx), y)


def test_bad_inputs_are_clear_errors(tiny) -> None:
    f = LDMFeatures(tiny)
    with pytest.raises(PdsegError, match="uint8"):
        f.extract(_tiles(1).astype(np.float32))
    with pytest.raises(PdsegError, match=r"\(B, H, W, 3\)"):
        f.extract(np.zeros((1, 32, 32, 4), np.uint8))
    with pytest.raises(PdsegError, match="multiple of 8"):
        f.extract(np.zeros((1, 36, 36, 3), np.uint8))
    with pytest.raises(PdsegError, match="origins"):
        f.extract(_tiles(2), origins=[[0, 0]])
    with pytest.raises(PdsegError, match="out of range"):
        LDMFeatures(tiny, t=1000)
    with pytest.raises(PdsegError, match="up blocks 0..1"):
        LDMFeatures(tiny, blocks=[2])
    with pytest.raises(PdsegError, match="unconditional"):
        f.extract(_tiles(1), cond={"feat_20x": torch.zeros(1, 12)})


def test_compile_auto_policy() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _compile_mode("auto", cpu, 10**6) is None
    assert _compile_mode("auto", cuda, 100) is None
    assert _compile_mode("auto", cuda, 10**6) == "default"
    assert _compile_mode(True, cpu, None) == "default"
    with pytest.raises(PdsegError, match="compile mode"):
        _compile_mode("fast", cpu, None)


@pytest.mark.slow
def test_core_traces_as_one_graph(tiny) -> None:
    """The extraction pass compiles without graph breaks (dynamo with fullgraph=True)."""
    import torch._dynamo

    f = LDMFeatures(tiny)
    x = torch.from_numpy(_tiles(2))
    noise = torch.randn(1, 2, 3, 8, 8)
    ctx = tiny.null_context(2)
    torch._dynamo.reset()
    compiled = torch.compile(f._core, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, noise, ctx), f._core(x, noise, ctx))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_matches_fp32(tiny) -> None:
    tiles = _tiles(4)
    ref = LDMFeatures(tiny, device="cpu").extract(tiles)
    got = LDMFeatures(build_backbone("tiny"), device="cuda").extract(tiles).float().cpu()
    assert float((got - ref).norm() / ref.norm()) < 2e-2
