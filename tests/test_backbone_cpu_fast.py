"""The CPU fast path gives the reference path's features: in-place encoder walk, channels-last encoder, allocator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import VQModel

from pdseg_qupath.backbone.config import CONFIGS
from pdseg_qupath.backbone.encoder import encode
from pdseg_qupath.backbone.features import LDMFeatures, keep_freed_memory
from pdseg_qupath.backbone.model import build_backbone


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
