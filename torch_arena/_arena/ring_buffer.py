"""The ring buffer: variable-size units in one region, copied out on restore.

SPDL's ring. Producers reserve space at the head of the ring as binaries
arrive; the consumer copies each unit out into recycled private memory and
releases it at once, so no view into the ring ever escapes. Space comes back
from the tail, in order: a unit released out of order waits for the ones
before it (its bytes stay counted in use until then).

Several producers may write at once: every reservation is an *entry* made
under the arena lock, and a unit whose binaries were interleaved with another
producer's owns several entries (a unit's next reservation extends its last
entry when nobody reserved in between). The entries live in the backend's
header region:

=============  ===================================================
words          meaning
=============  ===================================================
``HEAD``       logical end of the newest reservation
``TAIL``       logical start of the oldest entry still in use
``HEAD_SEQ``   sequence number of the next entry
``TAIL_SEQ``   sequence number of the oldest entry
entry table    4 columns × :data:`MAX_ENTRIES`: start, end, busy, unit slot
=============  ===================================================

Logical offsets grow forever; ``offset % size`` is where a byte lies. With
the default ``acquire_timeout=0`` a unit that does not fit raises
``ArenaSpaceTimeout("shared-memory arena full: …")`` at once, as SPDL's ring
did up to spdl 0.7 (spdl 0.8 waits by default); with a positive timeout the
producer waits for space like the pools do.
"""

from __future__ import annotations

from typing import Any

from torch_arena._arena.arena_file import H_UNITS, KIND_RING_BUFFER, align_up
from torch_arena._arena.handle import NON_BLOCKING_TIMEOUT_S, ArenaHandle, check_positive_int, check_timeout
from torch_arena._arena.readers import CopyOutReader
from torch_arena._arena.space import Extent, Placement, Space, too_large
from torch_arena._arena.units import UnitTable
from torch_arena._os.sizes import format_bytes
from torch_arena.errors import ArenaSpaceTimeout

__all__ = ["SharedMemoryRingBuffer"]

#: Reservations the ring tracks at once (and so the most units in flight).
MAX_ENTRIES = 1024
_HEAD, _TAIL, _HEAD_SEQ, _TAIL_SEQ = range(4)
_TABLE = 8
_COLUMNS = 4


class _Entries:
    """Column views of the ring's region of one header."""

    __slots__ = ("header", "words", "start", "end", "busy", "unit")

    def __init__(self, units: UnitTable, region: int) -> None:
        self.header = units.header
        self.words = units.words[region : region + _TABLE]
        base = region + _TABLE
        self.start, self.end, self.busy, self.unit = (
            units.words[base + i * MAX_ENTRIES : base + (i + 1) * MAX_ENTRIES] for i in range(_COLUMNS)
        )

    def live(self, slot: int = -1) -> list[int]:
        """Table rows of the busy entries between the tail and the head, oldest
        first (of unit ``slot`` only, unless it is -1)."""
        words = self.words
        busy, unit = self.busy, self.unit
        rows = []
        for seq in range(words[_TAIL_SEQ], words[_HEAD_SEQ]):
            row = seq % MAX_ENTRIES
            if busy[row] and (slot < 0 or unit[row] == slot):
                rows.append(row)
        return rows


class RingSpace(Space):
    """Space for the ring: reservations at the head, returned from the tail."""

    noun = "ring"
    unit_slots = MAX_ENTRIES
    views_class = _Entries

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = align_up(capacity)
        self.data_bytes = self.size

    def header_slots(self) -> int:
        return _TABLE + _COLUMNS * MAX_ENTRIES

    def _in_use(self, entries: _Entries) -> int:
        return entries.words[_HEAD] - entries.words[_TAIL]

    def chunk(self, taken: int, used: int, nbytes: int) -> int:
        need = align_up(max(nbytes, 1))
        if taken + need > self.size:  # waiting cannot help: larger than the whole ring
            raise too_large(taken + need, f"a ring of {format_bytes(self.capacity)}", self.capacity, "capacity")
        return need

    def take(self, units: UnitTable, slot: int, nbytes: int, need: int, pid: int) -> Placement | None:
        entries = self.views(units)
        words, size = entries.words, self.size
        head, tail = words[_HEAD], words[_TAIL]
        before = head - tail
        if words[_HEAD_SEQ] > words[_TAIL_SEQ]:
            row = (words[_HEAD_SEQ] - 1) % MAX_ENTRIES
            start, end = entries.start[row], entries.end[row]
            if (
                entries.unit[row] == slot and entries.busy[row] and end == head
                and start % size + (end - start) + nbytes <= size and end + nbytes - tail <= size
            ):
                entries.end[row] = words[_HEAD] = end + nbytes  # extend the unit's newest entry
                units.count(0, end + nbytes - tail - before)
                return Placement(start % size + (end - start), nbytes)
        if words[_HEAD_SEQ] - words[_TAIL_SEQ] >= MAX_ENTRIES:
            return None
        pos = head % size
        start = head + (size - pos) if pos + nbytes > size else head  # a binary never wraps
        if start + nbytes - tail > size:
            return None
        row = words[_HEAD_SEQ] % MAX_ENTRIES
        entries.start[row], entries.end[row], entries.busy[row], entries.unit[row] = start, start + nbytes, 1, slot
        words[_HEAD], words[_HEAD_SEQ] = start + nbytes, words[_HEAD_SEQ] + 1
        units.count(0, start + nbytes - tail - before)
        return Placement(start % size, nbytes)

    def free_unit(self, units: UnitTable, slot: int, *, punch: bool) -> None:
        entries = self.views(units)
        before = self._in_use(entries)
        for row in entries.live(slot):
            entries.busy[row] = 0
        words = entries.words
        while words[_TAIL_SEQ] < words[_HEAD_SEQ]:
            row = words[_TAIL_SEQ] % MAX_ENTRIES
            if entries.busy[row]:
                break
            words[_TAIL], words[_TAIL_SEQ] = entries.end[row], words[_TAIL_SEQ] + 1
        if words[_TAIL_SEQ] == words[_HEAD_SEQ]:
            # Empty: restart at the next wrap boundary, so the whole ring is
            # one free run again (a binary must not straddle the end).
            head = words[_HEAD]
            words[_TAIL] = words[_HEAD] = head + (-head % self.size)
        units.count(0, self._in_use(entries) - before)

    def extents(self, units: UnitTable, slot: int) -> list[Extent]:
        entries = self.views(units)
        size = self.size
        return [Extent(entries.start[row] % size, entries.end[row] - entries.start[row]) for row in entries.live(slot)]

    def unit_at(self, units: UnitTable, offset: int, nbytes: int) -> int:
        entries = self.views(units)
        for row in entries.live():
            start = entries.start[row] % self.size
            if start <= offset and offset + nbytes <= start + entries.end[row] - entries.start[row]:
                return entries.unit[row]
        return -1

    def full_message(self, units: UnitTable, need: int, waited: float, timeout: float) -> str:
        in_use = self._in_use(self.views(units))
        in_flight = units.words[H_UNITS]
        return (
            f"shared-memory arena full: {format_bytes(need)} more requested, "
            f"{format_bytes(max(0, self.capacity - in_use))} of {format_bytes(self.capacity)} free with "
            f"{in_flight} unit(s) in flight. Size capacity for the in-flight high-water mark, roughly "
            "(buffer_size + 2) × max_item_bytes"
            + (f" (waited {waited:.1f} s)" if timeout else ", or pass acquire_timeout > 0 to wait for space")
        )


class SharedMemoryRingBuffer(ArenaHandle):
    """A shared-memory ring of ``capacity`` bytes; restores are private copies.

    Picklable and usable by several producer processes at once, from fork,
    spawn and forkserver children alike. All memory is reserved up front.

    Args:
        capacity: Bytes in the ring. Size it for the in-flight high-water mark,
            roughly ``(buffer_size + 2) × max_item_bytes``.
        acquire_timeout: Seconds a producer waits for space; ``0`` (the
            default) raises ``ArenaSpaceTimeout("shared-memory arena full: …")`` at once.
    """

    KIND = KIND_RING_BUFFER
    reader_class = CopyOutReader

    def __init__(self, capacity: int, *, acquire_timeout: float = NON_BLOCKING_TIMEOUT_S) -> None:
        self._set_params({"capacity": capacity, "acquire_timeout": acquire_timeout})
        self._create(f"SharedMemoryRingBuffer(capacity={capacity})")

    def _params(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "acquire_timeout": self.acquire_timeout}

    def _set_params(self, params: dict[str, Any]) -> None:
        self.capacity = check_positive_int("capacity", params["capacity"])
        self.acquire_timeout = check_timeout(params["acquire_timeout"])

    def _make_space(self) -> RingSpace:
        return RingSpace(self.capacity)

    def describe(self) -> str:
        return f"a ring of {format_bytes(self.capacity)}"

    def _advice(self, exc: BaseException, unit_bytes: int, units_in_flight: int) -> str:
        want = (unit_bytes + (64 << 10)) * units_in_flight
        wait = " and pass acquire_timeout > 0 to wait for space" if isinstance(exc, ArenaSpaceTimeout) else ""
        return (
            f"give the ring room for every batch in flight: SharedMemoryRingBuffer(capacity={want}) "
            f"({units_in_flight} × the batch){wait}, or pass arena='ring' (a ring that sizes itself)"
        )
