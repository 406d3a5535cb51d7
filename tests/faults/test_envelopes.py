"""Corrupt and truncated envelopes: a clear ValueError, never an out-of-bounds read."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.faults]


@pytest.mark.parametrize("kind", ["pool", "ring"])
def test_corrupt_envelopes_direct(scenario, kind):
    """~210 truncations, bad headers and random byte flips through restore():
    each one restores or raises ValueError("... envelope ..."); nothing
    crashes, no unit leaks, the genuine envelope still restores."""
    report = scenario("corrupt_direct", kind, timeout=90)
    report.assert_ok()
    report.assert_clean()
    res = report.result
    assert res["bad"] == [], res["bad"]
    assert res["outcomes"].get("ValueError", 0) >= 150, res["outcomes"]
    assert set(res["outcomes"]) <= {"ValueError", "restored", "restored-differently"}
    assert res["after"]["units_in_use"] == 0
    if kind == "pool":
        assert res["pristine_ok"]


@pytest.mark.parametrize("kind", ["pool", "ring"])
@pytest.mark.parametrize("mode", ["truncate", "offset", "magic"])
def test_corrupt_envelope_through_dataloader(scenario, kind, mode):
    """A worker sends a damaged envelope (cut in half, a binary's offset 1 GiB
    past its unit, a bad magic): the training loop gets ValueError for that
    batch only, like a worker exception, and every other batch arrives."""
    report = scenario("corrupt_loader", kind, mode, timeout=60)
    report.assert_ok()
    report.assert_clean()
    res = report.result
    assert len(res["errors"]) == 1, res["errors"]
    error = res["errors"][0]
    assert error["type"] == "ValueError"
    assert "corrupt envelope" in error["message"]
    if mode == "offset":
        assert "lies outside its unit" in error["message"]
    assert res["seen"] == [i for i in range(32) if not 12 <= i < 16]
    assert res["after"]["units_in_use"] == 0
