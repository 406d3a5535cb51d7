"""The training-process side of a loader's arena: restore on receipt, statistics.

A batch crosses the worker queue as a tiny object whose unpickling *is* the
restore (:mod:`torch_arena._loader.wire`). It is therefore restored exactly
once, in whichever thread reads the worker queue (the main thread, the
pin-memory thread or the restore thread), and also when torch reads a batch
only to drop it (iterator reset, persistent workers resuming): the dropped
views die and the space goes back at once. An :class:`ArenaSession` is what
that unpickling finds by the arena's token in this process's registry.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
import warnings
import weakref
from typing import Any

from torch_arena._arena.protocol import Arena, ArenaReader
from torch_arena._codec.envelope import parse_envelope
from torch_arena._codec.restore import restore
from torch_arena._loader.stats import ArenaStats
from torch_arena._os.sync import current_pid, holds_arena_lock, pid_alive
from torch_arena.errors import ArenaFallbackWarning

__all__ = ["ArenaSession", "DeferredBatch", "HELD_BATCHES", "arena_slots", "session_for", "user_stacklevel", "warn_if_too_few_units"]

#: Batches a training loop may hold beyond torch's prefetch window (the current
#: and the previous batch while ``next()`` runs).
HELD_BATCHES = 2


def arena_slots(num_workers: int, prefetch_factor: int, pin_memory: bool) -> int:
    """Units a loader can have in flight or held: prefetch window + held batches."""
    return num_workers * prefetch_factor + HELD_BATCHES + (1 if pin_memory else 0)


#: Packages whose frames a warning skips to point at the user's own line.
_LIBRARY_PACKAGES = ("torch_arena", "torch", "torchdata", "accelerate", "lightning", "pytorch_lightning")


def user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called here that names the first
    frame outside torch_arena and the libraries that call it (the user's line)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _LIBRARY_PACKAGES:
        level, frame = level + 1, frame.f_back
    return level


def warn_if_too_few_units(arena: Arena, slots: int) -> None:
    """Warn when a user's arena holds fewer units than the loader keeps in flight."""
    limit = arena.units_limit
    if limit is not None and limit < slots:
        warnings.warn(
            f"torch_arena: the loader's arena, {arena.describe()}, holds {limit} batches at once, but "
            f"the loader keeps up to {slots} batches in flight or held (num_workers × prefetch_factor "
            f"+ {HELD_BATCHES}): workers will wait for space, and batches may fall back to torch's "
            f"transport. Pass a pool with count >= {slots}, or arena='pool' (an elastic pool that "
            "sizes itself).",
            ArenaFallbackWarning,
            stacklevel=user_stacklevel(),
        )


_sessions: "weakref.WeakValueDictionary[int, ArenaSession]" = weakref.WeakValueDictionary()
_sessions_lock = threading.Lock()


class ArenaSession:
    """One arena as seen by the process that consumes its batches."""

    def __init__(self, arena: Arena, *, owned: bool, slots: int) -> None:
        self.arena = arena
        self.owned = owned
        self.slots = slots
        self.pid = current_pid()
        self.token = arena.token
        self.stats = ArenaStats()
        self._reader: ArenaReader | None = None
        self._reader_pid = -1
        self._warned = False
        self._dead_workers: set[int] = set()
        self.defer_copies = False
        """Set by an iterator with a restore thread: a copy-out batch is not
        restored when it is received, but by that thread (a bounded number
        ahead) or when the loop takes it (:mod:`torch_arena._loader.restore_thread`)."""
        with _sessions_lock:
            _sessions[self.token] = self

    @property
    def reader(self) -> ArenaReader:
        """This process's reader endpoint (opened on first use)."""
        if self._reader is None or self._reader_pid != current_pid():
            self._reader = self.arena.open_reader()
            self._reader_pid = current_pid()
        return self._reader

    def receive(self, envelope: bytes, nbytes: int, wait_seconds: float) -> Any:
        """Restore one batch and count it, or, with :attr:`defer_copies`, a
        :class:`DeferredBatch` that restores it later."""
        if self.defer_copies:
            return DeferredBatch(self, envelope, nbytes, wait_seconds)
        return self.restore(envelope, nbytes, wait_seconds)

    def restore(self, envelope: bytes, nbytes: int, wait_seconds: float) -> Any:
        """Restore one batch now and count it."""
        batch = restore(envelope, self.reader)
        stats = self.stats
        stats.batches += 1
        stats.bytes += nbytes
        stats.wait_seconds += wait_seconds
        return batch

    def receive_fallback(self, batch: Any, reason: str, wait_seconds: float) -> Any:
        """Count a batch that came by torch's path; warn the first time."""
        stats = self.stats
        stats.fallbacks += 1
        stats.wait_seconds += wait_seconds
        stats.last_fallback_reason = reason
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"torch_arena: a batch travelled through torch's default path instead of the "
                f"arena: {reason}. (Warned once; loader.arena_stats.fallbacks counts them.)",
                ArenaFallbackWarning,
                stacklevel=user_stacklevel(),
            )
        return batch

    def start_epoch(self) -> None:
        """An iterator starts an epoch: memory sized for earlier epochs may go back."""
        if not self.arena.closed:
            self.arena.note_epoch()
            self.reader.note_epoch()

    def note_workers_gone(self, pids: "list[int]", grace: float = 1.0) -> None:
        """Return the space of batches these shut-down workers left unread.

        torch terminates a worker that does not stop in time without waiting for
        it; a worker still alive is given up to ``grace`` seconds to go, and one
        that outlives that is reclaimed when the next iterator starts.
        """
        self._dead_workers.update(p for p in pids if p)
        if self.arena.closed or not self._dead_workers:
            return
        if holds_arena_lock():
            # Called by the garbage collector (an abandoned iterator's __del__)
            # inside one of this thread's own arena calls: the lock is not
            # reentrant. The next iterator, or the next shutdown, reclaims them.
            return
        deadline = time.monotonic() + grace
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.arena.reclaim(sorted(self._dead_workers))
        self._dead_workers = {p for p in self._dead_workers if pid_alive(p)}

    def snapshot(self) -> ArenaStats:
        """A copy of the statistics with the arena's figures filled in."""
        stats = dataclasses.replace(self.stats)
        if self._reader is not None:
            stats.spilled = self._reader.spilled
        if not self.arena.closed:
            usage = self.arena.usage()
            stats.high_water_units = usage["units_high_water"]
            stats.high_water_bytes = usage["bytes_high_water"]
            stats.bytes_in_flight = usage["bytes_in_use"]
            stats.committed_bytes = usage["committed_bytes"]
            stats.committed_high_water = usage["committed_high_water"]
        return stats

    def keep_peaks(self) -> None:
        """Copy the arena's peak figures into :attr:`stats` (an iterator ended):
        what the report prints for a loader dropped before the exit."""
        if not self.arena.closed:
            snapshot, stats = self.snapshot(), self.stats
            stats.high_water_units = max(stats.high_water_units, snapshot.high_water_units)
            stats.high_water_bytes = max(stats.high_water_bytes, snapshot.high_water_bytes)
            stats.committed_high_water = max(stats.committed_high_water, snapshot.committed_high_water)
            stats.spilled = snapshot.spilled

    def close(self) -> None:
        """Release the arena if this session created it."""
        with _sessions_lock:
            if _sessions.get(self.token) is self:
                del _sessions[self.token]
        self._reader = None
        if self.owned:
            self.arena.close()


class DeferredBatch:
    """A copy-out batch received but not restored yet. It holds its unit in
    the arena: restored, the unit is read and released; dropped unrestored
    (an iterator reset), the unit is released unread."""

    __slots__ = ("session", "envelope", "nbytes", "wait_seconds", "__weakref__")

    def __init__(self, session: ArenaSession, envelope: bytes, nbytes: int, wait_seconds: float) -> None:
        self.session, self.envelope, self.nbytes, self.wait_seconds = session, envelope, nbytes, wait_seconds
        session.reader.hold_unread(parse_envelope(envelope)[1], self)

    def restore(self) -> Any:
        """The batch (copied out now)."""
        return self.session.restore(self.envelope, self.nbytes, self.wait_seconds)


def session_for(token: int) -> ArenaSession:
    """The open session of arena ``token`` in this process, or a clear error."""
    session = _sessions.get(token)
    if session is None:
        raise RuntimeError(
            f"torch_arena: received a batch from arena {token:#x}, which is not open in this "
            "process. Batches must be read by the process that created the loader, and the "
            "loader's arena must not be released while its workers still run."
        )
    return session
