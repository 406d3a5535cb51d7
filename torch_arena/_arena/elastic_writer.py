"""The producer side of the elastic pool: units that take space as they are written.

SPDL's writer protocol (``begin_unit`` / ``write_binary`` / ``commit_unit``)
never says how large a unit will be. So a writer takes space a chunk at a
time as binaries arrive: a chunk holds at least the binary, at least
:data:`MIN_CHUNK` (small binaries share one), and grows with the unit by up to
:data:`MAX_GROWTH`, so a unit of many binaries has few extents. The unused
tail of the last chunk goes back when the unit is committed. A binary is
always contiguous; a unit's binaries need not be.

A chunk taken from cold (never committed) memory is committed with
``posix_fallocate`` here, in the writer, outside the arena lock: the
training process never pays for fresh memory.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from torch_arena._arena.base import ALIGN, ArenaSpaceTimeout, CopyingWriter, align_up
from torch_arena._arena.leases import flush as flush_leases
from torch_arena._arena.leases import reap_now
from torch_arena._os.memory import PAGE_SIZE, commit_range
from torch_arena._os.sizes import format_bytes
from torch_arena._os.sync import current_pid

__all__ = ["ElasticWriter", "MAX_GROWTH", "MIN_CHUNK"]

#: Smallest extent a writer takes: small binaries share one.
MIN_CHUNK = 64 << 10
#: Largest step by which a unit's chunks grow ahead of its binaries.
MAX_GROWTH = 4 << 20


class ElasticWriter(CopyingWriter):
    """Producer endpoint of a :class:`~torch_arena.SharedMemoryElasticPool`."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._state = pool.state
        self.token = self._state.token
        self._slot: int | None = None
        self._gen = 0
        self._extents: list[tuple[int, int]] = []  # (start, length) of the open unit
        self._used = 0  # bytes used in the last extent
        self._unit_bytes = 0
        self._last_row = -1
        self._timeout = pool.acquire_timeout
        self.last_wait_seconds = 0.0

    def reset(self) -> None:
        """Abandon a unit left open (its space goes back to the pool)."""
        if self._slot is not None:
            self.abort_unit()

    def begin_unit(self, timeout: float | None = None) -> None:
        """Open a new unit; space is taken as its binaries are written."""
        if self._slot is not None:
            raise RuntimeError("begin_unit: a unit is already open; commit_unit() or abort_unit() it first")
        self._timeout = self._pool.acquire_timeout if timeout is None else timeout
        self.last_wait_seconds = 0.0
        reap_now()  # views this process dropped free their space first: it is reused warm
        self._slot, self._gen = self._wait_for(self._new_unit_or_none, "a unit slot")
        self._extents, self._used, self._unit_bytes = [], 0, 0

    def _new_unit_or_none(self, header: np.ndarray, pid: int) -> Any:
        return self._pool._new_unit(header, pid)

    def _wait_for(self, attempt: Any, what: str, nbytes: int = 0) -> Any:
        """Run ``attempt(header, pid)`` under the lock until it returns a value,
        making room and reclaiming dead writers, waiting up to the timeout."""
        pool, state = self._pool, self._state
        pid = current_pid()
        started = time.monotonic()
        flushed = False
        while True:
            marked: list[tuple[int, int]] = []
            with state.locked() as header:
                if state.shut_down:
                    raise BufferError(f"{type(pool).__name__} was shut down while waiting for space")
                result = attempt(header, pid)
                if result is None and pool._reclaim_dead(header):
                    result = attempt(header, pid)
                if result is None and nbytes:
                    room = pool._room_to_make(header, nbytes)
                    if room:
                        marked = pool._mark_trim(header, room, pid)
                committed, cap, units = pool._fullness(header)
            if result is not None:
                self.last_wait_seconds += time.monotonic() - started
                return result
            if marked:
                pool._give_back(marked)
                continue
            if not flushed:
                # Views this process dropped may not be counted yet: count them
                # (outside the lock) before waiting for anyone else.
                flush_leases()
                flushed = True
                continue
            waited = time.monotonic() - started
            if waited >= self._timeout:
                self.last_wait_seconds += waited
                raise ArenaSpaceTimeout(
                    f"{type(pool).__name__}: no room for {what} after {waited:.1f} s: "
                    f"{format_bytes(committed)} of its {format_bytes(cap)} cap (max_bytes) is "
                    f"committed to units in flight or held by restored views ({units} units). "
                    "Drop restored batches sooner, raise max_bytes, or raise acquire_timeout."
                )
            state.wakeup.wait(self._timeout - waited)

    def allocate(self, nbytes: int) -> tuple[int, np.ndarray]:
        """Reserve ``nbytes`` in the open unit; returns ``(offset, writable uint8 view)``."""
        if self._slot is None:
            raise RuntimeError("no open unit: call begin_unit() first")
        start = align_up(self._used, ALIGN)
        if not self._extents or start + nbytes > self._extents[-1][1]:
            self._grow(nbytes)
            start = 0
        base = self._extents[-1][0]
        self._used = start + nbytes
        return base + start, self._state.data_view(base + start, nbytes)

    def _grow(self, nbytes: int) -> None:
        pool = self._pool
        need = align_up(max(nbytes, MIN_CHUNK, min(self._unit_bytes, MAX_GROWTH)), PAGE_SIZE)
        if self._unit_bytes + align_up(nbytes, PAGE_SIZE) > pool.max_bytes:
            raise BufferError(
                f"a unit of at least {format_bytes(self._unit_bytes + nbytes)} "
                f"({self._unit_bytes + nbytes} bytes) does not fit a {pool.noun} capped at "
                f"{format_bytes(pool.max_bytes)} ({pool.max_bytes} bytes); raise max_bytes"
            )
        if self._unit_bytes + need > pool.max_bytes:
            need = align_up(nbytes, PAGE_SIZE)
        slot = self._slot
        row, start, length, fresh, marked = self._wait_for(
            lambda header, pid: pool._take(header, need, pid, slot), format_bytes(need), need
        )
        self._extents.append((start, length))
        self._last_row = row
        self._used = 0
        self._unit_bytes += length
        if fresh:
            pool._give_back(marked)
            try:
                commit_range(self._state.files.memory_fd, self._state.header_bytes + start, length,
                             f"a unit of {pool!r}")
            except MemoryError:
                self.abort_unit(punch=True)
                raise

    def locate(self, address: int, nbytes: int) -> int | None:
        """Offset of memory already inside the open unit, else ``None`` (no copy needed)."""
        rel = address - self._state.data_address
        for start, length in self._extents:
            if start <= rel and rel + nbytes <= start + length:
                return rel
        return None

    def commit_unit(self) -> int:
        """Close the unit (its unused tail goes back); returns its span."""
        slot = self._slot
        if slot is None:
            raise RuntimeError("no open unit: call begin_unit() first")
        pool, state = self._pool, self._state
        with state.locked() as header:
            last = (self._last_row, *self._extents[-1]) if self._extents else None
            marked = pool._close_unit(header, slot, last, self._used)
        self._slot = None
        pool._give_back(marked)
        return (self._gen << 32) | slot

    def abort_unit(self, *, punch: bool = False) -> None:
        """Discard the open unit; its space is free again (given back to the
        kernel with ``punch``, for memory that may be half committed)."""
        slot = self._slot
        if slot is None:
            raise RuntimeError("no open unit: call begin_unit() first")
        self._slot = None
        state = self._state
        with state.locked() as header:
            self._pool._abort_unit(header, slot, self._gen, punch=punch)
        state.wakeup.notify()
