"""A full arena, oversized batches, a tiny /dev/shm and too little memory."""

from __future__ import annotations

import re

import pytest

from torch_arena._os.sizes import parse_bytes

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def _fallback_warnings(result):
    return [w for w in result["warnings"] if w["category"] == "ArenaFallbackWarning"]


def test_held_batches_reach_the_elastic_cap_then_fall_back(scenario):
    """The loop keeps every batch and the loader's pool is capped at 6 of them:
    producers wait arena_timeout once, then send through torch's path, with
    one warning in the loader's terms and a count; all data correct."""
    report = scenario("hold_all", "pool", "fallback", timeout=60)
    report.assert_ok()
    report.assert_clean()
    res = report.result
    assert res["complete"] and res["held"] == 24
    assert res["batches"] + res["fallbacks"] == 24
    assert 5 <= res["batches"] <= 6 and res["fallbacks"] >= 18  # the cap holds ~6 batches
    warnings = _fallback_warnings(res)
    assert len(warnings) == 1, "warned once, counted after"
    message = warnings[0]["message"]
    for needle in ("at its budget (arena_budget=", "keep fewer batches alive", "raise arena_budget", "arena_timeout"):
        assert needle in message, (needle, message)
    advised = re.search(r"arena_budget='([^']+)'", message).group(1)
    assert parse_bytes(advised, "arena_budget") >= 2 * 6 * (4 * (64 << 10) + 8192)  # usable as given
    assert res["seconds"] < 10, "one timeout, not one per batch"


def test_held_batches_fill_fixed_pool_then_fall_back(scenario):
    """The same with the user's own fixed pool of 6 segments."""
    report = scenario("hold_all", "fixed", "fallback", timeout=60)
    report.assert_ok()
    report.assert_clean()
    res = report.result
    assert res["complete"] and res["held"] == 24
    assert res["batches"] + res["fallbacks"] == 24
    assert res["batches"] == 6 and res["fallbacks"] == 18  # 6 segments
    warnings = _fallback_warnings(res)
    assert len(warnings) == 1, "warned once, counted after"
    assert "no free segment" in warnings[0]["message"]
    # A bigger budget would only make the same 6 segments bigger: the advice
    # is a pool with a segment for every batch in flight or kept.
    assert "count=6 + batches kept" in warnings[0]["message"]
    assert res["seconds"] < 10, "one timeout, not one per batch"


def test_held_batches_fill_pool_then_raise(scenario):
    """arena_overflow='raise': a BufferError naming the pool and what to change."""
    report = scenario("hold_all", "fixed", "raise", timeout=60)
    report.assert_ok()
    report.assert_clean()
    error = report.result["error"]
    assert error is not None and error["type"] == "BufferError"
    message = error["message"]
    for needle in ("SharedMemorySegmentPool", "all 6 segments", "count=6 + batches kept", "arena_overflow='fallback'"):
        assert needle in message, (needle, message)
    assert report.result["seconds"] < 10


def test_held_batches_never_stall_the_ring(scenario):
    """The ring hands out private copies: keeping them costs no arena space."""
    report = scenario("hold_all", "ring", "fallback", timeout=60)
    report.assert_ok()
    report.assert_clean()
    res = report.result
    assert res["complete"] and res["fallbacks"] == 0 and res["batches"] == 24


@pytest.mark.parametrize(
    ("kind", "shape", "batch_size", "arena_size"),
    [
        ("pool", "one", "2.0 MiB", "pool capped at 1.0 MiB"),
        ("ring", "one", "2.0 MiB", "ring capped at 1.0 MiB"),
        ("ring", "two", "1.5 MiB", "ring capped at 1.0 MiB"),  # two tensors that each fit
    ],
)
@pytest.mark.parametrize("overflow", ["fallback", "raise"])
def test_batch_larger_than_arena(scenario, kind, shape, batch_size, arena_size, overflow):
    """Falls back (default) or raises; the message names both sizes."""
    report = scenario("oversize", kind, overflow, shape, timeout=60)
    report.assert_ok()
    report.assert_clean()
    res = report.result
    if overflow == "fallback":
        assert res["complete"] and res["fallbacks"] == 4 and res["batches"] == 0
        assert len(res["warnings"]) == 1
        message = res["warnings"][0]
    else:
        assert res["error"] is not None and res["error"]["type"] == "BufferError"
        message = res["error"]["message"]
    assert batch_size in message and arena_size in message, message
    assert res["seconds"] < 10


@pytest.mark.usefixtures("private_shm")
@pytest.mark.parametrize("kind", ["pool", "ring"])
def test_small_dev_shm_works_with_arena(scenario, kind):
    """16 MiB batches, 2 workers, 64 MiB /dev/shm: every batch arrives intact
    through the arena (which never draws on /dev/shm)."""
    report = scenario("small_shm", kind, timeout=90)
    report.assert_ok()
    report.assert_clean()
    res = report.result
    assert res["shm_size"] == 64 << 20
    assert res["ok"] and res["arena_batches"] == 24 and res["fallbacks"] == 0


@pytest.mark.usefixtures("private_shm")
def test_small_dev_shm_breaks_stock_torch(scenario):
    """The same loader with torch's own transport fails there ("No space left
    on device" in the worker, then a hang): the harness kills it."""
    report = scenario("small_shm", "stock", timeout=10)
    assert report.rc != 0 or report.timed_out, report.describe()
    assert not report.result.get("ok"), "stock torch unexpectedly succeeded on a 64 MiB /dev/shm"
    assert "No space left on device" in report.stderr, report.describe()
    assert not report.orphans, report.orphans


def test_memory_exhaustion_at_creation(scenario):
    """Asking for more than MemAvailable: a MemoryError that says how much was
    asked and how much there is, from the pool, the ring, the loader, and
    when the kernel itself refuses the reservation."""
    report = scenario("memory_error", timeout=60)
    report.assert_ok()
    report.assert_clean()
    res = report.result
    for kind in ("pool", "ring"):
        assert res[f"elastic_{kind}_batches"] == 2 and 0 < res[f"elastic_{kind}_committed"] < 64 << 20, res
    for name in ("pool", "ring"):
        error = res[name]
        assert error is not None and error["type"] == "MemoryError", (name, error)
        assert "cannot reserve" in error["message"] and "is available" in error["message"], error
        assert "Make the arena smaller" in error["message"], error
    kernel = res["kernel"]
    assert kernel is not None and kernel["type"] == "MemoryError", kernel
    assert re.search(r"could not reserve 8\.\d MiB .*\(File too large\)", kernel["message"]), kernel
    kernel = res["kernel_elastic"]
    assert kernel is not None and kernel["type"] == "MemoryError", kernel
    assert re.search(r"could not reserve 4\.\d GiB .*\(File too large\)", kernel["message"]), kernel
