"""Throughput of the QuPath GeoJSON reader and writer (run: python benchmarks/bench_geojson.py [gbm40 dir]).

Reports features/s for a synthetic file of many small polygons (a detection-heavy QuPath export) and,
if a folder of real QuPath GeoJSON is given, for those files.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from shapely.geometry import Point

from pdseg_qupath.core.annotations import Annotation
from pdseg_qupath.sources.qupath.geojson import read_geojson, write_geojson


def synthetic(n: int, vertices: int = 24) -> list[Annotation]:
    return [
        Annotation(Point(20.0 * (i % 1000), 20.0 * (i // 1000)).buffer(8, quad_segs=vertices // 4), "Nucleus",
                   (0, 0, 255), measurements={"Area µm^2": 50.0})
        for i in range(n)
    ]


def main() -> None:
    n = 50_000
    objs = synthetic(n)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.geojson"
        t0 = time.perf_counter()
        write_geojson(path, objs)
        t1 = time.perf_counter()
        back, report = read_geojson(path)
        t2 = time.perf_counter()
        assert len(back) == n and report.skipped == 0
        mb = path.stat().st_size / 1e6
        print(f"synthetic {n} polygons x 25 vertices ({mb:.1f} MB): "
              f"write {n / (t1 - t0):,.0f} features/s, read {n / (t2 - t1):,.0f} features/s")
    if len(sys.argv) > 1:
        files = sorted(Path(sys.argv[1]).glob("*.geojson"))
        t0 = time.perf_counter()
        total = sum(len(read_geojson(f)[0]) for f in files)
        dt = time.perf_counter() - t0
        print(f"{len(files)} real files, {total} features: read {total / dt:,.0f} features/s ({dt:.2f} s)")


if __name__ == "__main__":
    main()
