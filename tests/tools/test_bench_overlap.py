"""Smoke test of the overlap study (benchmarks/overlap.py): structure and
invariants at a tiny size, no speed asserted."""

from __future__ import annotations

import importlib.util
import os

import pytest

pytest.importorskip("psutil")

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "benchmarks", "overlap.py")
_spec = importlib.util.spec_from_file_location("overlap", _PATH)
overlap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(overlap)


def test_feeder_hands_over_every_item_in_order_and_stops():
    feeder = overlap.Feeder(iter(range(1000)))
    assert [feeder.get() for _ in range(50)] == list(range(50))
    feeder.close()
    assert not feeder.thread.is_alive()
    assert feeder.q.qsize() <= overlap.QUEUE_DEPTH


def test_feeder_reports_the_iterators_error():
    def failing():
        yield 1
        raise ValueError("boom")

    feeder = overlap.Feeder(failing())
    assert feeder.get() == 1
    with pytest.raises(RuntimeError, match="feeder thread failed"):
        feeder.get()
    feeder.close()


@pytest.fixture(scope="module")
def rows():
    out = []
    for rep, transport in enumerate(("stock", "ring-thread")):
        p = {"kind": "numpy", "transport": transport, "step_n": 64, "step_reps": 2,
             "warmup": 2, "per_window": 3, "windows": 2}
        out.append({**overlap.measure(p), "rep": 0, "noise_pct": 0.0})
    return out


def test_measure_and_summary(rows):
    by = {r["transport"]: r for r in rows}
    assert by["stock"]["arena_batches"] == 0
    assert by["ring-thread"]["arena_batches"] >= 7 and by["ring-thread"]["fallbacks"] == 0
    for r in rows:
        assert r["steps"] == 6 and len(r["rates"]) == 2 and all(x > 0 for x in r["rates"])
        assert r["main_cpu_ms"] > 0 and r["worker_cpu_ms"] > 0 and r["next_cpu_ms"] > 0
        assert r["memcpy_ms"] > 0 and r["memcpy_shared_ms"] > 0
    text = overlap.summarize(rows)
    assert "ring-thread" in text and "1.000" in text.splitlines()[2]  # stock's ratio to itself
