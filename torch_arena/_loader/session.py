"""The consumer side of a loader's arena: sizing, restore-on-receipt, statistics.

A batch crosses the worker queue as a tiny object whose unpickling *is* the
restore (see :mod:`torch_arena._loader.worker`). It is therefore restored exactly
once, in whichever thread reads the worker queue (the main thread, or the
pin-memory thread), and also when torch reads a batch only to drop it
(iterator reset, persistent workers resuming): the dropped views die and the
space goes back at once. An :class:`ArenaSession` is what that unpickling finds
by the arena's token in this process's registry.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import warnings
import weakref
from typing import Any

from torch_arena._codec.codec import restore
from torch_arena._arena.elastic import SharedMemoryElasticPool, SharedMemoryElasticRing
from torch_arena._os.sizes import format_bytes
from torch_arena._arena.segment_pool import SharedMemorySegmentPool
from torch_arena._arena.ring_buffer import SharedMemoryRingBuffer
from torch_arena._os.sync import current_pid, pid_alive

__all__ = ["ArenaFallbackWarning", "ArenaSession", "ArenaStats", "make_arena"]

#: Batches a training loop may hold beyond torch's prefetch window (the current
#: and the previous batch while ``next()`` runs).
HELD_BATCHES = 2


class ArenaFallbackWarning(UserWarning):
    """A batch travelled through torch's default path instead of the arena."""


@dataclasses.dataclass
class ArenaStats:
    """What a loader's arena has moved so far (all iterators, all epochs)."""

    batches: int = 0
    """Batches that travelled through the arena."""
    bytes: int = 0
    """Binary payload bytes moved through the arena."""
    fallbacks: int = 0
    """Batches that went through torch's default path instead."""
    wait_seconds: float = 0.0
    """Time producers spent waiting for arena space."""
    high_water_units: int = 0
    """Most units (batches) in the arena at once."""
    high_water_bytes: int = 0
    """Most bytes in the arena at once (batches in flight plus those the loop holds)."""
    bytes_in_flight: int = 0
    """Bytes in the arena now: batches in flight plus those the loop still holds."""
    committed_bytes: int = 0
    """Memory the arena holds now (an elastic pool's grows and shrinks with the
    batches; a fixed pool's or ring's is its whole size)."""
    committed_high_water: int = 0
    """The most memory the arena has held at once."""
    last_fallback_reason: str = ""
    """Why the latest fallback happened."""


def arena_slots(num_workers: int, prefetch_factor: int, pin_memory: bool) -> int:
    """Units a loader can have in flight or held: prefetch window + held batches."""
    return num_workers * prefetch_factor + HELD_BATCHES + (1 if pin_memory else 0)


def make_arena(kind: str, budget: int | None, timeout: float) -> Any:
    """The arena a loader makes: an elastic pool (``"pool"``: zero-copy) or an
    elastic ring (``"ring"``: copy-out), capped at ``budget`` (default: half the
    memory available)."""
    if kind == "pool":
        return SharedMemoryElasticPool(budget, acquire_timeout=timeout)
    return SharedMemoryElasticRing(budget, acquire_timeout=timeout)


def warn_if_pool_too_small(arena: Any, slots: int) -> None:
    """Warn when a user's fixed pool has fewer segments than batches in flight."""
    if isinstance(arena, SharedMemorySegmentPool) and arena.count < slots:
        warnings.warn(
            f"torch_arena: the loader's SharedMemorySegmentPool has {arena.count} segments, but "
            f"the loader keeps up to {slots} batches in flight or held (num_workers × "
            f"prefetch_factor + {HELD_BATCHES}): workers will wait for segments, and batches "
            f"may fall back to torch's transport. Pass count >= {slots}, or arena='pool' "
            "(an elastic pool that sizes itself).",
            ArenaFallbackWarning,
            stacklevel=4,
        )


_sessions: "weakref.WeakValueDictionary[int, ArenaSession]" = weakref.WeakValueDictionary()
_sessions_lock = threading.Lock()


class ArenaSession:
    """One arena as seen by the process that consumes its batches."""

    def __init__(self, arena: Any, *, owned: bool, slots: int) -> None:
        self.arena = arena
        self.owned = owned
        self.slots = slots
        self.pid = current_pid()
        self.token = arena.token
        self.stats = ArenaStats()
        self._reader: Any = None
        self._reader_pid = -1
        self._warned = False
        self._dead_workers: set[int] = set()
        with _sessions_lock:
            _sessions[self.token] = self

    @property
    def reader(self) -> Any:
        """This process's reader endpoint (opened on first use)."""
        if self._reader is None or self._reader_pid != current_pid():
            self._reader = self.arena.open_reader()
            self._reader_pid = current_pid()
        return self._reader

    def receive(self, envelope: bytes, nbytes: int, wait_seconds: float) -> Any:
        """Restore one batch and count it."""
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
                stacklevel=2,
            )
        return batch

    def note_workers_gone(self, pids: "list[int]", grace: float = 1.0) -> None:
        """Return the space of batches these shut-down workers left unread.

        torch terminates a worker that does not stop in time without waiting for
        it; a worker still alive is given up to ``grace`` seconds to go, and one
        that outlives that is reclaimed when the next iterator starts.
        """
        self._dead_workers.update(p for p in pids if p)
        if self._reader is not None and self._reader_pid == current_pid():
            self._reader.reset()
        reclaim = getattr(self.arena, "reclaim", None)
        if reclaim is None or self.arena.closed or not self._dead_workers:
            return
        deadline = time.monotonic() + grace
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        dead = sorted(self._dead_workers)
        reclaim_locked = getattr(self.arena, "reclaim_locked", None)
        if not _lock_free_here(self.arena):
            # Called by the garbage collector (an abandoned iterator's __del__)
            # inside one of this thread's own arena calls: taking the lock would
            # deadlock. Queue it: the lock's holder runs it before letting go.
            if reclaim_locked is not None:
                state = self.arena.state
                state.release_soon(lambda: reclaim_locked(state.header, dead))
            return
        reclaim(dead)
        self._dead_workers = {p for p in self._dead_workers if pid_alive(p)}

    def snapshot(self) -> ArenaStats:
        """A copy of the statistics with the arena's high-water marks filled in."""
        stats = dataclasses.replace(self.stats)
        usage = getattr(self.arena, "usage", None)
        if usage is not None and not self.arena.closed:
            marks = usage()
            stats.high_water_units = marks["units_high_water"]
            stats.high_water_bytes = marks["bytes_high_water"]
            stats.bytes_in_flight = marks["bytes_in_use"]
            whole = getattr(self.arena, "capacity", 0)
            stats.committed_bytes = marks.get("committed_bytes", whole)
            stats.committed_high_water = marks.get("committed_high_water", whole)
        return stats

    def close(self) -> None:
        """Release the arena if this session created it."""
        with _sessions_lock:
            if _sessions.get(self.token) is self:
                del _sessions[self.token]
        self._reader = None
        if self.owned:
            self.arena.close()


def _lock_free_here(arena: Any) -> bool:
    """Whether no thread of this process holds ``arena``'s lock right now."""
    lock = getattr(getattr(arena, "_state", None), "lock", None)
    if lock is None or not hasattr(lock, "try_acquire_thread"):
        return True
    if not lock.try_acquire_thread():
        return False
    lock.release()
    return True


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


def describe_arena(arena: Any) -> str:
    """A short description for messages."""
    if isinstance(arena, SharedMemoryElasticPool):
        return f"an elastic {arena.noun} capped at {format_bytes(arena.max_bytes)}"
    if isinstance(arena, SharedMemorySegmentPool):
        return f"a pool of {arena.count} segments of {format_bytes(arena.segment_size)}"
    if isinstance(arena, SharedMemoryRingBuffer):
        return f"a ring of {format_bytes(arena.capacity)}"
    return repr(arena)
