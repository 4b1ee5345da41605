"""The FCN head: dense prediction equals per-pixel training on interpolated features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdseg_qupath.learn.head import FCNHead, HeadConfig, sample_features


def test_sampled_features_equal_upsampled_map():
    torch.manual_seed(0)
    f = torch.randn(6, 8, 5)
    up = F.interpolate(f[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
    ys, xs = torch.meshgrid(torch.arange(32), torch.arange(20), indexing="ij")
    got = sample_features(f, ys.reshape(-1), xs.reshape(-1), 4)
    assert torch.allclose(got, up[:, ys.reshape(-1), xs.reshape(-1)].T, atol=1e-6)


@pytest.mark.parametrize("rgb_skip", [False, True])
def test_dense_head_equals_pixel_head(rgb_skip):
    torch.manual_seed(0)
    head = FCNHead(HeadConfig(in_channels=6, n_classes=3, hidden=(16, 8), rgb_skip=rgb_skip)).eval()
    head.set_normalization(torch.rand(6), torch.rand(6) + 0.5)
    f = torch.randn(2, 6, 4, 4)
    rgb = torch.randint(0, 256, (2, 3, 16, 16)).float()
    dense = head(f, rgb if rgb_skip else None)
    assert dense.shape == (2, 3, 16, 16)
    ys = torch.tensor([0, 3, 7, 15, 9])
    xs = torch.tensor([0, 15, 2, 8, 9])
    for b in range(2):
        px = sample_features(f[b], ys, xs, 4)
        pix = head.forward_pixels(px, rgb[b][:, ys, xs].T if rgb_skip else None)
        assert torch.allclose(pix, dense[b][:, ys, xs].T, atol=1e-5)


def test_rgb_skip_head_needs_the_tile():
    head = FCNHead(HeadConfig(4, 2, rgb_skip=True))
    with pytest.raises(ValueError, match="RGB"):
        head(torch.zeros(1, 4, 2, 2))


def test_config_round_trip_and_layers():
    cfg = HeadConfig(in_channels=192, n_classes=3, hidden=(128, 64), dropout=0.1)
    assert HeadConfig.from_json(cfg.to_json()) == cfg
    head = FCNHead(cfg)
    kinds = [(n, m.kernel_size, m.in_channels, m.out_channels) for n, m in head.named_modules()
             if isinstance(m, torch.nn.Conv2d)]
    assert kinds == [("proj", (1, 1), 192, 128), ("mid", (1, 1), 128, 64), ("out", (1, 1), 64, 3)]
    n_params = sum(p.numel() for p in head.parameters())
    assert n_params == 192 * 128 + 128 + 128 * 64 + 64 + 64 * 3 + 3


def test_context_head_dense_equals_sampled_and_sees_its_receptive_field():
    torch.manual_seed(0)
    cfg = HeadConfig.build("context", 6, 3, hidden=(8, 8))
    assert cfg.kind == "context" and cfg.rgb_skip and cfg.dilations == (1, 2, 4, 8)
    assert HeadConfig.from_json(cfg.to_json()) == cfg
    assert cfg.receptive_field == 4 * 31
    head = FCNHead(cfg).eval()
    f = torch.randn(2, 6, 40, 40)
    rgb = torch.randint(0, 256, (2, 3, 160, 160)).float()
    dense = head(f, rgb)
    ys = [torch.tensor([0, 80, 159, 33]), torch.tensor([5, 150])]
    xs = [torch.tensor([0, 80, 2, 100]), torch.tensor([159, 7])]
    px = torch.cat([rgb[b][:, ys[b], xs[b]].T for b in range(2)])
    got = head.forward_at(f, ys, xs, px)
    want = torch.cat([dense[b][:, ys[b], xs[b]].T for b in range(2)])
    assert torch.allclose(got, want, atol=1e-5)
    # a feature 15 feature px away changes the output pixel; one 17 px away does not
    # output pixel 82 lies between feature pixels 20 and 21: feature 20 + 15 = 35 is in reach, 21 + 16 = 37 not
    near, far = f.clone(), f.clone()
    near[0, :, 20, 35] += 5.0
    far[0, :, 20, 37] += 5.0
    assert not torch.allclose(head(near, rgb)[0, :, 82, 82], dense[0, :, 82, 82])
    assert torch.allclose(head(far, rgb)[0, :, 82, 82], dense[0, :, 82, 82], atol=1e-6)
    with pytest.raises(ValueError, match="whole feature maps"):
        head.forward_pixels(torch.zeros(3, 6))


def test_old_configs_load_as_pixel_heads():
    d = HeadConfig(4, 2).to_json()
    del d["kind"], d["dilations"]
    assert HeadConfig.from_json(d).kind == "pixel"
    with pytest.raises(ValueError, match="head 'mlp'"):
        HeadConfig(4, 2, kind="mlp")


def test_texture_maps_are_the_classic_filters_on_the_feature_grid():
    """Against SciPy on the same image: RGB and the H, E, DAB densities, averaged over f x f blocks (f = 2 for
    σ = 2 px, 4 above), Gaussian of σ/f (replicate border, 3σ support), difference of Gaussians and gradient
    magnitude per pixel, then means over the rest of the 4 x 4 feature cell."""
    import numpy as np
    from scipy import ndimage

    from pdseg_qupath.core.stain import rgb_to_hed
    from pdseg_qupath.learn.texture import CHANNELS, SIGMAS, texture_maps

    def blocks(a, f):
        h, w, c = a.shape
        return a.reshape(h // f, f, w // f, f, c).mean((1, 3))

    def blur(a, s):
        return np.stack([ndimage.gaussian_filter(a[..., c], s, mode="nearest", truncate=3.0)
                         for c in range(a.shape[-1])], -1)

    rgb = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    got = texture_maps(torch.from_numpy(rgb).permute(2, 0, 1)[None], 4)[0].numpy()
    assert got.shape == (CHANNELS, 12, 10) and CHANNELS == 78 and SIGMAS == (2.0, 4.0, 8.0, 16.0)
    chans = np.concatenate([rgb / 255.0, rgb_to_hed(rgb)], axis=-1)
    want = [blocks(chans, 4)]
    for s in SIGMAS:
        f = 2 if s == 2 else 4
        level = blocks(chans, f)
        g, g2 = blur(level, s / f), blur(level, 2 * s / f)
        gy, gx = np.gradient(g, axis=(0, 1))
        want += [blocks(a, 4 // f) for a in (g, g - g2, np.hypot(gx, gy) / f)]
    want = np.concatenate(want, -1).transpose(2, 0, 1)
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_texture_head_dense_equals_sampled_and_uses_the_colour_around():
    torch.manual_seed(0)
    cfg = HeadConfig.build("context", 6, 3, hidden=(8, 8), texture=True)
    assert cfg.texture and HeadConfig.from_json(cfg.to_json()) == cfg
    head = FCNHead(cfg).eval()
    head.set_texture_normalization(torch.rand(78), torch.rand(78) + 0.5)
    f = torch.randn(2, 6, 16, 16)
    rgb = torch.randint(0, 256, (2, 3, 64, 64)).float()
    dense = head(f, rgb)
    ys = [torch.tensor([0, 40, 63]), torch.tensor([5, 50])]
    xs = [torch.tensor([0, 33, 2]), torch.tensor([63, 7])]
    px = torch.cat([rgb[b][:, ys[b], xs[b]].T for b in range(2)])
    got = head.forward_at(f, ys, xs, px, head.texture_of(rgb))
    want = torch.cat([dense[b][:, ys[b], xs[b]].T for b in range(2)])
    assert torch.allclose(got, want, atol=1e-5)
    # the same features and the same pixel colour, another neighbourhood 12 px away: another output
    paler = rgb.clone()
    paler[0, :, 20:30, 20:30] = 250.0
    assert not torch.allclose(head(f, paler)[0, :, 40, 40], dense[0, :, 40, 40])
    with pytest.raises(ValueError, match="texture maps"):
        head.forward_at(f, ys, xs, px)
    with pytest.raises(ValueError, match="only the context head"):
        HeadConfig(6, 3, texture=True)
    old = HeadConfig.build("context", 6, 3).to_json()
    del old["texture"]  # a model from before the option
    assert HeadConfig.from_json(old).texture is False
