"""Named backbone architectures, as plain diffusers keyword arguments.

A config is data, not code: the same dict builds the model (``model.build_backbone``), is written into
the saved folder, and is what a CompVis YAML is parsed into (``convert.config_from_ldm_yaml``). Keeping
the kwargs in diffusers' own vocabulary means ``from_pretrained`` can rebuild any saved backbone.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from pdseg_qupath.core.errors import PdsegError

#: CompVis "linear" schedule (linspace of sqrt(beta), squared) is diffusers' "scaled_linear".
LDM_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0015,
    "beta_end": 0.0195,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}


@dataclass(frozen=True)
class BackboneConfig:
    """One LDM backbone: VQ first stage, UNet, noise schedule and (optional) conditioning embedder.

    ``default_t`` and ``default_blocks`` are the feature-extraction defaults (``features.LDMFeatures``);
    ``default_blocks`` index ``unet.up_blocks`` with 0 = coarsest.
    """

    name: str
    vq: dict[str, Any]
    unet: dict[str, Any]
    scheduler: dict[str, Any]
    conditioner: dict[str, Any] | None
    default_t: int
    default_blocks: tuple[int, ...]
    tile_size: int = 256
    notes: str = field(default="", compare=False)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.get("in_channels", 4))

    @property
    def context_dim(self) -> int:
        """Width of the cross-attention context tokens (what the conditioner must produce)."""
        return int(self.unet.get("cross_attention_dim", 1280))

    @property
    def vq_factor(self) -> int:
        """Spatial down-sampling factor of the first stage (4 for VQ-f4)."""
        return 2 ** (len(self.vq.get("block_out_channels", (64,))) - 1)

    def up_block_channels(self) -> tuple[int, ...]:
        """Output channels of each up block, coarsest first (what a feature tap yields)."""
        return tuple(reversed(self.unet["block_out_channels"]))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["default_blocks"] = list(self.default_blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneConfig:
        d = dict(d)
        d["default_blocks"] = tuple(d.get("default_blocks", ()))
        return cls(**d)

    def replace(self, **changes: Any) -> BackboneConfig:
        d = copy.deepcopy(self.to_dict())
        d.update(changes)
        return BackboneConfig.from_dict(d)


def _vq(block_out: tuple[int, ...], *, attention: bool, groups: int = 32, layers: int = 2,
        latent: int = 3, n_embed: int = 8192, sample_size: int = 256) -> dict[str, Any]:
    """VQModel kwargs for a CompVis-style VQ first stage (``VQModelInterface`` + ddconfig)."""
    n = len(block_out)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(block_out),
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": latent,
        "vq_embed_dim": latent,
        "num_vq_embeddings": n_embed,
        "norm_num_groups": groups,
        "sample_size": sample_size,
        # The original LDM multiplies by 1.0; diffusers' default 0.18215 would rescale every latent.
        "scaling_factor": 1.0,
        # ddconfig attn_resolutions=[] still keeps an attention layer in the middle block.
        "mid_block_add_attention": attention,
    }


def _unet(block_out: tuple[int, ...], attn_levels: tuple[bool, ...], *, layers: int, context: int,
          heads: int, groups: int = 32, latent: int = 3, sample_size: int = 64) -> dict[str, Any]:
    """UNet2DConditionModel kwargs for a CompVis ``openaimodel.UNetModel``.

    ``attn_levels[i]`` says whether resolution level i has a SpatialTransformer. Note diffusers reads
    ``attention_head_dim`` as the NUMBER of heads for this model family, so ``heads`` goes there.
    """
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels)]
    return {
        "sample_size": sample_size,
        "in_channels": latent,
        "out_channels": latent,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": list(block_out),
        "layers_per_block": layers,
        "cross_attention_dim": context,
        "attention_head_dim": heads,
        "norm_num_groups": groups,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "use_linear_projection": False,
        "transformer_layers_per_block": 1,
    }


_PAPER_UNET = _unet((192, 384, 576, 960), (False, True, True, True), layers=2, context=512, heads=1)
_PAPER_VQ = _vq((128, 256, 512), attention=True)

# t = 50: PathSegDiff's ablations (and a check of a small model of this family on gbm40 nuclei: Dice 0.869 at t=25 vs 0.855 at
# t=150) favour small t, where z_t still carries the tile's own detail; 50 is Baranchuk et al.'s smallest
# published t and leaves room for the noise to regularise. Blocks 1 and 2 are the up blocks whose
# outputs are at 32 and 64 px latent resolution in the paper's UNet (the "64 and 32 px" decoder blocks;
# 576 + 384 = 960 channels), and tapping nothing after block 2 lets the extractor skip the last block.
_PAPER_T = 50
_PAPER_BLOCKS = (1, 2)  # == ldm_default_blocks(4)

CONFIGS: dict[str, BackboneConfig] = {}


def ldm_default_blocks(n_levels: int) -> tuple[int, ...]:
    """The up blocks whose outputs sit at 1/2 and 1/1 latent resolution (32 and 64 px for 256-px
    tiles): up block i of an n-level UNet outputs at latent / 2**(n-2-i) (the last one at full size)."""
    return (0, 1) if n_levels <= 2 else (n_levels - 3, n_levels - 2)


def _register(cfg: BackboneConfig) -> None:
    CONFIGS[cfg.name] = cfg


_register(BackboneConfig(
    name="pathsegdiff-brca-20x",
    vq=_PAPER_VQ,
    unet=_PAPER_UNET,
    scheduler=dict(LDM_SCHEDULER),
    conditioner={"type": "ssl", "in_dims": [384, 768], "out_dim": 512, "normalize": True},
    default_t=_PAPER_T,
    default_blocks=_PAPER_BLOCKS,
    notes="Graikos et al. CVPR 2024 (Large-Image-Diffusion BRCA 20x): VQ-f4 + 400.92 M UNet, "
          "HIPT 384-d (20x) + 768-d (5x) SSL embeddings as 2 context tokens.",
))

_register(BackboneConfig(
    name="zoomldm",
    vq=_PAPER_VQ,
    unet=_PAPER_UNET,
    scheduler=dict(LDM_SCHEDULER),
    # configs/zoomldm_brca.yaml: cond_stage_config EmbeddingViT2_5(input_channels=1024, hidden_channels=512,
    # vit_mlp_dim=2048, num_layers=12); num_heads 8, seq_length 64, mag_levels 8 are its code defaults.
    conditioner={"type": "zoomldm", "input_channels": 1024, "hidden_channels": 512, "output_channels": 512,
                 "vit_mlp_dim": 2048, "num_layers": 12, "num_heads": 8, "seq_length": 64, "mag_levels": 8},
    default_t=_PAPER_T,
    default_blocks=_PAPER_BLOCKS,
    notes="ZoomLDM (Yellapragada et al., CVPR 2025; HF StonyBrook-CVLab/ZoomLDM, brca/weights.ckpt + "
          "brca/config.yaml): same UNet and VQ-f4, conditioned on an 8x8 grid of UNI embeddings + a "
          "magnification level through a 12-layer ViT (65 tokens). Unconditional = zero context.",
))

_register(BackboneConfig(
    name="base",
    vq=_vq((64, 128, 256), attention=False),
    unet=_unet((128, 256, 320), (False, True, True), layers=2, context=256, heads=1),
    scheduler=dict(LDM_SCHEDULER),
    conditioner=None,
    default_t=50,
    default_blocks=(0, 1),
    notes="64 M params (UNet 51.1 M + VQ 13.3 M); mid-size config for GPU pretraining.",
))

_register(BackboneConfig(
    name="small",
    vq=_vq((32, 64, 64), attention=False),
    unet=_unet((64, 128, 128), (False, False, True), layers=1, context=64, heads=1),
    scheduler=dict(LDM_SCHEDULER),
    conditioner=None,
    # Chosen on gbm40 tiles 01-30 only (train 01-20, score 21-30) with the pretrained weights; the shipped
    # folder records the same, so random:small and small tap identically (docs/PRETRAINING.md).
    default_t=5,
    default_blocks=(1, 2),
    notes="6.8 M params (UNet 5.56 M + VQ 1.28 M); CPU-pretrainable. Unconditional (zero context).",
))

_register(BackboneConfig(
    name="tiny",
    vq=_vq((32, 32, 32), attention=False, layers=1, n_embed=64, sample_size=32),
    unet=_unet((32, 64), (False, True), layers=1, context=32, heads=1, sample_size=8),
    scheduler=dict(LDM_SCHEDULER),
    conditioner=None,
    default_t=50,
    default_blocks=(0, 1),
    tile_size=32,
    notes="Milliseconds on CPU; for tests only.",
))

_register(CONFIGS["tiny"].replace(
    name="tiny-cond",
    conditioner={"type": "ssl", "in_dims": [12, 24], "out_dim": 32, "normalize": True},
    notes="tiny with a 2-token SSL conditioner, for conditioning and conversion tests.",
))


def get_config(name: str) -> BackboneConfig:
    """Look up a named config, with a message listing the valid names."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise PdsegError(
            f"unknown backbone config {name!r}; choose one of: {', '.join(sorted(CONFIGS))}"
        ) from None


def requested_choice(value: str, choices: tuple[str, ...], env: str, what: str) -> str:
    """``value`` checked against ``choices``; ``"auto"`` is replaced by the environment variable ``env`` when
    that is set (and checked too). Returns a choice, possibly still ``"auto"`` for the caller to decide."""
    if value not in choices:
        raise PdsegError(f"{what} must be {', '.join(choices[:-1])} or {choices[-1]}; got {value!r}")
    if value == "auto":
        value = os.environ.get(env, "").strip().lower() or "auto"
        if value not in choices:
            raise PdsegError(f"{env}={value!r}: use {', '.join(choices[:-1])} or {choices[-1]}")
    return value

