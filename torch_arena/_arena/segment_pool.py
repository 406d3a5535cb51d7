"""The segment pool: fixed-size segments, one unit each, zero-copy restore.

A producer takes a free segment for each unit (blocking up to
``acquire_timeout`` when none is free), writes its binaries into it and commits.
The consumer restores views that point straight into the segment. The segment
goes back to the pool when the last of those views dies, whatever order units
are released in: holding one batch never stalls the others, and a segment is
never handed to a writer while a view into it lives (not after ``reset()``,
not across epochs, not after ``close()``).

Segment states live in the shared header: FREE → WRITING (owner pid) →
FILLED (committed, envelope in flight) → HELD (restored, views alive) → FREE.
A WRITING segment whose owner died is reclaimed by the next producer that
finds the pool full; FILLED units whose envelope will never be read are
returned with :meth:`SharedMemorySegmentPool.reclaim`.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np

from torch_arena._arena.base import (
    BACKEND_SLOT,
    FILLED,
    FREE,
    HELD,
    WRITING,
    ArenaBase,
    ArenaSpaceTimeout,
    ArenaState,
    CopyingWriter,
    align_up,
    check_positive_int,
    check_timeout,
)
from torch_arena._arena.leases import LeaseTracker, reap_now
from torch_arena._arena.leases import flush as flush_leases
from torch_arena._os.memory import PAGE_SIZE
from torch_arena._os.sizes import format_bytes
from torch_arena._os.sync import current_pid, pid_alive

__all__ = ["SharedMemorySegmentPool"]

_KIND_POOL = 1
_FIELDS = 4  # per segment: state, generation, owner pid, used bytes
_STATE, _GEN, _OWNER, _USED = range(_FIELDS)
_STATE_NAMES = {FREE: "free", WRITING: "being written", FILLED: "committed", HELD: "restored"}


class SharedMemorySegmentPool(ArenaBase):
    """A blocking pool of ``count`` shared-memory segments of ``segment_size`` bytes.

    Restores are zero-copy views that keep their segment reserved while alive.
    The pool is picklable (it travels to fork, spawn and forkserver children
    as file descriptors) and any number of producer processes may write into
    it at once. All memory is reserved up front; see the module docstring for
    the life cycle of a segment.

    Args:
        segment_size: Bytes per segment: the largest unit (one item or batch,
            all its binaries together plus 64-byte alignment) it can hold.
        count: Number of segments: how many units can be in flight or held.
        acquire_timeout: Seconds a producer waits for a free segment before
            :class:`BufferError`.
    """

    def __init__(self, segment_size: int, count: int, *, acquire_timeout: float = 60.0) -> None:
        self.segment_size = check_positive_int("segment_size", segment_size)
        self.count = check_positive_int("count", count)
        self.acquire_timeout = check_timeout(acquire_timeout)
        self._stride = align_up(segment_size, PAGE_SIZE)
        self._state: ArenaState | None = ArenaState.create(
            _KIND_POOL,
            self._stride * count,
            BACKEND_SLOT + _FIELDS * count,
            f"SharedMemorySegmentPool(segment_size={segment_size}, count={count})",
        )

    def __repr__(self) -> str:
        return (
            f"SharedMemorySegmentPool(segment_size={self.segment_size}, count={self.count}, "
            f"acquire_timeout={self.acquire_timeout})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_pool,
            (self.state, self.segment_size, self.count, self.acquire_timeout),
        )

    @property
    def capacity(self) -> int:
        """Total bytes of all segments."""
        return self.segment_size * self.count

    def open_writer(self) -> "PoolWriter":
        """A producer endpoint for this process (one per producing thread)."""
        return PoolWriter(self)

    def open_reader(self) -> "PoolReader":
        """The consumer endpoint."""
        return PoolReader(self)

    # -- segment table ----------------------------------------------------------
    def _table(self, header: np.ndarray) -> np.ndarray:
        return header[BACKEND_SLOT : BACKEND_SLOT + _FIELDS * self.count].reshape(self.count, _FIELDS)

    def _acquire(self, timeout: float) -> tuple[int, int, float]:
        state = self.state
        pid = current_pid()
        start = time.monotonic()
        reap_now()  # segments whose views this process dropped are free first
        while True:
            with state.locked() as header:
                if state.shut_down:
                    raise BufferError("SharedMemorySegmentPool was shut down while waiting for space")
                table = self._table(header)
                free = np.flatnonzero(table[:, _STATE] == FREE)
                if not len(free) and self._reclaim_dead_writers(state, header, table):
                    free = np.flatnonzero(table[:, _STATE] == FREE)
                if len(free):
                    seg = int(free[0])
                    row = table[seg]
                    row[_STATE], row[_OWNER], row[_USED] = WRITING, pid, 0
                    row[_GEN] += 1
                    state.count_usage(header, 1, 0)
                    return seg, int(row[_GEN]), time.monotonic() - start
            waited = time.monotonic() - start
            if waited >= timeout:
                raise ArenaSpaceTimeout(
                    f"SharedMemorySegmentPool: no free segment after {waited:.1f} s: all "
                    f"{self.count} segments of {format_bytes(self.segment_size)} are in use "
                    "(restored views still alive, or units in flight). Drop restored "
                    "batches sooner, raise count, or raise acquire_timeout."
                )
            state.wakeup.wait(timeout - waited)

    @staticmethod
    def _reclaim_dead_writers(state: ArenaState, header: np.ndarray, table: np.ndarray) -> int:
        reclaimed = 0
        for seg in np.flatnonzero(table[:, _STATE] == WRITING):
            if not pid_alive(int(table[seg, _OWNER])):
                table[seg, _STATE], table[seg, _OWNER] = FREE, 0
                state.count_usage(header, -1, 0)
                reclaimed += 1
        return reclaimed

    def reclaim_locked(self, header: np.ndarray, producer_pids: "list[int] | tuple[int, ...]") -> int:
        """:meth:`reclaim` for a caller that already holds the arena lock."""
        pids = {int(p) for p in producer_pids}
        table = self._table(header)
        freed = 0
        for seg in range(self.count):
            row = table[seg]
            if row[_STATE] in (WRITING, FILLED) and int(row[_OWNER]) in pids:
                if pid_alive(int(row[_OWNER])):
                    continue
                used = int(row[_USED]) if row[_STATE] == FILLED else 0
                row[_STATE], row[_OWNER] = FREE, 0
                self.state.count_usage(header, -1, -used)
                freed += 1
        return freed

    def segment_states(self) -> list[str]:
        """Each segment's state, for diagnostics ('free', 'being written', …)."""
        flush_leases()
        with self.state.locked() as header:
            return [_STATE_NAMES[int(s)] for s in self._table(header)[:, _STATE]]


def _rebuild_pool(state: ArenaState, segment_size: int, count: int, timeout: float) -> SharedMemorySegmentPool:
    pool = SharedMemorySegmentPool.__new__(SharedMemorySegmentPool)
    pool.segment_size, pool.count, pool.acquire_timeout = segment_size, count, timeout
    pool._stride = align_up(segment_size, PAGE_SIZE)
    pool._state = state
    return pool


def _release_segment(state: ArenaState, count: int, header: np.ndarray, key: tuple[int, int]) -> None:
    """Free restored segment ``key = (segment, generation)`` (lock held).

    Takes the state, not the pool: it runs after ``close()`` too, when the last
    view of a batch dies.
    """
    seg, gen = key
    row = header[BACKEND_SLOT : BACKEND_SLOT + _FIELDS * count].reshape(count, _FIELDS)[seg]
    if row[_GEN] == gen and row[_STATE] in (FILLED, HELD):
        used = int(row[_USED])
        row[_STATE], row[_OWNER] = FREE, 0
        state.count_usage(header, -1, -used)


class _PoolGeometry:
    """What a writer needs, without a reference to the public pool object."""

    __slots__ = ("state", "stride", "segment_size", "count")

    def __init__(self, pool: SharedMemorySegmentPool) -> None:
        self.state = pool.state
        self.stride = pool._stride
        self.segment_size = pool.segment_size
        self.count = pool.count


class PoolWriter(CopyingWriter):
    """Producer endpoint of a :class:`SharedMemorySegmentPool`."""

    def __init__(self, pool: SharedMemorySegmentPool) -> None:
        self._pool = pool
        self._geo = _PoolGeometry(pool)
        self.token = pool.state.token
        self._seg: int | None = None
        self._gen = 0
        self._used = 0
        self._base = 0
        self.last_wait_seconds = 0.0

    def reset(self) -> None:
        """Abandon a unit left open (its segment goes back to the pool)."""
        if self._seg is not None:
            self.abort_unit()

    def begin_unit(self, timeout: float | None = None) -> None:
        """Take a free segment for a new unit, waiting up to the pool's timeout."""
        if self._seg is not None:
            raise RuntimeError("begin_unit: a unit is already open; commit_unit() or abort_unit() it first")
        wait = self._pool.acquire_timeout if timeout is None else timeout
        self._seg, self._gen, self.last_wait_seconds = self._pool._acquire(wait)
        self._used = 0
        self._base = self._seg * self._geo.stride

    def _require_unit(self) -> int:
        if self._seg is None:
            raise RuntimeError("no open unit: call begin_unit() first")
        return self._seg

    def allocate(self, nbytes: int) -> tuple[int, np.ndarray]:
        """Reserve ``nbytes`` in the open unit; returns ``(offset, writable uint8 view)``."""
        self._require_unit()
        start = align_up(self._used)
        end = start + nbytes
        if end > self._geo.segment_size:
            raise BufferError(
                f"unit of at least {format_bytes(end)} ({end} bytes) does not fit a segment of "
                f"{format_bytes(self._geo.segment_size)} ({self._geo.segment_size} bytes); "
                "raise segment_size"
            )
        self._used = end
        offset = self._base + start
        return offset, self._geo.state.data_view(offset, nbytes)

    def locate(self, address: int, nbytes: int) -> int | None:
        """Offset of memory already inside the open unit, else ``None`` (no copy needed)."""
        if self._seg is None:
            return None
        start = self._geo.state.data_address + self._base
        if start <= address and address + nbytes <= start + self._used:
            return self._base + (address - start)
        return None

    def commit_unit(self) -> int:
        """Close the unit; returns its span (segment and generation)."""
        seg = self._require_unit()
        state = self._geo.state
        with state.locked() as header:
            row = self._pool._table(header)[seg]
            row[_STATE], row[_USED] = FILLED, self._used
            state.count_usage(header, 0, self._used)
        self._seg = None
        return (self._gen << 32) | seg

    def abort_unit(self) -> None:
        """Discard the open unit; its segment is free again."""
        seg = self._require_unit()
        state = self._geo.state
        with state.locked() as header:
            row = self._pool._table(header)[seg]
            if row[_GEN] == self._gen and row[_STATE] == WRITING:
                row[_STATE], row[_OWNER] = FREE, 0
                state.count_usage(header, -1, 0)
        state.wakeup.notify()
        self._seg = None


class PoolUnit:
    """One restored unit: bounds-checked zero-copy views, released when they die."""

    zero_copy = True

    def __init__(self, reader: "PoolReader", seg: int, gen: int, used: int) -> None:
        geo = reader._geo
        self._tracker = reader.tracker
        self.seg, self.gen, self.used = seg, gen, used
        self.start = seg * geo.stride
        self.lease: np.ndarray | None = geo.state.anchored_view(self.start, geo.segment_size)

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """``uint8`` view of ``nbytes`` at ``offset``; ValueError if outside the unit."""
        rel = offset - self.start
        if self.lease is None or rel < 0 or nbytes < 0 or rel + nbytes > self.used:
            raise ValueError(
                f"corrupt envelope: binary at offset {offset} (+{nbytes} bytes) lies outside "
                f"its unit [{self.start}, {self.start + self.used})"
            )
        return self.lease[rel : rel + nbytes]

    def finish(self, pinned: "list[object] | tuple[object, ...]" = ()) -> None:
        """The unit is read: free it once the lease and every pinned anchor are gone
        (see :mod:`torch_arena._arena.leases`: a release is never lost to an interrupt)."""
        lease, self.lease = self.lease, None
        if lease is not None:
            self._tracker.hold((self.seg, self.gen), [lease, *pinned])


class PoolReader:
    """Consumer endpoint of a :class:`SharedMemorySegmentPool` (zero-copy)."""

    zero_copy = True

    def __init__(self, pool: SharedMemorySegmentPool) -> None:
        self._pool = pool
        self._geo = _PoolGeometry(pool)
        self.token = pool.state.token
        self.tracker = LeaseTracker(pool.state, functools.partial(_release_segment, pool.state, pool.count))
        self._open: dict[int, PoolUnit] = {}

    def reset(self) -> None:
        """Nothing to do: views kept from earlier iterations stay reserved, and
        every drain of the leases (see :mod:`torch_arena._arena.leases`) finds the
        segments whose views are gone, whatever was interrupted before."""

    def open_unit(self, span: int) -> PoolUnit:
        """Claim the committed unit ``span`` for reading."""
        seg, gen = span & 0xFFFFFFFF, span >> 32
        if not 0 <= seg < self._geo.count:
            raise ValueError(f"corrupt envelope: span {span} names segment {seg} of a pool of {self._geo.count}")
        geo = self._geo
        reap_now()
        unit = PoolUnit(self, seg, gen, 0)
        with geo.state.locked() as header:
            row = self._pool._table(header)[seg]
            if row[_GEN] != gen or row[_STATE] != FILLED:
                raise ValueError(
                    f"stale or corrupt envelope: segment {seg} generation {gen} is not waiting to be "
                    f"read (it is {_STATE_NAMES.get(int(row[_STATE]), '?')}, generation {int(row[_GEN])}); "
                    "an envelope can be restored once"
                )
            # Until finish() hands the segment to its views, the unit itself
            # holds it. Registered before the segment is marked: an interrupt in
            # between frees it when the unit object goes, instead of leaking it.
            self.tracker.hold((seg, gen), [unit])
            row[_STATE], row[_OWNER] = HELD, current_pid()
            unit.used = int(row[_USED])
        return unit

    def _unit_at(self, seg: int) -> PoolUnit:
        unit = self._open.get(seg)
        if unit is None:
            with self._geo.state.locked() as header:
                gen = int(self._pool._table(header)[seg][_GEN])
            unit = self._open[seg] = self.open_unit((gen << 32) | seg)
        return unit

    def read_binary(self, offset: int, nbytes: int) -> memoryview:
        """Zero-copy view of one binary (protocol method; see :func:`torch_arena.restore`)."""
        seg = offset // self._geo.stride
        if not 0 <= seg < self._geo.count:
            raise ValueError(f"corrupt envelope: offset {offset} is outside the pool")
        return memoryview(self._unit_at(seg).view(offset, nbytes))

    def end_unit(self, span: int, pinned: "list[object]") -> None:
        """Unit read: its segment frees once every view of it (and ``pinned``) is gone."""
        seg = span & 0xFFFFFFFF
        unit = self._open.pop(seg, None)
        if unit is None:
            unit = self.open_unit(span)
        unit.finish(pinned)
