"""The streaming stages give exactly the inline result, stay bounded, and surface any stage's error."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pdseg_qupath.learn.pipeline import count_tiles, run_region

from _helpers import stitch_region

W, H, K, T, OV = 150, 110, 3, 32, 8


def _read(origins):
    return np.array(origins, dtype=np.int64)  # stands in for the decoded tiles


def _infer(tiles, origins):
    """Deterministic logits that vary with position, so misplaced tiles would show."""
    yy, xx = np.mgrid[0:T, 0:T]
    out = np.empty((len(origins), K, T, T), np.float32)
    for i, (x, y) in enumerate(origins):
        assert tuple(tiles[i]) == (x, y)  # each batch's tiles travel with their own origins
        for k in range(K):
            out[i, k] = np.sin((xx + x) * (0.05 + 0.03 * k)) + np.cos((yy + y) * (0.07 - 0.02 * k))
    return out


def _keep(x, y):
    return (x // 24 + y // 24) % 3 != 0  # drop a third of the tiles: gaps stay 255


def _strips(**kw):
    out = []
    run_region(W, H, K, T, OV, _read, _infer, out.append, keep=_keep, batch_size=5, **kw)
    return out


def test_threaded_stages_equal_inline_and_stitch_region():
    ref = list(stitch_region(W, H, K, T, OV, lambda o: _infer(_read(o), o), keep=_keep, batch_size=5))
    for kw in ({"io_threads": 0}, {"io_threads": 3, "prefetch": 2}, {"io_threads": 1, "prefetch": 1}):
        got = _strips(**kw)
        assert [s.y for s in got] == [s.y for s in ref]
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a.labels, b.labels)
            np.testing.assert_array_equal(a.prob, b.prob)
    labels = np.concatenate([s.labels for s in ref])
    assert labels.shape == (H, W) and (labels == 255).any() and (labels < K).any()


def test_tile_count_matches_what_runs():
    seen = []
    run_region(W, H, K, T, OV, _read, _infer, lambda s: None, keep=_keep, batch_size=4, on_tiles=seen.append)
    assert sum(seen) == count_tiles(W, H, T, OV, keep=_keep) > 0
    every = []
    run_region(W, H, K, T, OV, _read, _infer, lambda s: None, batch_size=7, on_tiles=every.append)
    assert count_tiles(W, H, T, OV) == sum(every) == 6 * 5  # x: 0..120, y: 0..96 in steps of 24


def test_reads_run_ahead_but_stay_bounded():
    lock = threading.Lock()
    state = {"started": 0, "consumed": 0, "max_ahead": 0}

    def read(origins):
        with lock:
            state["started"] += 1
            state["max_ahead"] = max(state["max_ahead"], state["started"] - state["consumed"])
        return _read(origins)

    def infer(tiles, origins):
        with lock:
            state["consumed"] += 1
        return _infer(tiles, origins)

    run_region(W, H, K, T, OV, read, infer, lambda s: None, batch_size=2, io_threads=4, prefetch=3)
    assert state["consumed"] > 10
    assert 2 <= state["max_ahead"] <= 4  # ran ahead of the consumer, never more than prefetch (+ the one in hand)


@pytest.mark.parametrize("stage", ["read", "infer", "strip"])
def test_an_error_in_any_stage_is_raised_and_threads_end(stage):
    calls = {"n": 0}

    def boom(*a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError(f"{stage} failed")

    read = (lambda o: (boom(), _read(o))[1]) if stage == "read" else _read
    infer = (lambda t, o: (boom(), _infer(t, o))[1]) if stage == "infer" else _infer
    on_strip = boom if stage == "strip" else (lambda s: None)
    before = threading.active_count()
    with pytest.raises(RuntimeError, match=f"{stage} failed"):
        run_region(W, H, K, T, OV, read, infer, on_strip, batch_size=2, io_threads=2)
    assert threading.active_count() <= before
