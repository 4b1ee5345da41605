"""Domain pretraining (``pdseg-qupath pretrain``): fit the LDM backbone to the user's own unlabelled H&E.

Two stages, as in latent diffusion:

1. **Autoencoder.** The VQ-f4 first stage is trained as a plain autoencoder on its PRE-quantisation
   latent (the latent that features and diffusion use), with L1 plus an image-gradient L1 loss: no
   perceptual network (LPIPS weights are not available offline) and no GAN, which a few CPU-minutes
   could not train anyway. Afterwards the latent is normalised per channel to zero mean and unit
   variance, baked into ``quant_conv``/``post_quant_conv`` so the saved model needs no extra scale, and
   the codebook is fitted to the latents by k-means so that ``VQModel.decode`` (which quantises) works.
   When fine-tuning an existing backbone (``from_spec``) its latent space is kept as it is.
2. **UNet.** The ε-prediction DDPM objective on those latents with the backbone's own schedule
   (``scaled_linear``), unconditional (the model's null context). EMA weights are kept and saved.

Everything is driven by fixed step counts and one seed, so a run is reproducible; state is checkpointed
beside the output (``<out>.pretrain-state/``) and ``resume=True`` continues bit-for-bit.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from pdseg_qupath import __version__
from pdseg_qupath.backbone.config import BackboneConfig, get_config
from pdseg_qupath.backbone.model import Backbone
from pdseg_qupath.backbone.spec import load_backbone
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.events import SILENT, Events
from pdseg_qupath.core.fileio import atomic_write_text, atomic_write_with, sha256_file
from pdseg_qupath.core.slide import check_mpp
from pdseg_qupath.learn.pretrain_data import TilePool, augment_batch
from pdseg_qupath.learn.runtime import resolve_device

CHECKPOINT = "checkpoint.json"
"""The resume state: plain values in JSON (written last, so it marks a complete state) and every tensor in
``checkpoint.safetensors`` beside it; no pickle, so a planted state file can only be refused, never run."""
TENSORS = "checkpoint.safetensors"
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
EMA_DECAY = 0.999
GRAD_WEIGHT = 0.5  # weight of the gradient term next to L1; edges are what nuclei features need
EVAL_TIMESTEPS = (25, 100, 250, 500, 750)  # held-out ε-loss is averaged over these


@dataclass
class _Settings:
    """Everything a run depends on; stored in the checkpoint so ``resume`` can refuse a changed run."""

    config: str
    from_spec: str | None
    sources: list[str]
    mpp: float
    image_mpp: float | None
    steps_ae: int
    steps_unet: int
    batch_size: int
    seed: int
    pool_size: int
    heldout: int
    ae_crop: int
    unet_crop: int
    lr_ae: float
    lr_unet: float
    stain_sigma: float
    stain_bias: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Plan:
    """A run about to start: the backbone it starts from (None: random weights), its config and settings."""

    start: Backbone | None
    config: BackboneConfig
    settings: _Settings
    device: torch.device
    fresh: bool
    """Starting from random weights (the latent is normalised and the codebook fitted afresh)."""


def plan_run(sources: list[str], *, config: str | None, from_spec: str | None, mpp: float, image_mpp: float | None,
             steps_ae: int, steps_unet: int, batch_size: int | None, device: str, seed: int, pool_size: int,
             heldout: int, ae_crop: int | None, unet_crop: int | None, lr_ae: float | None, lr_unet: float | None,
             stain_sigma: float, stain_bias: float) -> Plan:
    """Check the options, load the backbone to fine-tune (if any) and fix every setting of the run."""
    for name, v in (("--steps-ae", steps_ae), ("--steps-unet", steps_unet)):
        if v < 0:
            raise PdsegError(f"{name} must be 0 or more, got {v}")
    check_mpp(mpp, "--mpp")
    if image_mpp is not None:
        check_mpp(image_mpp, "--image-mpp")
    dev = torch.device(resolve_device(device))
    start = load_backbone(from_spec) if from_spec else None
    if start is not None and config is not None and config != start.config.name:
        raise PdsegError(f"--config {config} differs from the config of --from {from_spec} "
                         f"({start.config.name}); leave --config out when fine-tuning")
    cfg = start.config if start is not None else get_config(config or "small")
    fresh = start is None or start.random_weights
    tile = cfg.tile_size
    settings = _Settings(
        config=cfg.name, from_spec=from_spec, sources=sources, mpp=float(mpp), image_mpp=image_mpp,
        steps_ae=int(steps_ae), steps_unet=int(steps_unet), batch_size=int(batch_size or (64 if dev.type == "cuda" else 8)),
        seed=int(seed), pool_size=int(pool_size), heldout=int(heldout),
        ae_crop=int(ae_crop or max(8 * cfg.vq_factor, tile // 2)), unet_crop=int(unet_crop or tile),
        lr_ae=float(lr_ae or (2e-4 if fresh else 2e-5)), lr_unet=float(lr_unet or (2e-4 if fresh else 5e-5)),
        stain_sigma=float(stain_sigma), stain_bias=float(stain_bias))
    check_crops(settings, cfg, tile)
    return Plan(start, cfg, settings, dev, fresh)


# ------------------------------------------------------------------------------------------ the run

class PretrainRun:
    """Training state of both stages, and how it is stepped, evaluated, checkpointed and restored."""

    def __init__(self, bb: Backbone, pool: TilePool, s: _Settings, dev: torch.device, fresh: bool,
                 state_dir: Path, checkpoint_every: int, on_step: Callable[[str, int], None] | None,
                 events: Events = SILENT) -> None:
        self.s, self.dev, self.fresh, self.events = s, dev, fresh, events
        self.pool, self.state_dir, self.every, self.on_step = pool, state_dir, checkpoint_every, on_step
        bb.to(dev).float()
        self.vq = bb.vq.requires_grad_(True)
        self.unet = bb.unet.requires_grad_(True)
        self.bb = bb
        self.ema = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self.sched = bb.scheduler
        self.abar = self.sched.alphas_cumprod.to(torch.float32).to(dev)
        self.n_t = int(self.sched.config.num_train_timesteps)
        self.rng = np.random.default_rng([s.seed, 1])
        self.gen = torch.Generator(device="cpu").manual_seed(s.seed)
        self.stage = "ae" if s.steps_ae > 0 else "latent"
        self.step = 0
        self.hist: dict[str, list[Any]] = {"ae_loss": [], "ae_psnr": [], "unet_loss": [], "unet_heldout": []}
        self.info: dict[str, Any] = {"seconds": {"ae": 0.0, "unet": 0.0}}
        self.opt: torch.optim.Optimizer | None = None
        self.lr: torch.optim.lr_scheduler.LambdaLR | None = None
        self._new_optimizer()

    # -- setup ------------------------------------------------------------------------------------
    def _new_optimizer(self) -> None:
        if self.stage == "ae":
            params, lr, steps = list(self.vq.parameters()), self.s.lr_ae, self.s.steps_ae
        elif self.stage == "unet":
            params, lr, steps = list(self.unet.parameters()), self.s.lr_unet, self.s.steps_unet
        else:
            self.opt = self.lr = None
            return
        self.opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        warm = max(1, min(100, steps // 20))
        self.lr = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: _lr_factor(i, warm, steps))

    def restore(self, ck: dict[str, Any]) -> None:
        self.vq.load_state_dict(ck["vq"])
        self.unet.load_state_dict(ck["unet"])
        self.ema.load_state_dict(ck["ema"])
        self.stage, self.step, self.hist, self.info = ck["stage"], ck["step"], ck["hist"], ck["info"]
        self._new_optimizer()
        if self.opt is not None and ck.get("opt") is not None:
            self.opt.load_state_dict(ck["opt"])
            self.lr.load_state_dict(ck["lr"])
        self.rng.bit_generator.state = ck["rng"]
        self.gen.set_state(ck["gen"])

    def checkpoint(self, rng_state: tuple[Any, torch.Tensor] | None = None) -> None:
        """Write the full state atomically: tensors to safetensors, then everything else to JSON."""
        rng, gen = rng_state or (self.rng.bit_generator.state, self.gen.get_state())
        ck = {"settings": self.s.as_dict(), "stage": self.stage, "step": self.step,
              "vq": self.vq.state_dict(), "unet": self.unet.state_dict(), "ema": self.ema.state_dict(),
              "opt": self.opt.state_dict() if self.opt else None,
              "lr": self.lr.state_dict() if self.lr else None,
              "rng": rng, "gen": gen, "hist": self.hist, "info": self.info, "pdseg_version": __version__}
        save_state(self.state_dir, ck)

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> None:
        """Step through the stages to the end, checkpointing on the way (Ctrl-C saves the state)."""
        while self.stage != "done":
            if self.stage == "latent":
                self._latent_stage()
                self._advance("unet")
                self.checkpoint()
                continue
            total = self.s.steps_ae if self.stage == "ae" else self.s.steps_unet
            name = "autoencoder" if self.stage == "ae" else "UNet (ε-DDPM)"
            progress = self.events.step(name, total=total, done=self.step)
            eval_every = max(1, total // 10)
            if self.stage == "unet" and not self.fresh and not self.hist["unet_heldout"]:
                self._evaluate()  # the starting backbone's held-out ε-loss, the baseline of a fine-tune
            t0 = time.time()
            dirty, snap = False, None
            try:
                while self.step < total:
                    snap = (copy.deepcopy(self.rng.bit_generator.state), self.gen.get_state())
                    loss = self._forward_loss()
                    self.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(self.opt.param_groups[0]["params"], 1.0)
                    dirty = True
                    self.opt.step()
                    self.lr.step()
                    if self.stage == "unet":
                        _ema_update(self.ema, self.unet, self.step)
                    self.hist[f"{self.stage}_loss"].append(float(loss.detach()))
                    self.step += 1
                    dirty, snap = False, None
                    if self.step % eval_every == 0 or self.step == total:
                        self._evaluate()
                    self.info["seconds"][self.stage] += time.time() - t0
                    t0 = time.time()
                    if self.step % self.every == 0 and self.step < total:
                        self.checkpoint()
                    progress.describe(", ".join(x for x in (self._status(), self._eval_text()) if x))
                    progress.advance(1)
                    if self.on_step:
                        self.on_step(self.stage, self.step)
            except KeyboardInterrupt:
                if not dirty:
                    self.checkpoint(snap)
                    self.events.message(f"interrupted: state saved at {self.stage} step {self.step}; "
                                        "rerun with --resume to continue", "warn")
                raise
            progress.close()
            self._advance("latent" if self.stage == "ae" else "done")
            self.checkpoint()

    def _advance(self, stage: str) -> None:
        self.stage, self.step = stage, 0
        if stage == "unet" and self.s.steps_unet == 0:
            self.stage = "done"
        self._new_optimizer()

    def _batch(self, crop: int) -> torch.Tensor:
        tiles = augment_batch(self.pool.train, self.s.batch_size, crop, self.rng,
                              stain_sigma=self.s.stain_sigma, stain_bias=self.s.stain_bias)
        return _to_input(tiles, self.dev)

    def _forward_loss(self) -> torch.Tensor:
        with _autocast(self.dev):
            if self.stage == "ae":
                self.vq.train()
                x = self._batch(self.s.ae_crop)
                rec = _reconstruct(self.vq, x)
                return F.l1_loss(rec.float(), x) + GRAD_WEIGHT * _grad_l1(rec.float(), x)
            self.unet.train()
            x = self._batch(self.s.unet_crop)
            with torch.no_grad():
                self.vq.eval()
                z0 = _encode(self.vq, x)
            b = z0.shape[0]
            t = torch.randint(0, self.n_t, (b,), generator=self.gen).to(self.dev)
            eps = torch.randn(z0.shape, generator=self.gen).to(self.dev)
            ab = self.abar[t].view(b, 1, 1, 1)
            zt = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
            ctx = self.bb.null_context(b, self.dev)
            pred = self.unet(zt, t, ctx).sample
            return F.mse_loss(pred.float(), eps)

    # -- between the stages -----------------------------------------------------------------------
    @torch.no_grad()
    def _latent_stage(self) -> None:
        """Normalise the latent (fresh runs only) and fit the codebook to it."""
        if self.s.steps_ae == 0 or not self.fresh:
            self.info["latent"] = {"normalised": False, "reason": "autoencoder kept as loaded"
                                   if not self.fresh else "no autoencoder steps"}
            return
        self.vq.eval()
        z = self._pool_latents()
        mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3)).clamp_min(1e-6)
        _bake_normalisation(self.vq, mean, std)
        z = self._pool_latents()
        self._fit_codebook(z)
        self.info["latent"] = {"normalised": True, "raw_mean": mean.tolist(), "raw_std": std.tolist(),
                               "after_mean": z.mean(dim=(0, 2, 3)).tolist(),
                               "after_std": z.std(dim=(0, 2, 3)).tolist()}

    def _pool_latents(self, n: int = 64) -> torch.Tensor:
        tiles = self.pool.train[:n]
        return torch.cat([_encode(self.vq, _to_input(tiles[i:i + 8], self.dev)) for i in range(0, len(tiles), 8)])

    def _fit_codebook(self, z: torch.Tensor, iters: int = 8) -> None:
        """k-means (Lloyd) on latent vectors, so quantised decoding stays close to the latent."""
        emb = self.vq.quantize.embedding.weight
        k = emb.shape[0]
        v = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        g = torch.Generator(device="cpu").manual_seed(self.s.seed + 11)
        v = v[torch.randperm(len(v), generator=g)[: max(k * 8, 65536)].to(v.device)]
        c = v[torch.randint(0, len(v), (k,), generator=g).to(v.device)].clone()
        for _ in range(iters):
            idx = _nearest(v, c)
            sums = torch.zeros_like(c).index_add_(0, idx, v)
            counts = torch.bincount(idx, minlength=k).float()
            empty = counts == 0
            c = torch.where(empty[:, None], v[torch.randint(0, len(v), (k,), generator=g).to(v.device)],
                            sums / counts.clamp_min(1)[:, None])
        emb.data.copy_(c.to(emb.dtype))
        self.info["codebook"] = {"codes": k, "vectors": len(v), "iterations": iters,
                                 "rms_error": float((v - c[_nearest(v, c)]).pow(2).mean().sqrt())}

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def _evaluate(self) -> None:
        tiles = self.pool.heldout[:16] if len(self.pool.heldout) else self.pool.train[:16]
        if self.stage == "ae":
            self.hist["ae_psnr"].append([self.step, psnr(self.vq, tiles, self.dev)])
        else:
            self.hist["unet_heldout"].append([self.step, self._heldout_eps(tiles)])

    def _heldout_eps(self, tiles: np.ndarray) -> float:
        """ε-loss of the EMA UNet on held-out latents at fixed timesteps with fixed noise."""
        self.vq.eval()
        z0 = torch.cat([_encode(self.vq, _to_input(tiles[i:i + 8], self.dev)) for i in range(0, len(tiles), 8)])
        g = torch.Generator(device="cpu").manual_seed(1234)
        losses = []
        for t in EVAL_TIMESTEPS:
            eps = torch.randn(z0.shape, generator=g).to(self.dev)
            ab = self.abar[t]
            zt = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
            tt = torch.full((len(z0),), t, device=self.dev, dtype=torch.long)
            with _autocast(self.dev):
                pred = self.ema(zt, tt, self.bb.null_context(len(z0), self.dev)).sample
            losses.append(float(F.mse_loss(pred.float(), eps)))
        return float(np.mean(losses))

    def _eval_text(self) -> str:
        if self.stage == "ae" and self.hist["ae_psnr"]:
            return f"held-out PSNR {self.hist['ae_psnr'][-1][1]:.2f} dB"
        if self.stage == "unet" and self.hist["unet_heldout"]:
            return f"held-out ε-loss {self.hist['unet_heldout'][-1][1]:.4f}"
        return ""

    def _status(self) -> str:
        h = self.hist[f"{self.stage}_loss"][-20:]
        return f"loss {np.mean(h):.4f}" if h else ""

    # -- results ----------------------------------------------------------------------------------
    def final_backbone(self) -> Backbone:
        bb = self.bb
        bb.vq = self.vq.cpu().eval().requires_grad_(False)
        bb.unet = (self.ema if self.s.steps_unet > 0 else self.unet).cpu().eval().requires_grad_(False)
        bb.random_weights = False
        bb.source = f"pdseg-qupath pretrain ({self.s.config})"
        return bb

    def record(self, pool: TilePool, wall: float, refs_count: int) -> dict[str, Any]:
        s = self.s
        tiles = pool.heldout if len(pool.heldout) else pool.train[:32]
        ae_rec: dict[str, Any] = {"steps": s.steps_ae, "crop_px": s.ae_crop, "lr": s.lr_ae,
                                  "loss": f"L1 + {GRAD_WEIGHT} x gradient L1",
                                  "seconds": round(self.info["seconds"]["ae"], 1)}
        if s.steps_ae:
            ae_rec["samples_per_s"] = round(s.steps_ae * s.batch_size / max(1e-9, self.info["seconds"]["ae"]), 2)
            ae_rec["final_loss"] = _tail_mean(self.hist["ae_loss"])
        ae_rec["psnr_db"] = round(psnr(self.vq, tiles, self.dev), 2)
        ae_rec["psnr_quantised_db"] = round(psnr(self.vq, tiles, self.dev, quantise=True), 2)
        ae_rec["psnr_on"] = f"{len(tiles)} held-out tiles" if len(pool.heldout) else "training tiles"
        unet_rec: dict[str, Any] = {"steps": s.steps_unet, "crop_px": s.unet_crop, "lr": s.lr_unet,
                                    "objective": "epsilon MSE, t ~ U{0..999}, null context",
                                    "ema_decay": EMA_DECAY, "seconds": round(self.info["seconds"]["unet"], 1)}
        if s.steps_unet:
            unet_rec["samples_per_s"] = round(s.steps_unet * s.batch_size / max(1e-9, self.info["seconds"]["unet"]), 2)
            unet_rec["final_loss"] = _tail_mean(self.hist["unet_loss"])
            unet_rec["heldout_eps_loss"] = self.hist["unet_heldout"][-1][1] if self.hist["unet_heldout"] else None
            start = [v for k, v in self.hist["unet_heldout"] if k == 0]
            if start:
                unet_rec["heldout_eps_loss_start"] = start[0]
        return {
            "kind": "pdseg-pretrain/1",
            "config": s.config,
            "from": s.from_spec,
            "settings": s.as_dict(),
            "data": {**pool.summary(), "sources": s.sources, "image_files": refs_count,
                     "per_image": pool.images},
            "augmentation": {"crop": True, "flips_rot90": True, "hed_jitter": {"sigma": s.stain_sigma,
                                                                                  "bias": s.stain_bias}},
            "psnr_db": ae_rec["psnr_db"],
            "ae": ae_rec,
            "latent": self.info.get("latent"),
            "codebook": self.info.get("codebook"),
            "unet": unet_rec,
            "history": {"ae_loss": _thin(self.hist["ae_loss"]), "ae_psnr": self.hist["ae_psnr"],
                        "unet_loss": _thin(self.hist["unet_loss"]), "unet_heldout": self.hist["unet_heldout"]},
            "wall_seconds": round(wall, 1),
            "machine": machine(self.dev),
            "versions": {"pdseg": __version__, "torch": torch.__version__, "diffusers": _diffusers_version()},
            "command": reproduce_command(s),
        }


# ------------------------------------------------------------------------------------------ helpers

def check_crops(s: _Settings, cfg: Any, tile: int) -> None:
    multiple = cfg.vq_factor * 2 ** (len(cfg.unet["block_out_channels"]) - 1)
    for name, c in (("ae_crop", s.ae_crop), ("unet_crop", s.unet_crop)):
        if c > tile or c % multiple:
            raise PdsegError(f"{name} {c} px must be at most the tile size {tile} and a multiple of {multiple}")
    if s.batch_size < 1 or s.pool_size < 1:
        raise PdsegError("--batch-size and the pool size must be at least 1")


def save_state(state_dir: Path, ck: dict[str, Any]) -> None:
    """``ck`` (tensors, dicts, lists, numbers, text) as ``TENSORS`` plus ``CHECKPOINT``, each atomically.

    Every tensor leaf is stored in safetensors under its path (``vq/encoder.conv_in.weight``,
    ``opt/state/3/exp_avg``); the JSON holds the rest, with ``{"__tensor__": path}`` where a tensor was and
    ``{"__int_keys__": {...}}`` for dicts with integer keys (the optimizer's), plus the tensors' sha256.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def plain(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().cpu().contiguous().clone()
            return {"__tensor__": path}
        if isinstance(x, dict):
            items = {str(k): plain(v, f"{path}/{k}") for k, v in x.items()}
            return {"__int_keys__": items} if x and all(isinstance(k, int) for k in x) else items
        if isinstance(x, (list, tuple)):
            return [plain(v, f"{path}/{i}") for i, v in enumerate(x)]
        return x

    body = plain(ck, "")
    atomic_write_with(state_dir / TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_text(state_dir / CHECKPOINT, json.dumps({"state": body, "tensors_sha256": sha256_file(
        state_dir / TENSORS)}))


def load_checkpoint(path: Path, settings: _Settings) -> dict[str, Any]:
    """The state of an interrupted run (``path``: its ``CHECKPOINT``), if it was made with the same settings.
    Only JSON and safetensors are read: nothing in them can run code."""
    from safetensors.torch import load_file

    tensors_path = path.with_name(TENSORS)
    again = f"delete {path.parent} to start again"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
            raise ValueError("not a pdseg pretraining state")
        if sha256_file(tensors_path) != meta.get("tensors_sha256"):
            raise ValueError(f"{TENSORS} does not belong to it (sha256 differs)")
        tensors = load_file(str(tensors_path))
    except Exception as e:  # noqa: BLE001 - any unreadable state is the same user error
        raise PdsegError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); {again}") from None

    def restore(x: Any) -> Any:
        if isinstance(x, dict):
            if set(x) == {"__tensor__"}:
                return tensors[x["__tensor__"]]
            if set(x) == {"__int_keys__"}:
                return {int(k): restore(v) for k, v in x["__int_keys__"].items()}
            return {k: restore(v) for k, v in x.items()}
        if isinstance(x, list):
            return [restore(v) for v in x]
        return x

    try:
        ck = restore(meta["state"])
    except (KeyError, ValueError, TypeError) as e:
        raise PdsegError(f"{path}: incomplete checkpoint ({e!r}); {again}") from None
    old = ck.get("settings", {})
    now = json.loads(json.dumps(settings.as_dict()))
    changed = {k: (old.get(k), v) for k, v in now.items() if old.get(k) != v}
    if changed:
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise PdsegError(f"{path}: --resume with different settings ({diff}); use the original "
                         "options, or delete the folder to start again")
    return ck


def remove_state(state_dir: Path) -> None:
    (state_dir / CHECKPOINT).unlink(missing_ok=True)
    (state_dir / TENSORS).unlink(missing_ok=True)
    try:
        state_dir.rmdir()
    except OSError:
        pass


def _lr_factor(i: int, warm: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 % (fixed by the step count, so runs are reproducible)."""
    if i < warm:
        return (i + 1) / warm
    p = min(1.0, (i - warm) / max(1, total - warm))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int) -> None:
    decay = min(EMA_DECAY, (1 + step) / (10 + step))  # LDM's warm-up: early EMA follows the model
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def _to_input(tiles: np.ndarray, dev: torch.device) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(tiles)).to(dev)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _encode(vq: Any, x: torch.Tensor) -> torch.Tensor:
    """The pre-quantisation latent, exactly as ``features.LDMFeatures`` computes it."""
    return vq.quant_conv(vq.encoder(x)).float() * float(vq.config.get("scaling_factor", 1.0) or 1.0)


def _reconstruct(vq: Any, x: torch.Tensor, quantise: bool = False) -> torch.Tensor:
    z = vq.quant_conv(vq.encoder(x))
    return vq.decode(z, force_not_quantize=not quantise).sample


def _grad_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
    dy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def _nearest(v: torch.Tensor, c: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    cn = (c * c).sum(1)
    return torch.cat([((v[i:i + chunk] @ c.T) * -2 + cn).argmin(1) for i in range(0, len(v), chunk)])


@torch.no_grad()
def _bake_normalisation(vq: Any, mean: torch.Tensor, std: torch.Tensor) -> None:
    """z' = (z - mean) / std inside ``quant_conv``; ``post_quant_conv`` undoes it on the way back."""
    q, p = vq.quant_conv, vq.post_quant_conv
    q.weight.div_(std.view(-1, 1, 1, 1))
    q.bias.sub_(mean).div_(std)
    p.bias.add_(p.weight.sum(dim=(2, 3)) @ mean)
    p.weight.mul_(std.view(1, -1, 1, 1))


@torch.no_grad()
def reconstructions(vq: Any, tiles: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """uint8 (N, H, W, 3) reconstructions of tiles through the pre-quantisation latent."""
    vq.eval()
    rec = _reconstruct(vq, _to_input(tiles, torch.device(device))).float().clamp(-1, 1)
    return torch.round((rec + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def psnr(vq: Any, tiles: np.ndarray, device: torch.device | str = "cpu", *, quantise: bool = False,
         batch: int = 8) -> float:
    """Mean per-tile reconstruction PSNR (dB, on 8-bit values) of uint8 tiles (N, H, W, 3)."""
    vq.eval()
    vals = []
    for i in range(0, len(tiles), batch):
        x = _to_input(tiles[i:i + batch], torch.device(device))
        rec = _reconstruct(vq, x, quantise=quantise).float().clamp(-1, 1)
        a = torch.round((rec + 1) * 127.5)
        b = torch.round((x + 1) * 127.5)
        mse = (a - b).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-3)
        vals.extend((10 * torch.log10(255.0 ** 2 / mse)).tolist())
    return float(np.mean(vals))


def _autocast(dev: torch.device) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")


def _tail_mean(xs: list[float]) -> float | None:
    if not xs:
        return None
    return round(float(np.mean(xs[-max(1, len(xs) // 10):])), 5)


def _thin(xs: list[float], n: int = 300) -> list[list[float]]:
    """At most ``n`` (step, mean loss) points for the record, averaged over equal bins."""
    if not xs:
        return []
    edges = np.linspace(0, len(xs), min(n, len(xs)) + 1).astype(int)
    return [[int(b), round(float(np.mean(xs[a:b])), 5)] for a, b in zip(edges[:-1], edges[1:]) if b > a]


def machine(dev: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    m: dict[str, Any] = {"device": str(dev), "cpu": cpu, "cpu_count": os.cpu_count(),
                         "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if dev.type == "cuda":
        m["gpu"] = torch.cuda.get_device_name(dev)
    return m


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def reproduce_command(s: _Settings) -> str:
    parts = ["pdseg-qupath pretrain", *s.sources, "--out OUT"]
    if s.from_spec:
        parts.append(f"--from {s.from_spec}")
    else:
        parts.append(f"--config {s.config}")
    parts += [f"--mpp {s.mpp}", f"--steps-ae {s.steps_ae}", f"--steps-unet {s.steps_unet}",
              f"--batch-size {s.batch_size}", f"--seed {s.seed}"]
    if s.image_mpp:
        parts.append(f"--image-mpp {s.image_mpp}")
    return " ".join(parts)
