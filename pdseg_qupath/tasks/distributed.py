"""Cohort prediction on a Dask cluster (``pip install pdseg-qupath[distributed]``).

Each slide is one Dask task running :func:`pdseg_qupath.tasks.predict.predict_job` on a worker. When the
cluster's workers advertise a ``GPU`` resource (``dask worker ... --resources GPU=1``), tasks ask for
``{"GPU": 1}``, so each GPU runs one slide at a time; CPU-only clusters run tasks without resources.
Dask does the scheduling, retries tasks of lost workers and moves only tiny rows: the slides and the
model are read by the workers from a shared file system, and the outputs are written straight into
the shared output folder. The coordinating process alone writes ``summary.csv``, as in the local engines,
so the resume rules are the same.

Each worker process keeps its loaded model (backbone + head) between tasks; loading the paper's
backbone takes seconds, a slide minutes.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from pdseg_qupath.core.errors import PdsegError
from pdseg_qupath.learn.options import PredictOptions
from pdseg_qupath.learn.runtime import resolve_device
from pdseg_qupath.sources.base import ImageRecord
from pdseg_qupath.tasks.predict import open_predictor, predict_job

INSTALL_HELP = "cluster prediction needs Dask distributed: pip install 'pdseg-qupath[distributed]'"

_PREDICTORS: dict[tuple[str, str], Any] = {}
"""Per worker process: (model path, device) → loaded Predictor, reused by later tasks."""


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise PdsegError(INSTALL_HELP) from None
    return distributed


def connect(cluster: str | Any):
    """A ``distributed.Client`` for a scheduler address (``tcp://host:8786``) or an existing Client."""
    distributed = _import_distributed()
    if isinstance(cluster, distributed.Client):
        return cluster, False
    try:
        return distributed.Client(str(cluster), timeout="30s"), True
    except (OSError, TimeoutError) as e:
        raise PdsegError(f"--cluster {cluster}: cannot reach the Dask scheduler ({e}); start it with "
                         "`dask scheduler` and check the address and port") from None


def cluster_task(job: dict, model_path: str, out_dir: str, options: dict, workers_by_host: dict[str, int],
                 batch_size: int) -> dict:
    """Run on a worker: predict one slide into the shared folder; return its summary row."""
    import torch

    device = resolve_device("auto")
    if device == "cpu":
        # CPU workers on one host share its cores instead of each starting one thread per core
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers_by_host.get(_host(), 1)))
    key = (model_path, device)
    if key not in _PREDICTORS:
        _PREDICTORS[key] = open_predictor(model_path, device, batch_size)
    row = predict_job(ImageRecord(**job), _PREDICTORS[key], out_dir, PredictOptions(**options))
    row["device"] = f"{_host()}/{device}"
    return row


def _host() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address).split("://")[-1].rsplit(":", 1)[0]
    except (ImportError, ValueError):
        return socket.gethostname()


def run_on_cluster(cluster: str | Any, todo: Sequence, model_path: str, out: Path, opts,
                   record: Callable[[dict], None], prog) -> list[str]:
    """Submit one task per slide and record rows as they finish; returns the workers' addresses."""
    distributed = _import_distributed()
    client, owned = connect(cluster)
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"] if _takes_n_workers(client) \
            else client.scheduler_info()["workers"]
        if not workers:
            raise PdsegError(f"--cluster {cluster}: the scheduler has no workers; start some with `dask worker`")
        gpu = any((w.get("resources") or {}).get("GPU") for w in workers.values())
        per_host: dict[str, int] = {}
        for addr, w in workers.items():
            host = addr.split("://")[-1].rsplit(":", 1)[0]
            per_host[host] = per_host.get(host, 0) + 1
        by_future = {}
        for job in todo:
            fut = client.submit(cluster_task, asdict(job), model_path, str(Path(out).absolute()), asdict(opts),
                                per_host, opts.batch_size, pure=False,
                                resources={"GPU": 1} if gpu else None)
            by_future[fut] = job
        prog.start("cluster", f"{len(todo)} slides on {len(workers)} workers")
        left = len(todo)
        for fut in distributed.as_completed(list(by_future)):
            job = by_future[fut]
            try:
                row = fut.result()
            except Exception as exc:  # noqa: BLE001 - a lost worker or an import failure on it
                row = {"slide": job.name, "status": "failed", "path": str(job.path or job.uri),
                       "error": f"cluster task failed: {type(exc).__name__}: {exc}"}
            record(row)
            prog.add_tiles(int(row.get("tiles") or 0))
            left -= 1
            prog.slide_done("none")
            prog.start("cluster", f"{left} slides on {len(workers)} workers")
        return sorted(workers)
    finally:
        if owned:
            client.close()


def _takes_n_workers(client) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False
