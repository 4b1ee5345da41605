"""Streaming prediction of one region: read → infer → stitch/vectorize as overlapping stages.

Why: on a GPU the backbone is the only stage worth waiting for. Decoding JPEG tiles, blending logits and
vectorizing polygons are CPU work that, run inline, leaves the GPU idle between batches. Here

- **reader threads** decode the next batches while the current one is on the device (tifffile /
  imagecodecs and PIL release the GIL while decoding); on CUDA the batch lands in pinned memory so the
  host-to-device copy is asynchronous (``non_blocking``);
- the **calling thread** runs the backbone and the head, batch after batch;
- one **post-processing thread** blends the logits strip by strip and hands every final strip to
  ``on_strip`` (tissue masking, overlay, vectorizing), while the next batch computes.

All queues are bounded (``prefetch`` batches of tiles, ``prefetch`` batches of logits), so host memory
is a few batches plus one tile row of the stitcher, whatever the slide size. The tiles and their order
are exactly those of a plain loop over the :class:`~pdseg_qupath.learn.stitch.StripStitcher` rows, so
the results are identical to it.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from pdseg_qupath.learn.stitch import Strip, StripStitcher

Origins = Sequence[tuple[int, int]]
ReadFn = Callable[[Origins], object]
"""Tiles for a batch of region tile origins: uint8 (B, T, T, 3), as numpy or a (pinned) torch tensor."""
InferFn = Callable[[object, Origins], np.ndarray]
"""Logits (B, K, T, T) float32 for the tiles ``ReadFn`` returned and their origins."""

_END_ROW = object()
_DONE = object()


@dataclass(frozen=True)
class Batch:
    row: int
    origins: tuple[tuple[int, int], ...]


def plan(st: StripStitcher, keep: Callable[[int, int], bool] | None, batch_size: int) -> Iterator[Batch | int]:
    """The work in stitching order: :class:`Batch` items, and after each tile row its index (an ``int``)."""
    bs = max(1, batch_size)
    for j, y in enumerate(st.row_ys):
        origins = [(x, y) for x in st.col_xs if keep is None or keep(x, y)]
        for i in range(0, len(origins), bs):
            yield Batch(j, tuple(origins[i : i + bs]))
        yield j


def count_tiles(width: int, height: int, tile: int, overlap: int, keep: Callable[[int, int], bool] | None = None,
                offset: tuple[int, int] = (0, 0)) -> int:
    """How many tiles :func:`run_region` will infer (for progress bars and ETAs)."""
    st = StripStitcher(width, height, 1, tile, overlap, offset)  # only its grid is used
    if keep is None:
        return len(st.col_xs) * len(st.row_ys)
    return sum(1 for y in st.row_ys for x in st.col_xs if keep(x, y))


class _Stages:
    """The stitcher and the stage functions of one run, each timed into ``clock`` (busy seconds)."""

    def __init__(self, st: StripStitcher, read: ReadFn, infer: InferFn, on_strip: Callable[[Strip], None],
                 clock: dict[str, float]) -> None:
        self.st, self._read, self._infer, self._on_strip, self.clock = st, read, infer, on_strip, clock
        for k in ("read", "infer", "post", "wait"):
            clock.setdefault(k, 0.0)
        self._lock = threading.Lock()

    def timed(self, stage: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            dt = time.perf_counter() - t0
            with self._lock:
                self.clock[stage] += dt

    def read(self, origins: Origins):
        return self.timed("read", self._read, origins)

    def infer(self, tiles, origins: Origins) -> np.ndarray:
        return self.timed("infer", self._infer, tiles, origins)

    def add(self, origins: Origins, logits: np.ndarray) -> None:
        """Blend a batch into the stitcher (post-processing stage)."""
        def add() -> None:
            for (x, y), lg in zip(origins, logits):
                self.st.add(x, y, lg)
        self.timed("post", add)

    def finish_row(self) -> None:
        """Close a tile row and hand its final strip on (post-processing stage)."""
        def finish() -> None:
            strip = self.st.finish_row()
            if strip is not None:
                self._on_strip(strip)
        self.timed("post", finish)


def run_region(
    width: int,
    height: int,
    n_classes: int,
    tile: int,
    overlap: int,
    read: ReadFn,
    infer: InferFn,
    on_strip: Callable[[Strip], None],
    *,
    keep: Callable[[int, int], bool] | None = None,
    batch_size: int = 8,
    offset: tuple[int, int] = (0, 0),
    on_tiles: Callable[[int], None] | None = None,
    io_threads: int = 2,
    prefetch: int = 3,
    stage_seconds: dict[str, float] | None = None,
) -> None:
    """Predict a ``width`` × ``height`` region and call ``on_strip`` with each final strip, in order.

    ``io_threads=0`` runs everything inline in the calling thread (the reference behaviour, and the
    simplest to debug). An exception in any stage stops the others and is raised here.
    ``stage_seconds`` (if given) receives the busy seconds of each stage: ``read`` (summed over the
    reader threads), ``infer``, ``post`` (stitching and ``on_strip``), and ``wait`` (the calling thread
    waiting for tiles: the device idles then).
    """
    st = StripStitcher(width, height, n_classes, tile, overlap, offset)
    stages = _Stages(st, read, infer, on_strip, stage_seconds if stage_seconds is not None else {})
    work = plan(st, keep, batch_size)
    if io_threads <= 0:
        for item in work:
            if isinstance(item, Batch):
                stages.add(item.origins, stages.infer(stages.read(item.origins), item.origins))
                if on_tiles is not None:
                    on_tiles(len(item.origins))
            else:
                stages.finish_row()
        return
    _run_threaded(work, stages, on_tiles, io_threads, prefetch)


def _run_threaded(work: Iterator[Batch | int], stages: _Stages, on_tiles: Callable[[int], None] | None,
                  io_threads: int, prefetch: int) -> None:
    """Readers ahead in a thread pool, inference here, stitching in one post-processing thread."""
    post_q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    failure: list[BaseException] = []
    stop = threading.Event()

    def post() -> None:
        try:
            while True:
                item = post_q.get()
                if item is _DONE:
                    return
                if stop.is_set():
                    continue  # drain so the producer never blocks
                if item is _END_ROW:
                    stages.finish_row()
                else:
                    stages.add(*item)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            failure.append(exc)
            stop.set()
            while post_q.get() is not _DONE:
                pass

    poster = threading.Thread(target=post, name="pdseg-post", daemon=True)
    poster.start()
    try:
        with ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="pdseg-read") as pool:
            for item, fut in _read_ahead(work, pool, stages, prefetch):
                if stop.is_set():
                    break
                if fut is None:
                    post_q.put(_END_ROW)
                    continue
                tiles = stages.timed("wait", fut.result)
                post_q.put((item.origins, stages.infer(tiles, item.origins)))
                if on_tiles is not None:
                    on_tiles(len(item.origins))
    except BaseException:
        stop.set()
        raise
    finally:
        post_q.put(_DONE)
        poster.join()
    if failure:
        raise failure[0]


def _read_ahead(work: Iterator[Batch | int], pool: ThreadPoolExecutor, stages: _Stages,
                prefetch: int) -> Iterator[tuple[Batch | int, Future | None]]:
    """The work items in order, each batch with the future of its tiles; up to ``prefetch`` reads ahead."""
    pending: list[tuple[Batch | int, Future | None]] = []
    it = iter(work)
    exhausted = False

    def refill() -> None:
        nonlocal exhausted
        while not exhausted and sum(1 for _, f in pending if f is not None) < prefetch:
            try:
                item = next(it)
            except StopIteration:
                exhausted = True
                return
            pending.append((item, pool.submit(stages.read, item.origins) if isinstance(item, Batch) else None))

    try:
        refill()
        while pending:
            first = pending.pop(0)
            refill()  # the next reads start before this batch is used
            yield first
    finally:
        for _, f in pending:
            if f is not None:
                f.cancel()
