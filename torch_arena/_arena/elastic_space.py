"""The elastic memory: units of any size, memory committed only while it is used.

A fixed pool needs two guesses, the largest unit and how many are in flight,
and holds ``segment_size × count`` whatever the units are. The elastic memory
needs neither. Its memory file has a large *virtual* size, free until
written, mapped once per process (not pre-faulted). Each unit is a list of
extents of the shared :class:`~torch_arena._arena.extents.ExtentTable`, taken
a chunk at a time as binaries arrive (a chunk holds at least the binary, at
least :data:`MIN_CHUNK`, and grows with the unit by up to :data:`MAX_GROWTH`,
so a unit of many binaries has few extents); the unused tail of the last
chunk goes back when the unit is committed. Memory follows the working set:

* a range is committed with ``posix_fallocate`` the first time it is handed
  out, by the writer, outside the lock: exhaustion is a :class:`MemoryError`
  naming the sizes, never a SIGBUS, and the training process never pays for
  fresh memory;
* freed extents stay warm and are reused first (best fit): a recycled extent
  costs one warm copy, a fresh one what torch's fresh segment costs;
* warm memory above what the working-set rule keeps
  (:mod:`torch_arena._arena.working_set`) goes back to the kernel (a hole
  punch, outside the lock) after each commit, and *before* fresh memory is
  committed, so committed memory never runs past the target while a unit
  larger than every warm extent is written; an epoch boundary starts a new
  window, so memory sized for an earlier epoch goes back within two;
* committed memory never exceeds the cap: a writer that needs more first
  gives back warm memory that cannot serve it, then waits.

The backend's header region:

==================  ========================================================
words               meaning
==================  ========================================================
``CAP``             the cap on committed bytes (page multiple)
``COMMITTED``, _HW  bytes committed to extents now, and the peak
working set         3 words of :class:`~torch_arena._arena.working_set.WorkingSet`
``LAST_FREED``      the extent row freed last: tried first by the next take
unit heads          per unit slot, the first row of its chain of busy extents
extent table        see :mod:`torch_arena._arena.extents`
==================  ========================================================
"""

from __future__ import annotations

from torch_arena._arena.arena_file import H_BYTES, H_UNITS, ArenaFile, align_up
from torch_arena._arena.extents import BUSY, TRIM, WARM, ExtentTable
from torch_arena._arena.space import Extent, Placement, Space, too_large
from torch_arena._arena.units import UnitTable
from torch_arena._arena.working_set import CELLS, WorkingSet
from torch_arena._os.memory import PAGE_SIZE, commit_range, committed_bytes
from torch_arena._os.sizes import format_bytes
from torch_arena._os.sync import current_pid, pid_alive

__all__ = ["ElasticSpace", "MAX_GROWTH", "MIN_CHUNK"]

MAX_UNITS = 4096
MAX_EXTENTS = 8192
#: Smallest chunk a writer takes: small binaries share one.
MIN_CHUNK = 64 << 10
#: Largest step by which a unit's chunks grow ahead of its binaries.
MAX_GROWTH = 4 << 20
_CAP, _COMMITTED, _COMMITTED_HW, _WORKING_SET, _LAST_FREED = 0, 1, 2, 3, 6
_HEADS = 8


class _Views:
    """This process's views of the backend's header region."""

    __slots__ = ("header", "words", "heads", "extents", "working_set")

    def __init__(self, units: UnitTable, region: int) -> None:
        self.header = units.header
        self.words = units.words[region : region + _HEADS]
        self.heads = units.words[region + _HEADS : region + _HEADS + MAX_UNITS]
        self.extents = ExtentTable(units.header, units.words, region + _HEADS + MAX_UNITS, MAX_EXTENTS)
        self.working_set = WorkingSet(self.words[_WORKING_SET : _WORKING_SET + CELLS])

    def rows_of(self, slot: int) -> list[int]:
        """The busy extent rows of unit ``slot``."""
        return self.extents.chain(self.heads[slot])


class ElasticSpace(Space):
    """Space for the self-sizing arenas."""

    reserve_data = False
    unit_slots = MAX_UNITS
    views_class = _Views

    def __init__(self, max_bytes: int, noun: str, name: str) -> None:
        self.max_bytes = max_bytes
        self.noun = noun
        self.name = name
        # Virtual room beyond the cap so that fragmentation never blocks a
        # unit that fits the cap; it costs address space only.
        self.data_bytes = align_up(4 * max_bytes + (64 << 20), 2 << 20)

    def header_slots(self) -> int:
        return _HEADS + MAX_UNITS + ExtentTable.slots(MAX_EXTENTS)

    def initialise(self, units: UnitTable) -> None:
        views = self.views(units)
        views.words[_CAP] = max(PAGE_SIZE, self.max_bytes // PAGE_SIZE * PAGE_SIZE)
        units.header[self.region + _HEADS : self.region + _HEADS + MAX_UNITS] = -1
        views.words[_LAST_FREED] = -1
        views.extents.initialise(self.data_bytes)

    # -- sizing --------------------------------------------------------------------------
    def chunk(self, taken: int, used: int, nbytes: int) -> int:
        cap = self.max_bytes
        pages = -(-nbytes // PAGE_SIZE) * PAGE_SIZE
        if taken + pages > cap:
            raise too_large(taken + nbytes, f"a {self.noun} capped at {format_bytes(cap)}", cap, "max_bytes")
        # At least the binary and MIN_CHUNK; growing with the unit, by MAX_GROWTH at most.
        need = max(pages, MIN_CHUNK, -(-min(taken, MAX_GROWTH) // PAGE_SIZE) * PAGE_SIZE)
        return need if taken + need <= cap else pages

    # -- under the lock --------------------------------------------------------------------
    def take(self, units: UnitTable, slot: int, nbytes: int, need: int, pid: int) -> Placement | None:
        views = self.views(units)
        words, extents = views.words, views.extents
        placed = extents.take(
            nbytes, pid, slot, cold_allowed=words[_COMMITTED] + nbytes <= words[_CAP], hint=words[_LAST_FREED]
        )
        if placed is None:
            return None
        row, start, fresh = placed
        extents.next[row], views.heads[slot] = views.heads[slot], row  # the unit's chain
        length = extents.length[row]
        units.charge(slot, length)
        views.working_set.observe(units.words[H_BYTES])
        marked: tuple[Extent, ...] = ()
        if fresh:
            # Give back warm memory above the target *before* committing more.
            excess = words[_COMMITTED] + length - views.working_set.keep()
            if excess > 0:
                marked = self._mark_trim(views, excess, pid)
            words[_COMMITTED] += length
            if words[_COMMITTED] > words[_COMMITTED_HW]:
                words[_COMMITTED_HW] = words[_COMMITTED]
        return Placement(start, length, fresh, marked, row)

    def close_unit(self, units: UnitTable, slot: int, last: Placement | None, used: int) -> tuple[Extent, ...]:
        views = self.views(units)
        extents = views.extents
        keep = align_up(used, PAGE_SIZE)
        if last is not None and keep < last.length:  # an unused tail to give back
            row = last.hint
            if not (0 <= row < extents.rows and extents.state[row] == BUSY and extents.start[row] == last.start):
                row = extents.row_containing(last.start, last.length)  # busy rows never move; checked anyway
            if row >= 0:
                units.charge(slot, -extents.shrink(row, keep))
        working_set = views.working_set
        working_set.tick(units.words[H_BYTES])
        excess = views.words[_COMMITTED] - working_set.keep()
        return self._mark_trim(views, excess, current_pid()) if excess > 0 else ()

    def free_unit(self, units: UnitTable, slot: int, *, punch: bool) -> None:
        views = self.views(units)
        extents = views.extents
        rows = views.rows_of(slot)
        views.heads[slot] = -1
        if not punch:
            extents.free_rows(rows, WARM)
            if rows:
                views.words[_LAST_FREED] = rows[0]
            return
        # Memory a failed or dead writer may have half committed: given back
        # here, under the lock (a rare path).
        ranges = [(extents.start[r], extents.length[r]) for r in rows]
        for start, length in ranges:
            self._file().give_back(start, length)
        extents.free_rows(rows, TRIM)
        extents.finish_trim(ranges, 0)
        views.words[_COMMITTED] -= sum(length for _, length in ranges)

    def extents(self, units: UnitTable, slot: int) -> list[Extent]:
        views = self.views(units)
        start, length = views.extents.start, views.extents.length
        return [Extent(start[r], length[r]) for r in views.rows_of(slot)]

    def unit_at(self, units: UnitTable, offset: int, nbytes: int) -> int:
        # A binary may run across two adjacent extents of its unit: find the
        # unit by its first byte, then check the whole range against the unit.
        extents = self.views(units).extents
        row = extents.row_containing(offset, 1)
        if row < 0:
            return -1
        slot = extents.unit[row]
        covered = offset
        for start, length in sorted(self.extents(units, slot)):
            if start <= covered < start + length:
                covered = start + length
        return slot if covered >= offset + nbytes else -1

    def make_room(self, units: UnitTable, nbytes: int, pid: int) -> tuple[Extent, ...]:
        views = self.views(units)
        words = views.words
        over = words[_COMMITTED] + nbytes - words[_CAP]
        warm = views.extents.bytes_in(WARM)
        return self._mark_trim(views, min(over, warm), pid) if over > 0 and warm > 0 else ()

    def reclaim_dead(self, units: UnitTable) -> int:
        """Ranges a dead process was giving back (marked, never finished)."""
        extents = self.views(units).extents
        reclaimed = 0
        for row in extents.rows_in(TRIM).tolist():
            if extents.state[row] == TRIM and not pid_alive(extents.owner[row]):
                self._file().give_back(extents.start[row], extents.length[row])
                extents.finish_trim([(extents.start[row], 0)], extents.owner[row])
                reclaimed += 1
        return reclaimed

    def note_epoch(self, units: UnitTable) -> None:
        self.views(units).working_set.roll(units.words[H_BYTES])

    def trim(self, units: UnitTable, keep_bytes: int) -> tuple[Extent, ...]:
        """Mark warm memory above ``keep_bytes`` committed to be given back."""
        views = self.views(units)
        excess = min(views.words[_COMMITTED] - keep_bytes, views.extents.bytes_in(WARM))
        return self._mark_trim(views, excess, current_pid()) if excess > 0 else ()

    def _mark_trim(self, views: _Views, excess: int, pid: int) -> tuple[Extent, ...]:
        marked = views.extents.mark_trim(align_up(excess, PAGE_SIZE), pid)
        views.words[_COMMITTED] -= sum(length for _, length in marked)
        return tuple(Extent(start, length) for start, length in marked)

    def state_bytes(self, units: UnitTable) -> dict[int, int]:
        """Bytes per extent state."""
        extents = self.views(units).extents
        return {state: extents.bytes_in(state) for state in range(1, 5)}

    # -- outside the lock ----------------------------------------------------------------
    def _file(self) -> ArenaFile:
        assert self.file is not None, "ElasticSpace used before ArenaCore attached its file"
        return self.file

    def after_take(self, placement: Placement, what: str) -> None:
        if placement.give_back:
            self.give_back(placement.give_back)
        if placement.fresh:
            file = self._file()
            commit = (file.fds.memory_fd, file.header_bytes + placement.start, placement.length, what)
            try:
                commit_range(*commit)
            except MemoryError:
                # Warm memory is memory torch's own transport would not hold:
                # give it all back before refusing.
                if not self._give_back_warm():
                    raise
                commit_range(*commit)

    def _give_back_warm(self) -> int:
        """Give every warm extent back to the kernel now; returns the bytes."""
        file = self._file()
        with file.locked():
            marked = self.trim(file.cached("units", UnitTable), 0)
        return self.give_back(marked)

    def give_back(self, ranges: tuple[Extent, ...]) -> int:
        """Punch the marked ranges (no lock held), then make them cold; the
        bytes given back."""
        if not ranges:
            return 0
        file = self._file()
        try:
            for start, length in ranges:
                file.give_back(start, length)
        finally:
            with file.locked():
                self.views(file.cached("units", UnitTable)).extents.finish_trim(list(ranges), current_pid())
        return sum(length for _, length in ranges)

    def committed(self, units: UnitTable) -> tuple[int, int]:
        file = self._file()
        return committed_bytes(file.fds.memory_fd) - file.header_bytes, self.views(units).words[_COMMITTED_HW]

    def cap(self, units: UnitTable) -> int | None:
        return int(self.views(units).words[_CAP])

    def full_message(self, units: UnitTable, need: int, waited: float, timeout: float) -> str:
        words = self.views(units).words
        return (
            f"{self.name}: no room for {format_bytes(need)} after {waited:.1f} s: "
            f"{format_bytes(words[_COMMITTED])} of its {format_bytes(words[_CAP])} cap (max_bytes) "
            f"is committed to units in flight or held by restored views ({units.words[H_UNITS]} units). "
            "Drop restored batches sooner, raise max_bytes, or raise acquire_timeout."
        )
