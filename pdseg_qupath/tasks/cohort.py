"""Cohort prediction: many slides into one output folder, resumable, on one or several devices.

``DIR/<slide>.geojson`` (QuPath GeoJSON), optionally ``DIR/<slide>.classes.png`` (downsampled class
map, palette index = class, 255 = no prediction) and ``DIR/<slide>.overlay.png``, and ``DIR/summary.csv``
(one row per slide: status, area per class and of tissue in mm², tiles, seconds, model id, error).

Why it survives interruption: every file is written to a temp file beside it and renamed, and a slide's
summary row is written only after its outputs. A slide is *done* when its row says ``ok`` (or
``skipped``, i.e. done by an earlier run) for the same model id and its GeoJSON exists; a rerun skips it
(``--force`` redoes it). A killed run therefore leaves finished slides finished and nothing half written.

Engines (all share :func:`predict_job`, so outputs are the same whichever runs them):

- in-process, one device;
- one worker process per local device (``devices=["cuda:0", "cuda:1"]``, or ``["cpu", "cpu"]`` for
  CPU workers), slides handed out from one shared queue, so a fast device simply takes more slides;
- a Dask cluster (:mod:`pdseg_qupath.tasks.distributed`), workers writing into the shared output folder.

Only the coordinating process writes ``summary.csv``; one run per output folder at a time (a lock file
enforces it where the file system supports ``flock``).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import queue
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.core.fileio import atomic_write_bytes

SUMMARY = "summary.csv"
DONE = ("ok", "skipped")
BASE_FIELDS = ["slide", "status", "tissue_mm2"]
TAIL_FIELDS = ["objects", "tiles", "seconds", "model_id", "device", "error", "path"]
NOT_IMAGES = {".geojson", ".json", ".csv", ".txt", ".xml", ".md", ".qpdata", ".png.aux", ".log", ".py"}


# ------------------------------------------------------------------------------------------ inputs


@dataclass
class SlideJob:
    """One slide to predict; plain data so it pickles to worker processes and cluster workers."""

    name: str
    path: str
    mpp: float | None = None
    error: str | None = None

    @property
    def stem(self) -> str:
        from pdseg_qupath.sources.qupath.names import safe_filename

        return safe_filename(self.name)


def collect_slides(inputs: Sequence[str | Path]) -> list[SlideJob]:
    """Slides from files, folders (their images, not recursive), globs (``**`` recursive) and ``.qpproj``.

    A ``.qpproj`` is read as JSON (no QuPath needed): every image, with the pixel size QuPath recorded.
    Duplicate slide names would overwrite each other's outputs, so they are an error.
    """
    from pdseg_qupath.sources.qupath.folder import IMAGE_SUFFIXES

    jobs: list[SlideJob] = []
    seen: set[str] = set()
    for raw in inputs:
        s = str(raw)
        p = Path(s).expanduser()
        if any(ch in s for ch in "*?["):
            matches = sorted(glob.glob(str(p), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file() and Path(m).suffix.lower() not in NOT_IMAGES]
            if not files:
                raise PdsegError(f"{s}: no files match this pattern")
            found = [SlideJob(f.name, str(f.absolute())) for f in files]
        elif p.suffix == ".qpproj" or (p.is_dir() and (p / "project.qpproj").exists()):
            found = _qpproj_jobs(p)
        elif p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise PdsegError(f"{p}: no slides in this folder ({', '.join(IMAGE_SUFFIXES)})")
            found = [SlideJob(f.name, str(f.absolute())) for f in files]
        elif p.is_file():
            found = [SlideJob(p.name, str(p.absolute()))]
        else:
            raise PdsegError(f"{s}: no such slide, folder, pattern or QuPath project")
        for job in found:
            if job.path in seen:
                continue
            seen.add(job.path)
            jobs.append(job)
    names: dict[str, list[str]] = {}
    for j in jobs:
        names.setdefault(j.stem, []).append(j.path)
    clash = {n: ps for n, ps in names.items() if len(ps) > 1}
    if clash:
        n, ps = next(iter(clash.items()))
        raise PdsegError(f"two slides share the output name {n!r} ({ps[0]} and {ps[1]}); "
                         "predict them into different --out folders")
    return jobs


def _qpproj_jobs(path: Path) -> list[SlideJob]:
    from pdseg_qupath.sources.qupath.qpproj import mpp_from_builder, path_from_file_uri, project_file, server_problem, uri_from_builder

    qp = project_file(path)
    try:
        data = json.loads(qp.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PdsegError(f"{qp}: cannot read this QuPath project ({e})") from None
    jobs = []
    for i, img in enumerate(data.get("images", []) if isinstance(data, dict) else []):
        builder = img.get("serverBuilder") if isinstance(img, dict) else None
        name = str(img.get("imageName") or f"image #{i + 1}") if isinstance(img, dict) else f"image #{i + 1}"
        uri = uri_from_builder(builder)
        local = path_from_file_uri(uri) if uri else None
        job = SlideJob(name, str(local) if local else (uri or ""), mpp_from_builder(builder))
        problem = server_problem(builder)
        if problem:
            job.error = problem
        elif local is None:
            job.error = f"not a local file ({uri})"
        jobs.append(job)
    if not jobs:
        raise PdsegError(f"{qp}: the project has no images")
    return jobs


def parse_devices(devices: str | Sequence[str] | None, workers: int | None = None) -> list[str]:
    """``auto`` → every visible GPU (else one CPU), ``0,1`` → cuda:0, cuda:1, ``cpu``; ``workers`` repeats
    a single device (e.g. two CPU worker processes)."""
    if devices is None or devices == "" or devices == "auto":
        import torch

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


# ----------------------------------------------------------------------------------------- options


@dataclass
class CohortOptions:
    batch_size: int = 8
    tissue_only: bool = True
    image_mpp: float | None = None
    simplify: float = 1.0
    min_area_um2: float = 0.0
    overlay: bool = False
    classmap: bool = False
    overlay_max: int = 2048
    io_threads: int = 2
    force: bool = False


# --------------------------------------------------------------------------------------- one slide


def predict_job(job: SlideJob, predictor, out_dir: str | Path, options: CohortOptions,
                on_tiles: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Predict one slide and write its outputs atomically; returns its summary row (never raises
    for a bad slide: the error goes into the row, so the cohort goes on)."""
    from pdseg_qupath.tasks.predict import PredictOptions, overlay_background, predict_image
    from pdseg_qupath.sources.qupath.geojson import write_geojson
    from pdseg_qupath.core.slide import open_slide

    out = Path(out_dir)
    m = predictor.model
    row: dict[str, Any] = {"slide": job.name, "status": "failed", "model_id": m.model_id, "path": job.path,
                           "device": str(predictor.device)}
    t0 = time.perf_counter()
    if job.error:
        row["error"] = job.error
        return row
    try:
        with open_slide(job.path, mpp=job.mpp, fallback_mpp=options.image_mpp) as slide:
            opts = PredictOptions(batch_size=options.batch_size, tissue_only=options.tissue_only,
                                  simplify=options.simplify, min_area_um2=options.min_area_um2,
                                  overlay=options.overlay or options.classmap, overlay_max=options.overlay_max,
                                  io_threads=options.io_threads)
            pred = predict_image(slide, predictor, options=opts, on_tiles=on_tiles)
            if options.classmap and pred.overlay is not None:
                write_classmap_png(out / f"{job.stem}.classes.png", pred.overlay.labels, m.class_map)
            if options.overlay and pred.overlay is not None:
                pred.overlay.render(overlay_background(slide, pred.region, pred.overlay), m.class_map,
                                    out / f"{job.stem}.overlay.png", title=f"{job.name} - pdseg {m.name}")
        write_geojson(out / f"{job.stem}.geojson", pred.annotations)
    except PdsegError as exc:
        row["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad slide must not stop a cohort
        row["error"] = f"{job.path}: {type(exc).__name__}: {exc}"
    else:
        row.update(status="ok", tissue_mm2=f"{pred.tissue_mm2:.6f}", objects=len(pred.annotations),
                   tiles=pred.tiles, error="; ".join(pred.messages))
        row.update({f"{name}_mm2": f"{v:.6f}" for name, v in pred.class_mm2.items()})
    row["seconds"] = f"{time.perf_counter() - t0:.2f}"
    return row


def write_classmap_png(path: Path, labels: np.ndarray, class_map) -> Path:
    """A palette PNG whose pixel value is the class index (255: no prediction), coloured like QuPath."""
    from PIL import Image

    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    pal = [0] * 768
    for i, c in enumerate(class_map.classes):
        pal[3 * i : 3 * i + 3] = list(c.color)
    pal[765:768] = [255, 255, 255]
    img.putpalette(pal)
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=255)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ----------------------------------------------------------------------------------------- summary


class Summary:
    """``summary.csv``: read once, updated row by row, rewritten atomically after every slide."""

    def __init__(self, out_dir: Path, class_names: Sequence[str]) -> None:
        self.path = Path(out_dir) / SUMMARY
        self.rows: dict[str, dict[str, Any]] = {}
        self.fields = BASE_FIELDS + [f"{n}_mm2" for n in class_names] + TAIL_FIELDS
        if self.path.exists():
            try:
                with open(self.path, newline="", encoding="utf-8") as f:
                    reader = csv.DictReader(f)
                    for name in reader.fieldnames or []:
                        if name not in self.fields:
                            self.fields.insert(len(self.fields) - len(TAIL_FIELDS), name)
                    for r in reader:
                        if r.get("slide"):
                            self.rows[r["slide"]] = dict(r)
            except (OSError, csv.Error, UnicodeDecodeError) as e:
                raise PdsegError(f"{self.path}: cannot read the summary of the earlier run ({e}); "
                                 "move it away to start afresh") from None

    def is_done(self, job: SlideJob, model_id: str, out_dir: Path) -> bool:
        r = self.rows.get(job.name)
        return bool(r and r.get("status") in DONE and r.get("model_id") == model_id
                    and (out_dir / f"{job.stem}.geojson").is_file())

    def update(self, row: dict[str, Any]) -> None:
        self.rows[row["slide"]] = {k: ("" if v is None else v) for k, v in row.items()}
        for k in row:
            if k not in self.fields:
                self.fields.insert(len(self.fields) - len(TAIL_FIELDS), k)
        self.write()

    def write(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.fields, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows.values():
            w.writerow({k: r.get(k, "") for k in self.fields})
        atomic_write_bytes(self.path, buf.getvalue().encode("utf-8"))


@contextmanager
def _run_lock(out_dir: Path) -> Iterator[None]:
    """One run per output folder: an ``flock`` released by the OS even when the run is killed."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    f = open(out_dir / ".pdseg-run.lock", "w")
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


# -------------------------------------------------------------------------------------------- runs


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
    """Rich progress for a cohort: all slides (with ETA), and tiles of the slides in flight with tiles/s."""

    def __init__(self, progress, n_slides: int) -> None:
        self.p = progress
        self.t0 = time.perf_counter()
        self.tiles = 0
        self.current: dict[str, str] = {}
        if progress is not None:
            self.slides = progress.add_task("slides", total=n_slides)
            self.tile_task = progress.add_task("tiles", total=None)

    def start(self, who: str, slide: str) -> None:
        self.current[who] = slide
        self._describe()

    def add_tiles(self, n: int) -> None:
        self.tiles += n
        if self.p is not None:
            self.p.advance(self.tile_task, n)
            self._describe()

    def slide_done(self, who: str) -> None:
        self.current.pop(who, None)
        if self.p is not None:
            self.p.advance(self.slides, 1)
            self._describe()

    def _describe(self) -> None:
        if self.p is None:
            return
        rate = self.tiles / max(1e-9, time.perf_counter() - self.t0)
        now = ", ".join(sorted(set(self.current.values()))) or "-"
        self.p.update(self.tile_task, description=f"tiles {rate:.1f}/s · {now}")


def cohort_progress(console=None):
    """The progress display the CLI shows for ``predict`` over many slides."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)


def predict_cohort(
    inputs: Sequence[str | Path],
    model: str | Path,
    out_dir: str | Path,
    *,
    options: CohortOptions | None = None,
    devices: str | Sequence[str] | None = "auto",
    workers: int | None = None,
    cluster: str | Any | None = None,
    progress=None,
    console=None,
) -> CohortResult:
    """Predict every slide of ``inputs`` into ``out_dir``; resume an interrupted run; never stop for
    one bad slide. ``cluster``: a Dask scheduler address (or a ``distributed.Client``)."""
    from rich.console import Console

    from pdseg_qupath.learn.modelio import load_model

    console = console or Console()
    opts = options or CohortOptions()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PdsegError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    jobs = collect_slides(inputs)
    m = load_model(model)
    model_path = str(Path(m.path or model).absolute())
    t0 = time.perf_counter()
    with _run_lock(out):
        summary = Summary(out, m.class_map.names)
        todo: list[SlideJob] = []
        rows: list[dict[str, Any]] = []
        for job in jobs:
            if not opts.force and summary.is_done(job, m.model_id, out):
                row = dict(summary.rows[job.name], status="skipped")
                summary.rows[job.name] = row
                rows.append(row)
            else:
                todo.append(job)
        summary.write()
        if rows:
            console.print(f"{len(rows)} slide(s) already done for model {m.model_id[:8]}: skipped (--force redoes them)")
        prog = CohortProgress(progress, len(jobs))
        if prog.p is not None and rows:
            prog.p.advance(prog.slides, len(rows))

        def record(row: dict[str, Any]) -> None:
            summary.update(row)
            rows.append(row)
            if row["status"] != "ok":
                console.print(f"[red]{row['slide']}: failed ({row.get('error')})")

        if cluster is not None:
            from pdseg_qupath.tasks.distributed import run_on_cluster

            engine, devs = "dask", run_on_cluster(cluster, todo, model_path, out, opts, record, prog)
        else:
            devs = parse_devices(devices, workers)
            if len(devs) == 1:
                engine = "local"
                if todo:
                    _run_inline(todo, m, devs[0], out, opts, record, prog, console)
            else:
                engine = "processes"
                if todo:
                    _run_processes(todo, model_path, devs, out, opts, record, prog)
    order = {j.name: i for i, j in enumerate(jobs)}
    rows.sort(key=lambda r: order.get(r["slide"], len(order)))
    tiles = sum(int(r.get("tiles") or 0) for r in rows if r.get("status") == "ok")
    return CohortResult(rows, summary.path, m.model_id, time.perf_counter() - t0, tiles, engine, list(devs))


def _run_inline(todo, m, device, out, opts, record, prog, console) -> None:
    from pdseg_qupath.tasks.predict import Predictor

    predictor = Predictor(m, device, opts.batch_size, on_backoff=lambda b: console.print(
        f"[yellow]out of GPU memory: retrying with batch size {b}"))
    for job in todo:
        prog.start("main", job.name)
        row = predict_job(job, predictor, out, opts, on_tiles=prog.add_tiles)
        record(row)
        prog.slide_done("main")


# ------------------------------------------------------------------------------- local processes


def _device_worker(wid: int, device: str, model_path: str, out_dir: str, opts: dict, threads: int,
                   jobs, results) -> None:
    """Worker process: load the model on ``device``, then take slides from the shared queue until None."""
    try:
        import torch

        torch.set_num_threads(max(1, threads))
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        from pdseg_qupath.learn.modelio import load_model
        from pdseg_qupath.tasks.predict import Predictor

        predictor = Predictor(load_model(model_path), device, opts["batch_size"])
    except BaseException as exc:  # noqa: BLE001 - reported to the coordinator
        results.put(("fatal", wid, f"{device}: {exc}"))
        return
    options = CohortOptions(**opts)
    while True:
        item = jobs.get()
        if item is None:
            results.put(("exit", wid, None))
            return
        job = SlideJob(**item)
        results.put(("start", wid, job.name))
        row = predict_job(job, predictor, out_dir, options, on_tiles=lambda n: results.put(("tiles", wid, n)))
        results.put(("done", wid, row))


def _run_processes(todo: list[SlideJob], model_path: str, devices: list[str], out: Path, opts: CohortOptions,
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
        p = ctx.Process(target=_device_worker, args=(wid, dev, model_path, str(out), asdict(opts), threads,
                                                     jobs, results), daemon=True)
        p.start()
        procs.append(p)
    in_flight: dict[int, str] = {}
    alive = set(range(len(procs)))
    left = {j.name for j in todo}
    fatal: list[str] = []
    try:
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
                            record({"slide": name, "status": "failed", "error":
                                    f"worker on {devices[wid]} died (exit code {procs[wid].exitcode})",
                                    "device": devices[wid]})
                            prog.slide_done(str(wid))
                continue
            if kind == "tiles":
                prog.add_tiles(payload)
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
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
