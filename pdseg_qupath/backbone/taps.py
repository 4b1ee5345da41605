"""A hook-free UNet forward that returns decoder (up-block) activations and stops early.

diffusers' ``UNet2DConditionModel.forward`` only returns the final noise prediction, so taps would need
forward hooks, which break ``torch.compile`` graphs and run every decoder block. This re-walks the
same submodules (same weights, same maths) for the subset of configs an LDM backbone uses, returns the
tapped up-block outputs, and skips the up blocks after the last tap and the output head.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import UNet2DConditionModel

from pdseg_qupath.core.errors import PdsegError


def check_supported(unet: UNet2DConditionModel) -> None:
    """Refuse UNet features this walk does not reproduce (they never occur in LDM backbones)."""
    c = unet.config
    unsupported = {
        "class_embed_type": c.class_embed_type is not None or getattr(unet, "class_embedding", None)
        is not None,
        "addition_embed_type": c.addition_embed_type is not None,
        "encoder_hid_dim": c.encoder_hid_dim is not None,
        "center_input_sample": bool(c.center_input_sample),
        "time_cond_proj_dim": c.time_cond_proj_dim is not None,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise PdsegError(f"this UNet uses {', '.join(bad)}, which pdseg's feature extractor does not support")


def unet_taps(unet: UNet2DConditionModel, sample: torch.Tensor, timesteps: torch.Tensor,
              context: torch.Tensor, taps: Sequence[int]) -> list[torch.Tensor]:
    """Outputs of ``unet.up_blocks[i]`` for i in ``taps`` (0 = coarsest), in the order of ``taps``."""
    if not taps:
        raise ValueError("taps must name at least one up block")
    last = max(taps)
    if min(taps) < 0 or last >= len(unet.up_blocks):
        raise PdsegError(f"feature blocks {list(taps)} out of range: this UNet has up blocks "
                         f"0..{len(unet.up_blocks) - 1}")

    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps))
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)

    h = unet.conv_in(sample)
    skips: tuple[torch.Tensor, ...] = (h,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips += res

    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=context)
        else:
            h = unet.mid_block(h, emb)

    # As diffusers: pass explicit upsample sizes only when the input is not a multiple of 2**n_up.
    factor = 2 ** unet.num_upsamplers
    forward_size = any(d % factor != 0 for d in sample.shape[-2:])
    found: dict[int, torch.Tensor] = {}
    for i, block in enumerate(unet.up_blocks[: last + 1]):
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        size = skips[-1].shape[2:] if forward_size and i < len(unet.up_blocks) - 1 else None
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res,
                      encoder_hidden_states=context, upsample_size=size)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
        if i in taps:
            found[i] = h
    return [found[i] for i in taps]
