"""The elastic pool: zero-copy units of any size, memory committed only while used.

A fixed pool needs two guesses, the largest batch and how many are in flight,
and holds ``segment_size × count`` whatever the batches are. The elastic pool
needs neither. Its memory file has a large *virtual* size, free until written,
mapped once per process (not pre-faulted). Each unit is a list of extents from
the shared :class:`~torch_arena._arena.extents.ExtentTable`, taken as the codec
writes binaries: the protocol does not announce a unit's size, so a writer
takes a chunk at a time (at least the binary, growing with the unit), and
gives the unused tail back when the unit is committed.

Memory follows the working set:

* a range is committed with ``posix_fallocate`` the first time it is handed
  out (outside the lock), so exhaustion is a :class:`MemoryError` naming the
  sizes, never a SIGBUS;
* freed extents stay warm and are reused first (best fit): a recycled extent
  costs one warm copy, a fresh one what torch's fresh segment costs;
* after each commit the writer gives warm memory above ``1.25 ×`` the recent
  working set ``+ 16 MiB`` back to the kernel (hole punch, again outside the
  lock). The working set is the peak of bytes in use over the last 16 to 32
  units, so a loader that once saw big batches does not keep them;
* committed memory never exceeds ``max_bytes``: a writer that needs more
  first gives back warm memory that does not fit its request, then waits up
  to its timeout for units to be released
  (:class:`~torch_arena._arena.base.ArenaSpaceTimeout`).

Restores are zero-copy views, one lease per extent; a unit's extents are
freed when its last view dies (see :mod:`torch_arena._arena.leases`), in any order,
never while a view lives. Writers that die mid-unit are reclaimed by the next
writer that runs out of room.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from torch_arena._arena.base import (
    BACKEND_SLOT,
    FILLED,
    FREE,
    H_BYTES,
    H_UNITS,
    HELD,
    WRITING,
    ArenaBase,
    ArenaState,
    align_up,
    check_timeout,
)
from torch_arena._arena.elastic_unit import ElasticCopyReader, ElasticReader
from torch_arena._arena.elastic_writer import ElasticWriter
from torch_arena._arena.extents import BUSY, STATE_NAMES, TRIM, WARM, ExtentTable
from torch_arena._arena.leases import flush as flush_leases
from torch_arena._os.memory import PAGE_SIZE, committed_bytes
from torch_arena._os.limits import available_memory
from torch_arena._os.sizes import parse_bytes
from torch_arena._os.sync import current_pid, pid_alive

__all__ = ["SharedMemoryElasticPool", "SharedMemoryElasticRing", "default_max_bytes"]

_KIND_ELASTIC = 3
MAX_UNITS = 4096
MAX_EXTENTS = 8192
#: Units per working-set window (the working set spans the last one or two).
WINDOW_UNITS = 16
#: Warm memory kept above the working set: ``ws × KEEP_NUM / KEEP_DEN + KEEP_SLACK``.
KEEP_NUM, KEEP_DEN, KEEP_SLACK = 5, 4, 16 << 20
#: Share of the available memory a pool may commit by default.
DEFAULT_SHARE = 2

_CAP, _VSIZE, _COMMITTED, _COMMITTED_HW, _WS_CUR, _WS_PREV, _WINDOW = range(BACKEND_SLOT, BACKEND_SLOT + 7)
_UNITS_SLOT = BACKEND_SLOT + 16
_UFIELDS = 4  # per unit: state, generation, owner pid, extent bytes
_EXTENTS_SLOT = _UNITS_SLOT + _UFIELDS * MAX_UNITS


def default_max_bytes() -> int:
    """The default cap on a pool's committed memory: half of the memory available
    now (the smaller of ``MemAvailable`` and the memory cgroup's headroom)."""
    available, _ = available_memory()
    if available is None:
        return 4 << 30
    return max(64 << 20, available // DEFAULT_SHARE // PAGE_SIZE * PAGE_SIZE)


class _Tables:
    """Column views of the shared header: units and extents (see :func:`_tables`)."""

    __slots__ = ("ustate", "ugen", "uowner", "ubytes", "extents")

    def __init__(self, header: np.ndarray) -> None:
        units = header[_UNITS_SLOT:_EXTENTS_SLOT].reshape(_UFIELDS, MAX_UNITS)
        self.ustate, self.ugen, self.uowner, self.ubytes = units
        self.extents = ExtentTable(header, _EXTENTS_SLOT, MAX_EXTENTS)


def _tables(state: ArenaState, header: np.ndarray) -> _Tables:
    """The table views of ``header``, made once per process and kept on the
    arena's state (building them is a measurable part of a unit's cost; the
    state already holds the header, so the cache keeps nothing alive longer)."""
    cached = state.__dict__.get("_elastic_tables")
    if cached is None or cached[0] is not header:
        cached = state.__dict__["_elastic_tables"] = (header, _Tables(header))
    return cached[1]


class SharedMemoryElasticPool(ArenaBase):
    """A zero-copy pool that sizes itself to the units written into it.

    No segment size, no count: a unit of any size up to ``max_bytes`` fits,
    memory is committed as units need it and given back when the working set
    shrinks, and a unit's space is never reused while a view of it lives.
    Picklable (fork, spawn, forkserver), any number of producer processes,
    the same endpoint protocol as :class:`SharedMemorySegmentPool` (so it also
    works as ``arena=`` for SPDL's ``run_pipeline_in_subprocess``).

    Args:
        max_bytes: Cap on committed memory: bytes as an int, an integral float
            or a string (``"4GiB"``). Default: :func:`default_max_bytes`, half
            of the memory available when the pool is made.
        acquire_timeout: Seconds a producer waits, once the cap is reached, for
            restored units to be released before :class:`BufferError`.
    """

    zero_copy = True
    noun = "pool"

    def __init__(self, max_bytes: "int | float | str | None" = None, *, acquire_timeout: float = 60.0) -> None:
        cap = default_max_bytes() if max_bytes is None else parse_bytes(max_bytes, "max_bytes")
        self.max_bytes = cap
        self.acquire_timeout = check_timeout(acquire_timeout)
        # Virtual room beyond the cap so that fragmentation never blocks a unit
        # that fits the cap; it costs address space only.
        vsize = align_up(4 * cap + (64 << 20), 2 << 20)
        self._state: ArenaState | None = ArenaState.create(
            _KIND_ELASTIC,
            vsize,
            _EXTENTS_SLOT + ExtentTable.slots(MAX_EXTENTS),
            f"SharedMemoryElasticPool(max_bytes={self.max_bytes})",
            reserve_data=False,
        )
        header = self._state.header
        header[_CAP], header[_VSIZE] = max(PAGE_SIZE, cap // PAGE_SIZE * PAGE_SIZE), vsize
        _tables(self._state, header).extents.initialise(vsize)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_bytes={self.max_bytes}, acquire_timeout={self.acquire_timeout})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_elastic, (self.state, self.max_bytes, self.acquire_timeout, type(self)))

    @property
    def capacity(self) -> int:
        """The cap on committed bytes (``max_bytes``)."""
        return self.max_bytes

    def open_writer(self) -> ElasticWriter:
        """A producer endpoint for this process (one per producing thread)."""
        return ElasticWriter(self)

    def open_reader(self) -> ElasticReader:
        """The consumer endpoint (zero-copy)."""
        return ElasticReader(self)

    def usage(self) -> dict[str, int]:
        """Units and bytes in use and their high-water marks, plus committed
        bytes (now, as the kernel counts them, and the peak) and the cap."""
        marks = super().usage()
        header = self.state.header
        marks["committed_bytes"] = committed_bytes(self.state.files.memory_fd) - self.state.header_bytes
        marks["committed_high_water"] = int(header[_COMMITTED_HW])
        marks["max_bytes"] = self.max_bytes
        return marks

    def extent_states(self) -> dict[str, int]:
        """Bytes per extent state ('warm', 'busy', 'cold', ...), for diagnostics."""
        flush_leases()
        with self.state.locked() as header:
            table = _tables(self.state, header).extents
            return {name: table.bytes_in(s) for s, name in STATE_NAMES.items() if s}

    def tables(self, header: np.ndarray) -> _Tables:
        """Column views of the unit and extent tables of ``header`` (for endpoints)."""
        return _tables(self.state, header)

    # -- allocation (writers) --------------------------------------------------
    def _new_unit(self, header: np.ndarray, pid: int) -> tuple[int, int] | None:
        tables = _tables(self.state, header)
        slot = int(np.argmin(tables.ustate))  # FREE is 0: the first free slot
        if tables.ustate[slot] != FREE:
            return None
        tables.ustate[slot], tables.uowner[slot], tables.ubytes[slot] = WRITING, pid, 0
        tables.ugen[slot] += 1
        self.state.count_usage(header, 1, 0)
        return slot, int(tables.ugen[slot])

    def _take(self, header: np.ndarray, nbytes: int, pid: int, slot: int) -> Any:
        """Place ``nbytes`` for unit ``slot``: ``(row, start, length, fresh,
        marked)`` or None. A fresh (cold) range must be committed by the caller,
        after punching ``marked``: warm memory above what the working set
        warrants, given back *before* more is committed so that committed memory
        never runs past the target while a unit larger than every warm extent
        is written."""
        tables = _tables(self.state, header)
        extents = tables.extents
        cold_ok = header[_COMMITTED] + nbytes <= header[_CAP]
        placed = extents.take(nbytes, pid, slot, cold_allowed=cold_ok)
        if placed is None:
            return None
        row, start, fresh = placed
        length = int(extents.length[row])
        tables.ubytes[slot] += length
        self.state.count_usage(header, 0, length)
        header[_WS_CUR] = max(header[_WS_CUR], header[H_BYTES])
        marked: list[tuple[int, int]] = []
        if fresh:
            # The marked ranges are punched before this one is committed.
            excess = int(header[_COMMITTED]) + length - self._keep(header)
            if excess > 0:
                marked = self._mark_trim(header, excess, pid)
            header[_COMMITTED] += length
            header[_COMMITTED_HW] = max(header[_COMMITTED_HW], header[_COMMITTED])
        return row, start, length, fresh, marked

    def _room_to_make(self, header: np.ndarray, nbytes: int) -> int:
        """Warm bytes to give back so that ``nbytes`` of cold memory fits the cap."""
        over = int(header[_COMMITTED]) + nbytes - int(header[_CAP])
        warm = _tables(self.state, header).extents.bytes_in(WARM)
        return min(over, warm) if over > 0 and warm > 0 else 0

    def _mark_trim(self, header: np.ndarray, excess: int, pid: int) -> list[tuple[int, int]]:
        marked = _tables(self.state, header).extents.mark_trim(align_up(excess, PAGE_SIZE), pid)
        header[_COMMITTED] -= sum(length for _, length in marked)
        return marked

    def _give_back(self, marked: list[tuple[int, int]]) -> None:
        """Punch the marked ranges (no lock held), then make them cold."""
        if not marked:
            return
        state = self.state
        mapping = state.mapping
        try:
            for start, length in marked:
                mapping.release(state_offset(state, start), length)
        finally:
            with state.locked() as header:
                _tables(state, header).extents.finish_trim(marked, current_pid())

    @staticmethod
    def _keep(header: np.ndarray) -> int:
        """Committed bytes the recent working set warrants."""
        working_set = int(max(header[_WS_PREV], header[_WS_CUR]))
        return working_set * KEEP_NUM // KEEP_DEN + KEEP_SLACK

    def _excess(self, header: np.ndarray) -> int:
        """Committed bytes above what the working set warrants (after a commit)."""
        header[_WINDOW] += 1
        if header[_WINDOW] >= WINDOW_UNITS:
            header[_WS_PREV], header[_WS_CUR], header[_WINDOW] = header[_WS_CUR], header[H_BYTES], 0
        return int(header[_COMMITTED]) - self._keep(header)

    def _fullness(self, header: np.ndarray) -> tuple[int, int, int]:
        """``(committed bytes, cap, units in use)``, for messages."""
        return int(header[_COMMITTED]), int(header[_CAP]), int(header[H_UNITS])

    def _close_unit(
        self, header: np.ndarray, slot: int, last: tuple[int, int, int] | None, used: int
    ) -> list[tuple[int, int]]:
        """Commit unit ``slot`` (lock held): give the unused tail of its ``last``
        extent ``(row, start, length)`` back, mark it filled, and mark warm
        memory above the working set for trimming; returns the marked ranges
        (to punch without the lock). A busy extent's row never moves."""
        tables = _tables(self.state, header)
        if last is not None:
            row, start, length = last
            keep = align_up(used, PAGE_SIZE)
            if not (tables.extents.state[row] == BUSY and tables.extents.start[row] == start):
                row = tables.extents.row_containing(start, length)
            if row >= 0 and keep < length:
                tail = tables.extents.shrink(row, keep)
                tables.ubytes[slot] -= tail
                self.state.count_usage(header, 0, -tail)
        tables.ustate[slot] = FILLED
        excess = self._excess(header)
        return self._mark_trim(header, excess, current_pid()) if excess > 0 else []

    def _abort_unit(self, header: np.ndarray, slot: int, gen: int, *, punch: bool) -> None:
        """Drop unit ``slot`` of generation ``gen`` if it is still being written."""
        tables = _tables(self.state, header)
        if tables.ugen[slot] == gen and tables.ustate[slot] == WRITING:
            self._drop_unit(header, slot, punch=punch)

    def trim(self, keep_bytes: int = 0) -> int:
        """Give warm (free, committed) memory above ``keep_bytes`` back to the
        kernel now; returns the bytes given back. Units in use are untouched."""
        flush_leases()
        with self.state.locked() as header:
            excess = min(int(header[_COMMITTED]) - keep_bytes, _tables(self.state, header).extents.bytes_in(WARM))
            marked = self._mark_trim(header, excess, current_pid()) if excess > 0 else []
        self._give_back(marked)
        return sum(length for _, length in marked)

    def _reclaim_dead(self, header: np.ndarray) -> int:
        """Free units whose writer died mid-unit and ranges a dead process was
        giving back. Their memory may be half committed: it is punched here."""
        tables = _tables(self.state, header)
        extents = tables.extents
        reclaimed = 0
        for slot in np.flatnonzero(tables.ustate == WRITING):
            if not pid_alive(int(tables.uowner[slot])):
                self._drop_unit(header, int(slot), punch=True)
                reclaimed += 1
        for row in extents.rows_in(TRIM):
            # finish_trim coalesces: a row of this snapshot may have been merged away.
            if extents.state[row] == TRIM and not pid_alive(int(extents.owner[row])):
                self.state.mapping.release(state_offset(self.state, int(extents.start[row])), int(extents.length[row]))
                extents.finish_trim([(int(extents.start[row]), 0)], int(extents.owner[row]))
                reclaimed += 1
        return reclaimed

    def _drop_unit(self, header: np.ndarray, slot: int, *, punch: bool) -> None:
        _drop_unit(self.state, header, slot, punch=punch)

    def release_function(self) -> Any:
        """What a reader's lease tracker calls to free a unit (needs no open pool)."""
        return functools.partial(release_unit, self.state)

    def reclaim_locked(self, header: np.ndarray, producer_pids: "list[int] | tuple[int, ...]") -> int:
        """:meth:`reclaim` for a caller that already holds the arena lock."""
        pids = {int(p) for p in producer_pids}
        tables = _tables(self.state, header)
        freed = 0
        for slot in np.flatnonzero((tables.ustate == WRITING) | (tables.ustate == FILLED)):
            owner = int(tables.uowner[slot])
            if owner in pids and not pid_alive(owner):
                self._drop_unit(header, int(slot), punch=tables.ustate[slot] == WRITING)
                freed += 1
        return freed


def state_offset(state: ArenaState, start: int) -> int:
    """Offset in the memory file of data-region offset ``start``."""
    return state.header_bytes + start


def _drop_unit(state: ArenaState, header: np.ndarray, slot: int, *, punch: bool, rows: Any = None) -> None:
    """Free unit ``slot`` and its extents (``rows``, if the caller knows them):
    kept warm, or (``punch``, for memory that may be half committed) given back
    and cold. Lock held."""
    tables = _tables(state, header)
    extents = tables.extents
    if rows is None or not _rows_are_unit(extents, rows, slot, int(tables.ubytes[slot])):
        rows = extents.rows_of(slot)
    if punch:
        ranges = [(int(extents.start[r]), int(extents.length[r])) for r in rows]
        for start, length in ranges:
            state.mapping.release(state_offset(state, start), length)
        extents.free_rows(rows, TRIM)
        extents.finish_trim(ranges, 0)
        header[_COMMITTED] -= sum(length for _, length in ranges)
    else:
        extents.free_rows(rows, WARM)
    state.count_usage(header, -1, -int(tables.ubytes[slot]))
    tables.ustate[slot], tables.uowner[slot], tables.ubytes[slot] = FREE, 0, 0


def _rows_are_unit(extents: ExtentTable, rows: Any, slot: int, nbytes: int) -> bool:
    """Whether ``rows`` are exactly the busy extents of unit ``slot`` (``nbytes`` in all)."""
    rows = list(rows)
    return (
        bool(rows)
        and bool(np.all(extents.state[rows] == BUSY))
        and bool(np.all(extents.unit[rows] == slot))
        and int(extents.length[rows].sum()) == nbytes
    )


def release_unit(state: ArenaState, header: np.ndarray, key: tuple[int, ...]) -> None:
    """Free restored unit ``key = (slot, generation, rows)`` (lock held).

    Takes the state, not the pool: it runs after ``close()`` too, when the last
    view of a unit dies. ``rows`` are the unit's extent rows as the reader saw
    them (busy rows never move); checked, and looked up again if they are not.
    """
    slot, gen = key[0], key[1]
    tables = _tables(state, header)
    if tables.ugen[slot] == gen and tables.ustate[slot] in (FILLED, HELD):
        _drop_unit(state, header, slot, punch=False, rows=key[2] if len(key) > 2 else None)


def _rebuild_elastic(state: ArenaState, max_bytes: int, timeout: float, cls: type = SharedMemoryElasticPool) -> Any:
    pool = cls.__new__(cls)
    pool.max_bytes, pool.acquire_timeout = max_bytes, timeout
    pool._state = state
    return pool


class SharedMemoryElasticRing(SharedMemoryElasticPool):
    """The ring's semantics over the elastic pool's memory: nothing to size.

    Every restore is a private copy (nothing in the consumer points into shared
    memory, so batches the training loop keeps cost no arena space) into
    recycled private memory (see :mod:`torch_arena._arena.private`), and a unit's
    space is free again as soon as it is read. Memory grows with the batches up
    to ``max_bytes`` and shrinks with them, as for
    :class:`SharedMemoryElasticPool`; a writer blocks (up to
    ``acquire_timeout``) at the cap. What ``ArenaDataLoader(arena="ring")``
    uses; :class:`SharedMemoryRingBuffer` keeps SPDL's fixed, non-blocking ring.

    Args:
        max_bytes: Cap on committed memory (default: half of the memory available).
        acquire_timeout: Seconds a producer waits for space at the cap.
    """

    zero_copy = False
    noun = "ring"

    def open_reader(self) -> ElasticCopyReader:
        """The consumer endpoint (copy-out)."""
        return ElasticCopyReader(self)
