"""Smoke test of the A/B benchmark harness: one tiny configuration per transport."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("psutil")

from torch_arena import _bench

TRANSPORTS = ["stock", "ring", "pool", _bench.DATASET_ONLY]


@pytest.fixture(scope="module")
def results():
    configs = [_bench.Config("numpy", 1, t, per_window=16, windows=2, min_window_s=0.05) for t in TRANSPORTS]
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
    assert r.mb_per_s_lo <= r.mb_per_s <= r.mb_per_s_hi
    assert r.main_cpu_ms > 0
    assert r.worker_cpu_ms > 0, "the workers' CPU was not counted"
    # RUSAGE_CHILDREN after the join covers the workers' whole life: at least
    # what the live reading saw, and not wildly more.
    assert 0.95 <= r.worker_cpu_check < 5
    assert r.memcpy_ms > 0 and r.memcpy_shared_ms > 0
    assert math.isnan(r.peak_pss_mb) or r.peak_pss_mb > 10
    assert r.fallbacks == 0


def test_arena_rows_went_through_the_arena(results):
    for transport in ("ring", "pool"):
        assert results[transport].arena_batches > results[transport].batches
        assert results[transport].arena_high_water >= 1
    assert results["stock"].arena_batches == 0
    assert results["pool"].dataset_ms == results[_bench.DATASET_ONLY].worker_cpu_ms
    assert not math.isnan(results["pool"].xfer_memcpy_ratio)


def test_report_writes_table_csv_and_figure(results, tmp_path):
    pytest.importorskip("matplotlib")
    text = _bench.report(list(results.values()), str(tmp_path), "smoke")
    assert "pool" in text and "targets:" in text
    for suffix in ("csv", "txt", "png"):
        assert (tmp_path / f"smoke.{suffix}").stat().st_size > 0
    rows = (tmp_path / "smoke.csv").read_text().splitlines()
    assert len(rows) == 1 + len(TRANSPORTS)
