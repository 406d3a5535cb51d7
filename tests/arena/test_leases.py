"""Leases: a view that dies while nobody calls the arena is still released."""

from __future__ import annotations

import time

import numpy as np

import torch_arena as ta
from torch_arena._arena import leases
from torch_arena._arena import units as _units

KiB = 1024


def _states(pool: ta.SharedMemorySegmentPool) -> list[int]:
    # Straight from the shared header: no arena call, so no drain in this thread.
    return _units.UnitTable(pool.file).state.tolist()


def _wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_reaper_releases_dead_views_before_and_after_it_parks(monkeypatch):
    """The reaper thread parks after a quiet spell; a new lease wakes it, and a
    view dropped while the consumer makes no arena call is released by it."""
    monkeypatch.setattr(leases, "_LINGER_S", 0.05)
    with ta.SharedMemorySegmentPool(64 * KiB, 1) as pool:
        w, r = pool.open_writer(), pool.open_reader()
        for _ in range(2):
            out = ta.restore(ta.offload(np.ones(1000), w), r)
            assert _states(pool) == [_units.HELD]
            del out
            assert _wait_for(lambda: _states(pool) == [_units.RELEASED]), "the dead view's unit was never released"
            assert _wait_for(lambda: leases._reaper.parked), "the reaper never parked with nothing outstanding"
