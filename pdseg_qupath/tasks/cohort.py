"""Cohort prediction: many slides into one output folder, resumable, on one or several devices.

Per slide, the files of :mod:`pdseg_qupath.outputs.slide_outputs` (``<slide>.geojson``, and on request
``<slide>.overlay.png`` and ``<slide>.classes.png``); for the run, ``summary.csv`` (one row per slide:
status, area per class and of tissue in mm², tiles, seconds, model id, error).

Why it survives interruption: every file is written to a temp file beside it and renamed, and a slide's
summary row is written only after its outputs. A slide is *done* when its row says ``ok`` (or
``skipped``, i.e. done by an earlier run) for the same model id and its GeoJSON exists; a rerun skips it
(``force`` redoes it). A killed run therefore leaves finished slides finished and nothing half written.

Engines (all run :func:`pdseg_qupath.tasks.predict.predict_job`, so the outputs are the same):

- in-process, one device;
- one worker process per local device (``devices=["cuda:0", "cuda:1"]``, or ``["cpu", "cpu"]`` for
  CPU workers), slides handed out from one shared queue, so a fast device simply takes more slides;
- a Dask cluster (:mod:`pdseg_qupath.tasks.distributed`), workers writing into the shared output folder.

Only the coordinating process writes ``summary.csv``; one run per output folder at a time (a lock file
enforces it where the file system supports ``flock``).
"""

from __future__ import annotations

import os
import queue
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.events import SILENT, Events, Step
from pdseg_qupath.core.fileio import open_no_follow
from pdseg_qupath.core.lifeline import run_as_child
from pdseg_qupath.core.names import check_name_length, check_unique, output_name
from pdseg_qupath.learn.modelio import load_model
from pdseg_qupath.learn.options import PredictOptions
from pdseg_qupath.learn.runtime import parse_devices
from pdseg_qupath.outputs.slide_outputs import geojson_model_id, geojson_path
from pdseg_qupath.outputs.tables import Summary
from pdseg_qupath.sources.base import ImageRecord, require_pixel_sizes
from pdseg_qupath.sources.inputs import expand_inputs
from pdseg_qupath.tasks.predict import open_predictor, predict_job


@dataclass
class CohortResult:
    rows: list[dict[str, Any]]
    summary: Path
    model_id: str
    seconds: float
    tiles: int = 0
    engine: str = "local"
    devices: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r.get("status") == status)

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0


class CohortProgress:
    """Progress of a cohort: all slides (with ETA), and tiles of the slides in flight with tiles/s."""

    def __init__(self, events: Events, n_slides: int, done: int = 0) -> None:
        self.t0 = time.perf_counter()
        self.tiles = 0
        self.current: dict[str, str] = {}
        self.phases: dict[str, str] = {}
        self.slides: Step = events.step("slides", total=n_slides, done=done)
        self.tile_step: Step = events.step("tiles")

    def start(self, who: str, slide: str) -> None:
        self.current[who] = slide
        self.phases.pop(who, None)
        self._describe()

    def phase(self, who: str, name: str) -> None:
        """What the slide in flight on ``who`` is busy with (detecting tissue, tiles, vectorizing, …)."""
        self.phases[who] = name
        self._describe()

    def add_tiles(self, n: int) -> None:
        self.tiles += n
        self.tile_step.advance(n)
        self._describe()

    def slide_total(self, n: int) -> None:
        """The tiles of the slide in flight (one device): its bar gets a total and an ETA."""
        self.tile_step.set_total(n, done=0)

    def slide_done(self, who: str) -> None:
        self.current.pop(who, None)
        self.phases.pop(who, None)
        self.slides.advance(1)
        self._describe()

    def close(self) -> None:
        self.tile_step.close()
        self.slides.close()

    def _describe(self) -> None:
        rate = self.tiles / max(1e-9, time.perf_counter() - self.t0)
        busy = {who: f"{slide} · {self.phases[who]}" if self.phases.get(who, "tiles") != "tiles" else slide
                for who, slide in self.current.items()}
        now = ", ".join(sorted(set(busy.values()))) or "-"
        self.tile_step.describe(f"tiles {rate:.1f}/s · {now}")


def collect_slides(inputs: Sequence[str | Path]) -> list[ImageRecord]:
    """The slides of ``inputs`` (:func:`~pdseg_qupath.sources.inputs.expand_inputs`); two slides whose
    outputs would share a file name are an error."""
    jobs = expand_inputs(inputs)
    check_unique([(str(j.path or j.uri), output_name(j.name, "")) for j in jobs])
    return jobs


@contextmanager
def _run_lock(out_dir: Path) -> Iterator[None]:
    """One run per output folder: an ``flock`` released by the OS even when the run is killed."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    f = os.fdopen(open_no_follow(out_dir / ".pdseg-run.lock"), "w")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise PdsegError(f"{out_dir}: another pdseg run is writing to this folder; wait for it, "
                             "or use another --out") from None
        for tmp in out_dir.glob(".*.tmp"):  # temp files of a killed run: never renamed, so never used
            tmp.unlink(missing_ok=True)
        yield
    finally:
        f.close()


def predict_cohort(
    inputs: Sequence[str | Path],
    model: str | Path,
    out_dir: str | Path,
    *,
    options: PredictOptions | None = None,
    force: bool = False,
    devices: str | Sequence[str] | None = "auto",
    workers: int | None = None,
    cluster: str | Any | None = None,
    events: Events = SILENT,
) -> CohortResult:
    """Predict every slide of ``inputs`` into ``out_dir``; resume an interrupted run (``force`` redoes
    finished slides); never stop for one bad slide. ``cluster``: a Dask scheduler address (or a
    ``distributed.Client``)."""
    opts = options or PredictOptions()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PdsegError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    # 1. The slides and the model.
    with events.step("finding slides and their pixel sizes"):
        jobs = collect_slides(inputs)
        if not jobs:
            raise PdsegError(f"no slides found in {', '.join(map(str, inputs))}")
        _check_pixel_sizes(jobs, opts.image_mpp)
    for j in jobs:  # before any work: a name too long to write fails now, not after predicting the slide
        check_name_length(j.name, output_name(j.name, _longest_suffix(opts)), str(out))
    m = load_model(model)
    model_path = str(Path(m.path or model).absolute())
    t0 = time.perf_counter()
    with _run_lock(out):
        # 2. What an earlier run already did.
        summary = Summary(out, m.class_map.names)
        rows: list[dict[str, Any]] = []
        todo = _resume(jobs, summary, m.model_id, out, force, rows, events)
        prog = CohortProgress(events, len(jobs), done=len(rows))

        def record(row: dict[str, Any]) -> None:
            summary.update(row)
            rows.append(row)
            if row["status"] != "ok":
                events.message(f"{row['slide']}: failed ({row.get('error')})", "error")

        # 3. The rest, on one device, several local workers or a cluster.
        engine, devs = _run(todo, m, model_path, out, opts, devices, workers, cluster, record, prog, events)
        prog.close()
    order = {j.name: i for i, j in enumerate(jobs)}
    rows.sort(key=lambda r: order.get(r["slide"], len(order)))
    tiles = sum(int(r.get("tiles") or 0) for r in rows if r.get("status") == "ok")
    return CohortResult(rows, summary.path, m.model_id, time.perf_counter() - t0, tiles, engine, list(devs))


def _resume(jobs: list[ImageRecord], summary: Summary, model_id: str, out: Path, force: bool,
            rows: list[dict[str, Any]], events: Events) -> list[ImageRecord]:
    """The slides still to do; those done by this model earlier are marked ``skipped`` in ``rows``."""
    todo = []
    for job in jobs:
        gj = geojson_path(out, job.name)
        if not force and summary.is_done(job.name, model_id, gj) and geojson_model_id(gj) == model_id:
            row = dict(summary.rows[job.name], status="skipped")
            summary.rows[job.name] = row
            rows.append(row)
        else:
            todo.append(job)
    summary.write()
    if rows:
        events.message(f"{len(rows)} slide(s) already done for model {model_id[:8]}: skipped (--force redoes them)")
    return todo


def _check_pixel_sizes(jobs: list[ImageRecord], image_mpp: float | None) -> None:
    """Without --image-mpp, every slide must record its pixel size: one message before any work, not one
    failure per slide."""
    if image_mpp is not None:
        return
    from pdseg_qupath.core.slide import probe

    readable = []
    for j in jobs:
        if j.mpp is None and j.path is not None and not j.error:
            try:
                j.mpp = probe(j.path)[2]
            except Exception:  # noqa: BLE001 - an unreadable slide is reported when it is predicted
                continue
        readable.append(j)
    require_pixel_sizes(readable, None)


def _longest_suffix(opts: PredictOptions) -> str:
    return ".overlay.png" if opts.overlay or opts.classmap else ".geojson"


def _run(todo: list[ImageRecord], m: Any, model_path: str, out: Path, opts: PredictOptions, devices: Any,
         workers: int | None, cluster: Any, record: Callable[[dict], None], prog: CohortProgress,
         events: Events) -> tuple[str, list[str]]:
    if cluster is not None:
        from pdseg_qupath.tasks.distributed import run_on_cluster

        return "dask", run_on_cluster(cluster, todo, model_path, out, opts, record, prog)
    devs = parse_devices(devices, workers)
    if len(devs) == 1:
        if todo:
            predictor = open_predictor(m, devs[0], opts.batch_size, events)
            for job in todo:
                prog.start("main", job.name)
                record(predict_job(job, predictor, out, opts, on_tiles=prog.add_tiles, on_total=prog.slide_total,
                                   on_phase=lambda name: prog.phase("main", name)))
                prog.slide_done("main")
        return "local", devs
    if todo:
        _run_processes(todo, model_path, devs, out, opts, record, prog)
    return "processes", devs


# ------------------------------------------------------------------------------- local processes


def _device_worker(wid: int, device: str, model_path: str, out_dir: str, opts: dict, threads: int,
                   jobs, results) -> None:
    """Worker process: load the model on ``device``, then take slides from the shared queue until None.
    Started through :func:`~pdseg_qupath.core.lifeline.run_as_child`, it dies with the coordinator, so
    nothing is written once the run lock is gone."""
    try:
        import torch

        torch.set_num_threads(max(1, threads))
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        predictor = open_predictor(model_path, device, opts["batch_size"])
    except BaseException as exc:  # noqa: BLE001 - reported to the coordinator
        results.put(("fatal", wid, f"{device}: {exc}"))
        return
    options = PredictOptions(**opts)
    while True:
        item = jobs.get()
        if item is None:
            results.put(("exit", wid, None))
            return
        job = ImageRecord(**item)
        results.put(("start", wid, job.name))
        row = predict_job(job, predictor, out_dir, options, on_tiles=lambda n: results.put(("tiles", wid, n)),
                          on_phase=lambda name: results.put(("phase", wid, name)))
        results.put(("done", wid, row))


def _run_processes(todo: list[ImageRecord], model_path: str, devices: list[str], out: Path, opts: PredictOptions,
                   record: Callable[[dict], None], prog: CohortProgress) -> None:
    """One spawned process per device, one shared queue of slides (dynamic sharing)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    for job in todo:
        jobs.put(asdict(job))
    n_cpu = sum(1 for d in devices if d == "cpu")
    threads = max(1, (os.cpu_count() or 1) // max(1, n_cpu)) if n_cpu else 1
    procs = []
    for wid, dev in enumerate(devices):
        jobs.put(None)
        p = ctx.Process(target=run_as_child, args=(os.getpid(), f"{__name__}:_device_worker", wid, dev, model_path,
                                                   str(out), asdict(opts), threads, jobs, results), daemon=True)
        p.start()
        procs.append(p)
    try:
        _collect(procs, devices, results, {j.name for j in todo}, record, prog)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()


def _collect(procs: list, devices: list[str], results, left: set[str], record: Callable[[dict], None],
             prog: CohortProgress) -> None:
    """Record the workers' rows until every slide is done or no worker is left."""
    in_flight: dict[int, str] = {}
    alive = set(range(len(procs)))
    fatal: list[str] = []
    while left and alive:
        try:
            kind, wid, payload = results.get(timeout=1.0)
        except queue.Empty:
            for wid in list(alive):
                if not procs[wid].is_alive():
                    alive.discard(wid)
                    name = in_flight.pop(wid, None)
                    if name is not None:
                        left.discard(name)
                        record({"slide": name, "status": "failed", "device": devices[wid],
                                "error": f"worker on {devices[wid]} died (exit code {procs[wid].exitcode})"})
                        prog.slide_done(str(wid))
            continue
        if kind == "tiles":
            prog.add_tiles(payload)
        elif kind == "phase":
            prog.phase(str(wid), payload)
        elif kind == "start":
            in_flight[wid] = payload
            prog.start(str(wid), payload)
        elif kind == "done":
            in_flight.pop(wid, None)
            left.discard(payload["slide"])
            record(payload)
            prog.slide_done(str(wid))
        elif kind in ("fatal", "exit"):
            alive.discard(wid)
            if kind == "fatal":
                fatal.append(payload)
    if left and fatal and len(fatal) == len(procs):
        raise PdsegError(f"no worker could load the model: {fatal[0]}")
    for name in sorted(left):  # every worker gone before these slides were taken
        record({"slide": name, "status": "failed", "device": "",
                "error": "no worker left to predict it: " + (fatal[0] if fatal else "workers exited")})
