"""The head's training loop on cached features: cross-entropy, AdamW, early stopping on validation mIoU.

One epoch is one pass over the cached training pixels in shuffled batches (pixel head), or over the
cached tile views in shuffled batches of whole maps, with the loss at a fresh stratified sample of each
view's labelled pixels (context head; unlabelled pixels, 255, never count). The validation pixels (or,
without a validation split, the training pixels) are scored after each epoch and the best epoch's
weights are kept. The per-epoch state is checkpointed through :class:`~pdseg_qupath.learn.resume.Resume`
so an interrupted run continues where it stopped, bit for bit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from pdseg_qupath.core.annotations import IGNORE
from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.metrics import Confusion, scores
from pdseg_qupath.learn.head import FCNHead, HeadConfig
from pdseg_qupath.learn.options import TrainOptions
from pdseg_qupath.learn.resume import Resume
from pdseg_qupath.learn.sampling import stratified_pixels, uniform_pixels
from pdseg_qupath.learn.texture import CHANNELS as TEXTURE_CHANNELS
from pdseg_qupath.learn.texture import texture_maps

EVAL_CHUNK = 65536
MAP_BATCH = 8
"""Tile views per optimiser step of the context head."""
VAL_PIXELS_PER_MAP = 4096


def class_weights(spec: Any, counts: np.ndarray) -> torch.Tensor | None:
    """Loss weight per class: None, "balanced" (inverse frequency of cached pixels), or one per class."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "balanced":
            raise PdsegError(f"class weights {spec!r}: use 'balanced' or one number per class")
        freq = counts / max(1, counts.sum())
        w = np.where(freq > 0, 1.0 / np.maximum(freq, 1e-12), 0.0)
        w = w / w[w > 0].mean()
        return torch.tensor(w, dtype=torch.float32)
    w = np.asarray(list(spec), dtype=np.float32)
    if len(w) != len(counts) or not np.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
        raise PdsegError(f"class weights {list(spec)}: need {len(counts)} finite, non-negative numbers "
                         "(not all 0), one per class")
    return torch.from_numpy(w)


def logit_adjustment(prior: np.ndarray, sampled: np.ndarray, strength: float = 1.0) -> torch.Tensor | None:
    """strength × log(prior / sampled share) per class (0 where either is empty), added to the head's logits;
    None for strength 0 (no correction)."""
    if not strength:
        return None
    s = sampled / max(1.0, float(sampled.sum()))
    ok = (prior > 0) & (s > 0)
    adj = np.zeros(len(prior), dtype=np.float64)
    adj[ok] = strength * np.log(prior[ok] / s[ok])
    return torch.tensor(adj, dtype=torch.float32)


def evaluate_pixels(head: FCNHead, data: dict[str, torch.Tensor], n_classes: int, device: str,
                    weight: torch.Tensor | None, rgb_skip: bool,
                    adjust: torch.Tensor | None = None) -> tuple[float, Confusion]:
    """Mean cross-entropy and the confusion matrix of the head on cached pixels."""
    head.eval()
    conf = Confusion(n_classes)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data["labels"]), EVAL_CHUNK):
            f = data["features"][i : i + EVAL_CHUNK].to(device).float()
            y = data["labels"][i : i + EVAL_CHUNK].to(device).long()
            rgb = data["rgb"][i : i + EVAL_CHUNK].to(device).float() if rgb_skip else None
            loss, count = _score(head.forward_pixels(f, rgb), y, weight, adjust, conf)
            total, n = total + loss, n + count
    return total / max(1, n), conf


def _score(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, adjust: torch.Tensor | None,
           conf: Confusion) -> tuple[float, int]:
    """Summed cross-entropy and labelled-pixel count of one validation batch; adds it to ``conf``."""
    if adjust is not None:
        logits = logits + adjust
    loss = F.cross_entropy(logits, y, weight=weight, ignore_index=IGNORE, reduction="sum").item()
    conf.update(y.cpu().numpy(), logits.argmax(1).cpu().numpy())
    return loss, int((y != IGNORE).sum())


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The epoch's shuffling generator; torch's global seed (dropout) is set to the same value."""
    torch.manual_seed(seed * 100003 + epoch)
    return torch.Generator().manual_seed(seed * 100003 + epoch)


def _step(optim: torch.optim.Optimizer, loss: torch.Tensor, n: int) -> float:
    """One optimizer step on ``loss``; returns the loss summed over its ``n`` samples."""
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    return loss.item() * n


def map_pixels(labels: torch.Tensor, n: int, n_classes: int, stratified: bool,
               rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ys, xs) of up to ``n`` labelled pixels of one (T, T) label map, stratified by class or uniform."""
    lab = labels.numpy()
    idx = stratified_pixels(lab, n, n_classes, rng) if stratified else uniform_pixels(lab, n, rng)
    w = lab.shape[1]
    t = torch.from_numpy(idx)
    return t // w, t % w


def map_sample_counts(data: dict[str, torch.Tensor], n: int, n_classes: int, seed: int) -> np.ndarray:
    """Labelled pixels per class that one epoch of stratified sampling draws (the sampled class shares)."""
    counts = np.zeros(n_classes, dtype=np.int64)
    for v in range(len(data["labels"])):
        ys, xs = map_pixels(data["labels"][v], n, n_classes, True, np.random.default_rng([seed, 0, v]))
        counts += np.bincount(data["labels"][v][ys, xs].numpy(), minlength=n_classes)[:n_classes]
    return counts


def _map_batch(head: FCNHead, data: dict[str, torch.Tensor], views: list[int], picks: list[tuple], device: str):
    """Logits and labels at the picked pixels of a batch of cached tile views."""
    f = data["features"][views].to(device).float()
    ys, xs = [p[0] for p in picks], [p[1] for p in picks]
    rgb = torch.cat([data["rgb"][v][y, x] for v, y, x in zip(views, ys, xs)]).to(device).float()
    y = torch.cat([data["labels"][v][yy, xx] for v, yy, xx in zip(views, ys, xs)]).to(device).long()
    tex = data["texture"][views].to(device).float() if "texture" in data else None
    return head.forward_at(f, [t.to(device) for t in ys], [t.to(device) for t in xs], rgb, tex), y


def with_texture(data: dict[str, torch.Tensor], stride: int) -> dict[str, torch.Tensor]:
    """``data`` (whole cached tile views) with their texture maps (V, 78, T/s, T/s) fp16 added, computed
    once for all epochs; the dict passed in is left as it is."""
    if "texture" in data:
        return data
    rgb = data["rgb"]
    # Filled batch by batch into one allocation: the maps are never held twice.
    out = torch.empty((len(rgb), TEXTURE_CHANNELS, rgb.shape[1] // stride, rgb.shape[2] // stride),
                      dtype=torch.float16)
    for i in range(0, len(rgb), MAP_BATCH):
        out[i : i + MAP_BATCH] = texture_maps(rgb[i : i + MAP_BATCH].permute(0, 3, 1, 2), stride).half()
    return {**data, "texture": out}


def channel_statistics(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of whole maps (V, C, h, w), summed a few views at a time
    (in float64, so that millions of fp16 values add up exactly enough)."""
    c = maps.shape[1]
    s1, s2, n = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for i in range(0, len(maps), MAP_BATCH):
        f = maps[i : i + MAP_BATCH].double().transpose(0, 1).reshape(c, -1)
        s1, s2, n = s1 + f.sum(1), s2 + (f * f).sum(1), n + f.shape[1]
    mean = s1 / max(1, n)
    var = (s2 - n * mean * mean) / max(1, n - 1)
    return mean.float(), var.clamp_min(0).sqrt().float()


def evaluate_maps(head: FCNHead, data: dict[str, torch.Tensor], n_classes: int, device: str,
                  weight: torch.Tensor | None, adjust: torch.Tensor | None = None,
                  picks: list[tuple] | None = None) -> tuple[float, Confusion]:
    """Mean cross-entropy and the confusion matrix of a context head at ``picks`` (fixed pixels per view)."""
    head.eval()
    conf = Confusion(n_classes)
    total, n = 0.0, 0
    views = list(range(len(data["labels"])))
    if picks is None:
        picks = [map_pixels(data["labels"][v], VAL_PIXELS_PER_MAP, n_classes, False, np.random.default_rng([0, v]))
                 for v in views]
    with torch.no_grad():
        for i in range(0, len(views), MAP_BATCH):
            vs = views[i : i + MAP_BATCH]
            logits, y = _map_batch(head, data, vs, [picks[v] for v in vs], device)
            loss, count = _score(logits, y, weight, adjust, conf)
            total, n = total + loss, n + count
    return total / max(1, n), conf


def _train_epoch_maps(head: FCNHead, optim: torch.optim.Optimizer, data: dict[str, torch.Tensor], n_pixels: int,
                      n_classes: int, weight: torch.Tensor | None, seed: int, epoch: int, device: str) -> float:
    head.train()
    order = torch.randperm(len(data["labels"]), generator=_epoch_generator(seed, epoch)).tolist()
    total, count = 0.0, 0
    for i in range(0, len(order), MAP_BATCH):
        vs = order[i : i + MAP_BATCH]
        picks = [map_pixels(data["labels"][v], n_pixels, n_classes, True, np.random.default_rng([seed, epoch, v]))
                 for v in vs]
        logits, y = _map_batch(head, data, vs, picks, device)
        if len(y) == 0:
            continue
        total += _step(optim, F.cross_entropy(logits, y, weight=weight, ignore_index=IGNORE), len(y))
        count += len(y)
    return total / max(1, count)


def epoch_row(epoch: int, train_loss: float, val_loss: float | None, sc: dict) -> dict:
    """One line of the training history (what the epoch table and the curve show)."""
    return {
        "epoch": epoch,
        "loss": train_loss,
        "val_loss": val_loss,
        "accuracy": sc["accuracy"],
        "miou": sc["miou"],
        "macro_dice": sc["macro_dice"],
        "per_class": {k: {"dice": v["dice"], "iou": v["iou"], "pixels": v["pixels"]} for k, v in sc["per_class"].items()},
    }


@dataclass
class FitState:
    """What one epoch hands to the next (and the checkpoint keeps)."""

    history: list[dict]
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int = 0
    best_score: float = -1.0
    stale: int = 0
    epoch: int = 0


@dataclass
class FitResult:
    head: FCNHead
    history: list[dict]
    best_epoch: int
    best: dict
    stopped_early: bool
    resumed_after: int = 0
    """The epoch an earlier, interrupted run had finished (0: started afresh)."""


def new_head(config: HeadConfig, features: torch.Tensor, seed: int) -> FCNHead:
    """A head with fresh weights (seeded) and per-channel feature statistics from the training features:
    pixels (N, C), or whole maps (V, C, h, w), summed a few views at a time."""
    torch.manual_seed(seed)
    head = FCNHead(config)
    if features.ndim == 2:
        f32 = features.float()
        head.set_normalization(f32.mean(0), f32.std(0))
        return head
    head.set_normalization(*channel_statistics(features))
    return head


def _restore(resume: Resume | None, head: FCNHead, optim: torch.optim.Optimizer, device: str,
             messages: list[str]) -> FitState:
    state = FitState([])
    if resume is None:
        return state
    try:
        ck = resume.load_checkpoint(device)
        if ck is None:
            return state
        head.load_state_dict(ck["head"])
        optim.load_state_dict(ck["optim"])
        return FitState(json.loads(ck["history"]), ck["best_state"], int(ck["best_epoch"]), float(ck["best_score"]),
                        int(ck["stale"]), int(ck["epoch"]))
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint only costs the head epochs
        messages.append(f"{resume.checkpoint}: unreadable ({exc}); training the head from epoch 1")
        return FitState([])


def _train_epoch(head: FCNHead, optim: torch.optim.Optimizer, feats: torch.Tensor, labels: torch.Tensor,
                 rgb: torch.Tensor | None, weight: torch.Tensor | None, batch: int, seed: int, epoch: int,
                 device: str) -> float:
    head.train()
    perm = torch.randperm(len(labels), generator=_epoch_generator(seed, epoch)).to(device)
    total, count = 0.0, 0
    for i in range(0, len(labels), batch):
        b = perm[i : i + batch]
        logits = head.forward_pixels(feats[b].float(), rgb[b].float() if rgb is not None else None)
        total += _step(optim, F.cross_entropy(logits, labels[b], weight=weight, ignore_index=IGNORE), len(b))
        count += len(b)
    return total / max(1, count)


def fit_head(
    head: FCNHead,
    train: dict[str, torch.Tensor],
    val: dict[str, torch.Tensor] | None,
    class_names: list[str],
    opts: TrainOptions,
    *,
    epochs: int,
    seed: int,
    device: str,
    weight: torch.Tensor | None,
    adjust: torch.Tensor | None,
    resume: Resume | None,
    messages: list[str],
    on_epoch: Callable[[dict, FitState, bool], None] | None = None,
) -> FitResult:
    """Train ``head`` for up to ``epochs`` epochs; keep the best epoch (by validation mIoU), with the
    prior shift ``adjust`` folded into its output bias. ``on_epoch(row, state, new)`` sees every epoch
    before its checkpoint is written, and first (``new`` False) those an interrupted run had finished;
    ``resume`` None writes no checkpoints."""
    k = len(class_names)
    head.to(device)
    weight = weight.to(device) if weight is not None else None
    adj_dev = adjust.to(device) if adjust is not None else None
    optim = torch.optim.AdamW(head.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    state = _restore(resume, head, optim, device, messages)
    resumed_after = state.epoch
    for row in state.history:
        if on_epoch is not None:
            on_epoch(row, state, False)
    maps = head.config.kind == "context"
    if head.config.texture:
        train = with_texture(train, head.config.stride)
        val = with_texture(val, head.config.stride) if val is not None else None
        if state.epoch == 0:  # a resumed head has its statistics in its checkpoint
            head.set_texture_normalization(*channel_statistics(train["texture"]))
    if maps:
        scored = val if val is not None else train
        picks = [map_pixels(scored["labels"][v], VAL_PIXELS_PER_MAP, k, False, np.random.default_rng([seed, 7, v]))
                 for v in range(len(scored["labels"]))]
    else:
        feats, labels = train["features"].to(device), train["labels"].to(device).long()
        rgb = train["rgb"].to(device) if head.config.rgb_skip else None
    stopped_early = False
    for epoch in range(state.epoch + 1, epochs + 1):
        if state.stale >= opts.patience:
            stopped_early = True
            break
        if maps:
            loss = _train_epoch_maps(head, optim, train, opts.pixels_per_tile, k, weight, seed, epoch, device)
            val_loss, conf = evaluate_maps(head, scored, k, device, weight, adj_dev, picks)
        else:
            loss = _train_epoch(head, optim, feats, labels, rgb, weight, opts.batch_pixels, seed, epoch, device)
            val_loss, conf = evaluate_pixels(head, val if val is not None else train, k, device, weight,
                                             head.config.rgb_skip, adj_dev)
        if not math.isfinite(loss):
            raise PdsegError(f"training stopped at epoch {epoch}: the loss is {loss} (not a finite number), so the "
                             "head learns nothing; check --class-weights and the learning rate, then train again")
        sc = scores(conf, class_names)
        row = epoch_row(epoch, loss, val_loss if val is not None else None, sc)
        state.history.append(row)
        state.epoch = epoch
        score = sc["miou"] if sc["miou"] is not None else -1.0
        if score > state.best_score + 1e-6 or state.best_state is None:
            state.best_score, state.best_epoch, state.stale = score, epoch, 0
            state.best_state = {n: v.detach().cpu().clone() for n, v in head.state_dict().items()}
        else:
            state.stale += 1 if val is not None else 0
        if on_epoch is not None:
            on_epoch(row, state, True)
        if resume is not None:  # None: nothing to resume (the cross-validation folds of train --t auto)
            resume.save_checkpoint({"head": head.state_dict(), "optim": optim.state_dict(),
                                    "history": json.dumps(state.history), "best_state": state.best_state,
                                    "best_epoch": state.best_epoch, "best_score": state.best_score,
                                    "stale": state.stale, "epoch": epoch})
    head.load_state_dict(state.best_state)
    if adjust is not None:
        with torch.no_grad():
            head.out.bias += adjust.to(head.out.bias.device)  # fold the prior shift into the head
    head.cpu().eval()
    best = next(r for r in state.history if r["epoch"] == state.best_epoch)
    stopped_early = stopped_early or (bool(state.history) and state.history[-1]["epoch"] < epochs)
    return FitResult(head, state.history, state.best_epoch, best, stopped_early, resumed_after)
