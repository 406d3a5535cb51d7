"""``TORCH_ARENA_REPORT=1``: one line per arena loader when the process exits.

So that an A/B of a real job is two runs of the same command, with and
without ``TORCH_ARENA``: each loader that moved batches through an arena
prints its batches, fallbacks, bytes and the most memory its arena held, to
stderr, with the process id (every DDP rank prints its own). Released arenas
count too: a loader's record keeps what its earlier sessions moved.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import threading
import weakref
from typing import Any

from torch_arena._loader.stats import ArenaStats
from torch_arena._os.sizes import format_bytes

__all__ = ["Record", "enabled", "track"]

_TRUE = ("1", "true", "yes", "on")
_records: list["Record"] = []
_lock = threading.Lock()
_registered = False


def _dead() -> None:
    return None


def enabled() -> bool:
    """Whether ``TORCH_ARENA_REPORT`` asks for the report."""
    return os.environ.get("TORCH_ARENA_REPORT", "").strip().lower() in _TRUE


def merge(total: ArenaStats, more: ArenaStats) -> ArenaStats:
    """Totals of two stretches of one loader (sums; peaks are maxima)."""
    return dataclasses.replace(
        total,
        batches=total.batches + more.batches,
        bytes=total.bytes + more.bytes,
        fallbacks=total.fallbacks + more.fallbacks,
        spilled=total.spilled + more.spilled,
        wait_seconds=total.wait_seconds + more.wait_seconds,
        high_water_units=max(total.high_water_units, more.high_water_units),
        high_water_bytes=max(total.high_water_bytes, more.high_water_bytes),
        committed_high_water=max(total.committed_high_water, more.committed_high_water),
        last_fallback_reason=more.last_fallback_reason or total.last_fallback_reason,
    )


class Record:
    """What one loader moved: released sessions' totals, and the live one.

    The live session's statistics are held strongly (a small dataclass the
    session updates in place), the session itself weakly: a loader dropped
    before the exit, its session and arena with it, still gets its line."""

    def __init__(self, state: Any) -> None:
        self.state = weakref.ref(state)
        self.description = "a DataLoader"
        self.released = ArenaStats()
        self._session: Any = _dead
        self._session_stats: ArenaStats | None = None

    def follow(self, session: Any) -> None:
        """``session`` is the loader's live session now."""
        self._session, self._session_stats = weakref.ref(session), session.stats

    def describe(self, loader: Any) -> None:
        dataset = getattr(loader, "dataset", None)
        arena = self.state().settings.arena if self.state() is not None else None
        self.description = f"{type(loader).__name__} over {type(dataset).__name__} ({arena})"

    def add(self, stats: ArenaStats) -> None:
        """The live session was released; ``stats`` is what it moved."""
        self.released = merge(self.released, stats)
        self._session, self._session_stats = _dead, None

    def totals(self) -> ArenaStats:
        session = self._session()
        if session is not None and not session.arena.closed:
            live = session.snapshot()
        else:  # dropped with its loader: its counts, and its peaks as of its last iterator
            live = self._session_stats or ArenaStats()
        return merge(self.released, live)

    def line(self) -> str:
        t = self.totals()
        spilled = f" ({t.spilled} restored zero-copy: memory was short for a copy)" if t.spilled else ""
        return (
            f"torch_arena [pid {os.getpid()}]: {self.description}: {t.batches} batches through the arena"
            f"{spilled}, {t.fallbacks} fallbacks, {format_bytes(t.bytes)} moved, committed peak "
            f"{format_bytes(t.committed_high_water)}"
        )


def track(state: Any) -> Record | None:
    """A record for a new loader's arena state, when the report is on."""
    global _registered
    if not enabled():
        return None
    record = Record(state)
    with _lock:
        _records.append(record)
        if not _registered:
            atexit.register(_print_report)
            _registered = True
    return record


def _print_report() -> None:
    for record in list(_records):
        try:
            totals = record.totals()
            if totals.batches or totals.fallbacks:
                print(record.line(), file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: BLE001 - a report must never fail the exit
            print(f"torch_arena: could not report a loader: {exc!r}", file=sys.stderr)
