"""Cohort prediction on a local 2-worker Dask cluster (CPU, tiny backbone), with GPU-style resources."""

from __future__ import annotations

import csv
import json

import pytest

from pdseg_qupath.learn.options import PredictOptions
from pdseg_qupath.tasks.cohort import predict_cohort

from _cohort_data import tiny_model, write_pyramid

distributed = pytest.importorskip("distributed")


@pytest.mark.slow
def test_local_cluster_predicts_into_the_shared_folder_and_resumes(tmp_path):
    model = tiny_model(tmp_path / "model")
    slides = tmp_path / "slides"
    for i in range(4):
        write_pyramid(slides / f"d{i}.tif", w=64, h=64, seed=30 + i)
    (slides / "bad.tif").write_bytes(b"nope")
    out = tmp_path / "out"
    # Workers advertise GPU=1 as real GPU workers would (`dask worker --resources GPU=1`): the tasks ask
    # for it, so each worker runs one slide at a time; without CUDA they run on the CPU.
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, resources={"GPU": 1},
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        res = predict_cohort([slides], model, out, cluster=client, options=PredictOptions(classmap=True))
        assert res.engine == "dask" and len(res.devices) == 2
        status = {r["slide"]: r["status"] for r in res.rows}
        assert status == {"bad.tif": "failed", "d0.tif": "ok", "d1.tif": "ok", "d2.tif": "ok", "d3.tif": "ok"}
        with open(out / "summary.csv", newline="") as f:
            rows = {r["slide"]: r for r in csv.DictReader(f)}
        assert "bad.tif" in rows["bad.tif"]["error"]
        assert all(rows[f"d{i}.tif"]["device"].endswith("/cpu") for i in range(4))
        for i in range(4):
            assert json.loads((out / f"d{i}.tif.geojson").read_text())["features"]
        mtime = (out / "d0.tif.geojson").stat().st_mtime_ns
        again = predict_cohort([slides], model, out, cluster=cluster.scheduler_address)
        assert sorted(r["status"] for r in again.rows) == ["failed"] + ["skipped"] * 4
        assert (out / "d0.tif.geojson").stat().st_mtime_ns == mtime
    assert not list(out.glob(".*.tmp"))
