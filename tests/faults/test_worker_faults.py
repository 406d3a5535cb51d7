"""Workers that die or raise: torch's errors, no deadlock, the arena recovers."""

from __future__ import annotations

import re

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.faults]

KILLED = re.compile(r"DataLoader worker \(pid(\(s\))? [\d, ]+\) (is killed by signal|exited unexpectedly)")


@pytest.mark.parametrize("kind", ["pool", "ring"])
@pytest.mark.parametrize(
    "where",
    [
        "getitem",  # before the worker opened a unit
        "collate-kill",  # in the user's collate_fn: the unit is begun, nothing written
        "offload-kill",  # while the batch is being copied into the unit
    ],
)
def test_worker_sigkilled(scenario, kind, where):
    """torch's "killed by signal"/"exited unexpectedly" error within its 5 s
    status check; the dead worker's unit is reclaimed and the same arena
    serves the next epoch completely, without fallbacks."""
    report = scenario("worker_killed", kind, where, timeout=60)
    report.assert_ok()
    report.assert_clean()
    res = report.result
    assert res["error"] is not None, report.describe()
    assert res["error"]["type"] == "RuntimeError"
    assert KILLED.search(res["error"]["message"]), res["error"]
    assert res["error_seconds"] < 15, "torch checks its workers every 5 s"
    if kind == "pool" and where != "getitem":
        # The scenario did catch a worker holding a segment when it died ...
        assert "being written" in res["states_at_error"], res["states_at_error"]
    # ... and that segment, and every other, is free again afterwards.
    assert res["after_error"]["units_in_use"] == 0, res["after_error"]
    if kind == "pool":
        assert set(res["after_error"]["states"]) == {"free"}, res["after_error"]
    assert res["epoch2_ok"], "the next epoch on the same arena lost or corrupted batches"
    assert res["fallbacks"] == 0
    assert res["after_epoch2"]["units_in_use"] == 0


@pytest.mark.parametrize("kind", ["pool", "ring"])
@pytest.mark.parametrize("where", ["getitem", "collate"])
def test_worker_raises_like_stock(scenario, kind, where):
    """The user's exception type and message reach the training loop exactly
    as with the stock loader, and iteration continues past the failed batch."""
    report = scenario("worker_raises", kind, where, timeout=60)
    report.assert_ok()
    report.assert_clean()
    arena, stock = report.result["arena"], report.result["stock"]
    assert [e["type"] for e in arena["errors"]] == ["SampleError"]
    assert [e["type"] for e in stock["errors"]] == ["SampleError"]
    original = "sample 13 is corrupt on disk" if where == "getitem" else "cannot collate batch with sample 13"
    for errors in (arena["errors"], stock["errors"]):
        assert errors[0]["message"].startswith("Caught SampleError in DataLoader worker process")
        assert errors[0]["message"].rstrip().endswith(f"SampleError: {original}")
    assert arena["seen"] == stock["seen"] == [i for i in range(32) if not 12 <= i < 16]
    # the 7 good batches really crossed through the arena (not stock torch's path)
    assert (arena["arena_batches"], arena["fallbacks"]) == (7, 0), arena
    assert stock["arena_batches"] == 0
    assert report.result["after"]["units_in_use"] == 0, "the failed unit was not returned"
