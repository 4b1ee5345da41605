"""Where the work runs: device choice and out-of-memory back-off, once for every command.

- :func:`resolve_device` turns ``--device`` into one torch device name; :func:`parse_devices` turns
  ``--devices``/``--workers`` into the list of devices that batch prediction runs one worker on each.
- :class:`BatchRunner` runs a function over batches and halves the batch size when the GPU runs out of
  memory, so a model that fits at batch 8 on one card still runs, more slowly, on a smaller one.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from pdseg_qupath.core.errors import PdsegError


def resolve_device(device: str | None) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; asking for a missing GPU is an error."""
    d = (device or "auto").lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise PdsegError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu (or auto)")
    if d != "cpu" and not d.startswith("cuda"):
        raise PdsegError(f"--device {device}: expected auto, cpu or cuda")
    return d


def parse_devices(devices: str | Sequence[str] | None, workers: int | None = None) -> list[str]:
    """``auto`` → every visible GPU (else one CPU), ``0,1`` → cuda:0, cuda:1, ``cpu``; ``workers`` repeats
    a single device (e.g. two CPU worker processes)."""
    if devices is None or devices == "" or devices == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        out = [f"cuda:{i}" for i in range(n)] or ["cpu"]
    elif isinstance(devices, str):
        out = []
        for part in (p.strip() for p in devices.split(",") if p.strip()):
            out.append(f"cuda:{part}" if part.isdigit() else part)
    else:
        out = list(devices)
    if workers and workers > 1:
        if len(out) != 1:
            raise PdsegError("--workers repeats one device; with several --devices there is one worker per device")
        out = out * workers
    return out


def is_oom(exc: BaseException) -> bool:
    """A GPU (or allocator) out-of-memory error, whatever torch version raised it."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


class BatchRunner:
    """Run ``fn`` over items in batches; on out-of-memory, halve the batch size and retry that batch.

    The smaller size is kept for the rest of the run. At batch size 1 the error becomes a
    :class:`~pdseg_qupath.core.errors.PdsegError` that says what to try. Nothing is lost: a batch either
    completes or is retried whole. ``on_backoff(new_size)`` is told of every halving.
    """

    def __init__(self, batch_size: int, on_backoff: Callable[[int], None] | None = None) -> None:
        self.batch_size = max(1, int(batch_size))
        self.on_backoff = on_backoff
        self.backoffs = 0

    def __call__(self, fn: Callable[[list], list], items: list) -> list:
        """``fn(batch) -> list`` of per-item results; returns the results of all items, in order."""
        out: list = []
        i = 0
        while i < len(items):
            batch = items[i : i + self.batch_size]
            try:
                out.extend(fn(batch))
            except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not is_oom(exc):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if self.batch_size == 1:
                    raise PdsegError(
                        "out of GPU memory even at batch size 1; close other GPU programs, use a smaller "
                        "backbone, or run with --device cpu"
                    ) from None
                self.batch_size = max(1, self.batch_size // 2)
                self.backoffs += 1
                if self.on_backoff is not None:
                    self.on_backoff(self.batch_size)
                continue
            i += len(batch)
        return out

