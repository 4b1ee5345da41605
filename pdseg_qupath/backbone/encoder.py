"""The VQ first stage's encoder, walked with in-place activations: same weights, same maths, less memory traffic.

For a small backbone the full-resolution encoder is most of the CPU time, and much of that is memory
traffic, not arithmetic: diffusers' ``ResnetBlock2D`` allocates a fresh full-resolution tensor for every
activation, residual sum and division by ``output_scale_factor`` (1.0 in every LDM first stage). This walk
runs the same modules in the same order but applies SiLU and the residual sum in place and skips a
division by exactly 1, so each float it produces is the one diffusers produces (IEEE addition commutes,
``x / 1.0 == x``). Anything it does not recognise runs through diffusers' own ``forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from torch import nn


def encode(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``encoder(x)`` for a diffusers VAE/VQ ``Encoder`` (before ``quant_conv``), in-place where exact.

    Under autocast (mixed dtypes, where an in-place sum would round differently) or with gradients on,
    this is exactly ``encoder(x)``.
    """
    if _autocast(x) or not _plain_encoder(encoder):
        return encoder(x)
    h = encoder.conv_in(x)
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            h = resnet_forward(resnet, h)
        for down in block.downsamplers or ():
            h = down(h)
    mid = encoder.mid_block
    h = resnet_forward(mid.resnets[0], h)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            h = attn(h, temb=None)
        h = resnet_forward(resnet, h)
    h = F.silu(encoder.conv_norm_out(h), inplace=True)
    return encoder.conv_out(h)


def resnet_forward(block: ResnetBlock2D, x: torch.Tensor) -> torch.Tensor:
    """``block(x, temb=None)`` without gradients: in-place SiLU and residual sum, no ``/ 1.0``."""
    if _autocast(x) or not _plain_resnet(block):
        return block(x, None)
    h = F.silu(block.norm1(x), inplace=True)
    h = block.conv1(h)
    h = F.silu(block.norm2(h), inplace=True)
    h = block.conv2(block.dropout(h))
    shortcut = block.conv_shortcut(x) if block.conv_shortcut is not None else x
    h = h.add_(shortcut)
    if block.output_scale_factor != 1.0:
        h = h.div_(block.output_scale_factor)
    return h


def _autocast(x: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type without autocast (meta, for FLOP counting)
        return False


def _plain_resnet(block: nn.Module) -> bool:
    return (type(block) is ResnetBlock2D and not torch.is_grad_enabled() and not block.training
            and block.upsample is None and block.downsample is None and block.time_emb_proj is None
            and isinstance(block.nonlinearity, nn.SiLU) and block.time_embedding_norm == "default")


def _plain_encoder(encoder: nn.Module) -> bool:
    names = ("conv_in", "down_blocks", "mid_block", "conv_norm_out", "conv_act", "conv_out")
    if torch.is_grad_enabled() or encoder.training or not all(hasattr(encoder, n) for n in names):
        return False
    if not isinstance(encoder.conv_act, nn.SiLU) or encoder.conv_norm_out is None:
        return False
    for block in encoder.down_blocks:
        if type(block).__name__ != "DownEncoderBlock2D" or not hasattr(block, "resnets"):
            return False
    return type(encoder.mid_block).__name__ == "UNetMidBlock2D"
