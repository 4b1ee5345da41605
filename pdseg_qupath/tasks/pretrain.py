"""``pretrain``: fit (or fine-tune) the LDM backbone to the user's own unlabelled H&E, as a backbone folder.

The steps (the engine, its two stages and why, is :mod:`pdseg_qupath.learn.pretrain`):

1. **Where.** The backbone folder and, beside it, ``<out>.pretrain-state/`` for an interrupted run.
2. **Plan.** The starting backbone (``--from``) or a random one, and every setting of the run.
3. **Tiles.** A fixed, seeded pool of tissue tiles from the sources, with held-out tiles.
4. **Train.** Autoencoder, then UNet; checkpointed, and resumable bit for bit with ``--resume``.
5. **Save.** The backbone folder, its record (``pretrain/record.json``), loss curves and reconstructions.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from pdseg_qupath.backbone.fast_encoder import carry_fast_encoder
from pdseg_qupath.backbone.folder import MANIFEST, save_backbone
from pdseg_qupath.backbone.model import build_backbone
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.events import SILENT, Events
from pdseg_qupath.core.fileio import write_json
from pdseg_qupath.learn.pretrain import (
    CHECKPOINT,
    SAVE_DTYPES,
    PretrainRun,
    load_checkpoint,
    plan_run,
    reconstructions,
    remove_state,
)
from pdseg_qupath.learn.pretrain_data import collect_images, sample_pool
from pdseg_qupath.outputs.plots import write_loss_plots, write_recon_grid


def pretrain(
    sources: Sequence[str | Path],
    out_dir: str | Path,
    *,
    config: str | None = None,
    from_spec: str | None = None,
    mpp: float = 0.5,
    steps_ae: int = 3000,
    steps_unet: int = 3000,
    batch_size: int | None = None,
    device: str = "auto",
    resume: bool = False,
    seed: int = 0,
    image_mpp: float | None = None,
    pool_size: int = 1024,
    heldout: int = 32,
    ae_crop: int | None = None,
    unet_crop: int | None = None,
    lr_ae: float | None = None,
    lr_unet: float | None = None,
    stain_sigma: float = 0.15,
    stain_bias: float = 0.03,
    checkpoint_every: int = 100,
    on_step: Callable[[str, int], None] | None = None,
    save_dtype: str = "float32",
    events: Events = SILENT,
) -> dict[str, Any]:
    """Pretrain (or, with ``from_spec``, fine-tune) a backbone on unlabelled slides; returns the record.

    ``config`` defaults to ``small``, or to the config of ``from_spec``. ``ae_crop`` defaults to half the
    tile (the autoencoder is fully convolutional, so smaller crops train it at the same quality per pixel
    for less compute); ``unet_crop`` defaults to the full tile, the size features are extracted at.
    ``on_step(stage, step)`` is called after every step (progress hooks, tests). ``save_dtype``
    "float16" halves the folder (weights are upcast to fp32 on load; features change by ~2e-4 relative).
    """
    # 1. Where the backbone and the run's state go.
    out = Path(out_dir).expanduser()
    state_dir = out.with_name(out.name + ".pretrain-state")
    done = _check_out(out, state_dir, resume, events)
    if done is not None:
        return done
    if save_dtype not in SAVE_DTYPES:
        raise PdsegError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")

    # 2. The starting backbone and the settings.
    with events.step(f"loading backbone {from_spec}" if from_spec else "preparing the run"):
        plan = plan_run([str(Path(s).expanduser().resolve()) for s in sources], config=config, from_spec=from_spec,
                        mpp=mpp, image_mpp=image_mpp, steps_ae=steps_ae, steps_unet=steps_unet,
                        batch_size=batch_size, device=device, seed=seed, pool_size=pool_size, heldout=heldout,
                        ae_crop=ae_crop, unet_crop=unet_crop, lr_ae=lr_ae, lr_unet=lr_unet, stain_sigma=stain_sigma,
                        stain_bias=stain_bias)
        ckpt = load_checkpoint(state_dir / CHECKPOINT, plan.settings) if (state_dir / CHECKPOINT).exists() else None
    t_start = time.time()
    how = f"fine-tuning {from_spec}" if not plan.fresh else "from random weights"
    events.message(f"pretraining {plan.config.name} on {plan.device} ({how}); state in {state_dir}")

    # 3. The tile pool.
    step = events.step("reading tissue tiles")
    refs = collect_images(sources)
    pool = sample_pool(refs, mpp=mpp, tile=plan.config.tile_size, n_train=pool_size, n_heldout=heldout, seed=seed,
                       image_mpp=image_mpp, progress=lambda i, n: step.set_total(n, done=i))
    step.close()
    events.message(f"tile pool: {pool.summary()}")

    # 4. Train.
    with events.step("building the backbone"):
        bb = plan.start if plan.start is not None else build_backbone(plan.config, "cpu",
                                                                      spec=f"pretrain:{plan.config.name}")
    run = PretrainRun(bb, pool, plan.settings, plan.device, plan.fresh, state_dir, checkpoint_every, on_step, events)
    if ckpt is not None:
        run.restore(ckpt)
        events.message(f"resumed at stage {run.stage}, step {run.step}", "done")
    run.train()

    # 5. Save the backbone, its record and figures; a fine-tune that kept the autoencoder keeps its fast encoder.
    with events.step("saving the backbone and its figures"):
        record = _save(run, pool, out, save_dtype, time.time() - t_start, len(refs))
    if plan.start is not None and not plan.fresh:
        record["fast_encoder"] = carry_fast_encoder(plan.start, out)
        write_json(out / "pretrain" / "record.json", record)
        events.message(record["fast_encoder"])
    remove_state(state_dir)
    events.message(f"backbone written to {out} (sha256 {record['sha256'][:12]}); "
                   f"held-out PSNR {record['ae'].get('psnr_db')} dB", "done")
    return record


def _save(run: PretrainRun, pool: Any, out: Path, save_dtype: str, wall: float, n_images: int) -> dict[str, Any]:
    """The backbone folder (weights in ``save_dtype``), ``pretrain/record.json``, loss curves, reconstructions."""
    record = run.record(pool, wall, refs_count=n_images)
    record["weights_dtype"] = save_dtype
    final = run.final_backbone()
    if save_dtype != "float32":  # a cast copy: the figures below still use the fp32 models
        final = copy.deepcopy(final).to(SAVE_DTYPES[save_dtype])
    save_backbone(final, out, record, random_weights=False)
    figures = out / "pretrain"
    write_loss_plots(run.hist, figures)
    tiles = pool.heldout[:8] if len(pool.heldout) else pool.train[:8]
    write_recon_grid(tiles, reconstructions(run.vq, tiles, run.dev), figures / "reconstructions.png")
    write_json(figures / "record.json", record)
    record["sha256"] = json.loads((out / MANIFEST).read_text())["sha256"]
    return record


def _check_out(out: Path, state_dir: Path, resume: bool, events: Events) -> dict[str, Any] | None:
    """Refuse to overwrite a backbone or to restart a run silently; the record of a finished run on resume."""
    if (out / MANIFEST).is_file():
        if resume:
            events.message(f"{out}: pretraining already finished; nothing to resume", "done")
            return json.loads((out / MANIFEST).read_text()).get("record", {})
        raise PdsegError(f"{out}: a backbone already exists there; choose another --out (pdseg never "
                         "overwrites a backbone)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PdsegError(f"{out}: exists and is not an empty folder; choose another --out")
    ckpt = state_dir / CHECKPOINT
    if ckpt.exists() and not resume:
        raise PdsegError(f"{out}: an unfinished pretraining run is in {state_dir}; pass --resume to "
                         "continue it, or delete that folder to start again")
    if resume and not ckpt.exists():
        events.message(f"no checkpoint in {state_dir}; starting a new run", "warn")
    return None
