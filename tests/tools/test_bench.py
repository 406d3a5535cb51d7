"""Smoke test of the A/B benchmark harness: one tiny configuration per transport."""

from __future__ import annotations

import math
import multiprocessing
import os
import statistics

import pytest

pytest.importorskip("psutil")

from torch_arena._tools import bench as _bench
from torch_arena._tools.bench._config import Config, Result
from torch_arena._tools.bench._measure import t95
from torch_arena._tools.bench._run import summarize

TRANSPORTS = ["stock", "ring", "ring-fixed", "pool", _bench.DATASET_ONLY]
RINGS = ("ring", "ring-fixed")


@pytest.fixture(scope="module")
def results():
    # 1 worker, not the default 2: the report must say what ran
    configs = [_bench.Config("numpy", 1, t, per_window=16, windows=2, workers=1, min_window_s=0.05) for t in TRANSPORTS]
    out = _bench.run_matrix(configs, pss_interval=0.02, progress=None)
    _bench.attach_dataset_cost(out)
    return {r.transport: r for r in out}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_result_fields_are_sane(results, transport):
    r = results[transport]
    assert not r.skipped, r.skipped
    assert r.batch_bytes == 1 << 20
    assert r.batches >= 32 and r.batches % 2 == 0  # 2 windows of >= 16 batches
    assert r.items_per_s > 0 and r.mb_per_s > 0
    # 2 windows of different rates: a real interval around the mean
    assert r.mb_per_s_lo < r.mb_per_s < r.mb_per_s_hi
    assert r.workers == 1 and r.start_method == multiprocessing.get_start_method()
    assert r.main_cpu_ms > 0
    assert r.worker_cpu_ms > 0, "the workers' CPU was not counted"
    # RUSAGE_CHILDREN after the join covers the workers' whole life: at least
    # what the live reading saw, and not wildly more.
    assert 0.95 <= r.worker_cpu_check < 5
    assert r.memcpy_ms > 0 and r.memcpy_shared_ms > 0
    if os.path.exists("/proc/self/smaps_rollup"):  # PSS is readable here: it must be measured
        assert r.peak_pss_mb > 10, r.peak_pss_mb
    assert r.fallbacks == 0


def test_arena_rows_went_through_the_arena(results):
    for transport in (*RINGS, "pool"):
        assert results[transport].arena_batches > results[transport].batches
        assert results[transport].arena_high_water >= 1
    assert results["stock"].arena_batches == 0
    assert results[_bench.DATASET_ONLY].worker_cpu_ms > 0  # making the payload costs CPU


def test_ring_rows_restore_into_recycled_private_buffers(results):
    for transport in RINGS:
        r = results[transport]
        # every arena batch was copied out; the batches die each step, so the
        # buffers come back: a handful mapped anew, the rest recycled
        assert r.private_fresh + r.private_reused >= r.arena_batches
        assert 1 <= r.private_fresh <= 8 and r.private_reused > r.batches
    for transport in ("stock", "pool"):  # nothing copied out
        assert results[transport].private_fresh == results[transport].private_reused == 0


def test_ring_targets_are_judged_for_both_rings(results):
    names = [name for name, _, _ in _bench.check_targets(list(results.values()))]
    for transport in RINGS:
        assert f"{transport} main CPU <= 0.5x stock's, numpy 1 MiB" in names
        assert f"{transport} main CPU <= 1.3x memcpy, numpy 1 MiB" in names


def test_dataset_cost_is_subtracted_from_its_own_kind_and_size_only():
    rows = [
        Result("numpy", 1, _bench.DATASET_ONLY, worker_cpu_ms=2.0),
        Result("numpy", 1, "pool", worker_cpu_ms=5.0, memcpy_ms=0.5),
        Result("numpy", 4, "pool", worker_cpu_ms=9.0, memcpy_ms=2.0),
    ]
    _bench.attach_dataset_cost(rows)
    assert rows[1].dataset_ms == 2.0 and rows[1].worker_xfer_ms == 3.0 and rows[1].xfer_memcpy_ratio == 6.0
    assert math.isnan(rows[2].dataset_ms) and math.isnan(rows[2].worker_xfer_ms)


@pytest.mark.parametrize(("n", "quantile"), [(2, 12.706), (3, 4.303), (10, 2.262), (11, 2.228), (31, 2.042), (121, 1.980)])
def test_t95_is_students_t_for_every_sample_size(n, quantile):
    assert t95(n) == pytest.approx(quantile, abs=1e-3)  # tables of the t distribution
    assert t95(1) == 0.0


def test_confidence_interval_of_a_run():
    raw = {
        "rates": [10.0, 12.0, 14.0, 9.0, 11.0, 13.0, 12.0, 10.0, 11.0, 12.0, 13.0, 11.0],
        "per_window": 4, "batch_bytes": 2_000_000, "memcpy": 1e-3, "memcpy_shared": 2e-3,
        "main_cpu": 1.0, "worker_cpu": 2.0, "worker_total_live": 2.0, "worker_total_rusage": 2.1,
        "wait": 0.0, "step_cpu": 0.0, "touch_cpu": 0.0, "start_method": "spawn",
    }
    r = summarize(Config("numpy", 2, "pool", per_window=4, workers=3), raw, 100.0, 5.0)
    n, mean = 12, statistics.mean(raw["rates"])
    half = 2.201 * statistics.stdev(raw["rates"]) / math.sqrt(n)  # t(0.975, 11 df) = 2.201
    assert r.mb_per_s_lo == pytest.approx((mean - half) * 2, rel=1e-3)
    assert r.mb_per_s_hi == pytest.approx((mean + half) * 2, rel=1e-3)
    assert (r.workers, r.start_method) == (3, "spawn")


def test_report_writes_table_csv_and_figure(results, tmp_path):
    pytest.importorskip("matplotlib")
    text = _bench.report(list(results.values()), str(tmp_path), "smoke")
    assert text.startswith("In short (") and "pool: " in text and "x cp2" in text
    assert "targets:" not in text  # judged only when asked (bench --targets)
    for suffix in ("csv", "txt", "png"):
        assert (tmp_path / f"smoke.{suffix}").stat().st_size > 0
    rows = (tmp_path / "smoke.csv").read_text().splitlines()
    assert len(rows) == 1 + len(TRANSPORTS)
    method = multiprocessing.get_start_method()
    machine = next(line for line in text.splitlines() if line.startswith("measured on "))
    assert f"1 worker, start method {method}" in machine  # what ran, not a constant
