"""The ring buffer: variable-size units in one region, copied out on restore.

Producers reserve space at the head of the ring; the consumer copies each unit
out into private memory and frees it at once, so no view into the ring ever
escapes. Space is reclaimed from the tail as soon as the oldest unit is freed;
units freed out of order wait for the ones before them.

Several producers may write at once: every reservation is an *entry* made
under the arena lock, and a unit whose binaries were interleaved with another
producer's simply owns several entries. Entries are kept in a fixed table in
the shared header (allocation order), so the span of a unit is one integer:
the sequence number of its first entry.

With the default ``acquire_timeout=0`` a unit that does not fit raises
``BufferError("shared-memory arena full: …")`` straight away (SPDL's
behaviour); with a positive timeout the producer waits for space like the
pool does.
"""

from __future__ import annotations

import time
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
    CopyingWriter,
    align_up,
    check_positive_int,
    check_timeout,
)
from torch_arena._os.sizes import format_bytes
from torch_arena._arena.private import process_buffers
from torch_arena._os.sync import current_pid, pid_alive

__all__ = ["SharedMemoryRingBuffer"]

_KIND_RING = 2
_MAX_ENTRIES = 1024
_HEAD, _TAIL, _HEAD_SEQ, _TAIL_SEQ = range(BACKEND_SLOT, BACKEND_SLOT + 4)
_TABLE = BACKEND_SLOT + 8
_FIELDS = 6  # per entry: seq, start, end, state, owner pid, unit seq
_SEQ, _START, _END, _STATE, _OWNER, _UNIT = range(_FIELDS)
EMPTY_SPAN = (1 << 63) - 1


class SharedMemoryRingBuffer(ArenaBase):
    """A shared-memory ring of ``capacity`` bytes; restores are private copies.

    Picklable and usable by several producer processes at once, from fork,
    spawn and forkserver children alike. All memory is reserved up front.

    Args:
        capacity: Bytes in the ring. Size it for the in-flight high-water mark,
            roughly ``(buffer_size + 2) × max_item_bytes``.
        acquire_timeout: Seconds a producer waits for space; ``0`` (the
            default) raises ``BufferError("shared-memory arena full: …")`` at once.
    """

    def __init__(self, capacity: int, *, acquire_timeout: float = 0.0) -> None:
        self.capacity = check_positive_int("capacity", capacity)
        self.acquire_timeout = check_timeout(acquire_timeout)
        self._size = align_up(capacity)
        self._state: ArenaState | None = ArenaState.create(
            _KIND_RING,
            self._size,
            _TABLE + _FIELDS * _MAX_ENTRIES,
            f"SharedMemoryRingBuffer(capacity={capacity})",
        )

    def __repr__(self) -> str:
        return f"SharedMemoryRingBuffer(capacity={self.capacity}, acquire_timeout={self.acquire_timeout})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_ring, (self.state, self.capacity, self.acquire_timeout))

    def open_writer(self) -> "RingWriter":
        """A producer endpoint for this process (one per producing thread)."""
        return RingWriter(self)

    def open_reader(self) -> "RingReader":
        """The consumer endpoint."""
        return RingReader(self)

    # -- entry table (all under the lock) ------------------------------------------
    @staticmethod
    def _entry(header: np.ndarray, seq: int) -> np.ndarray:
        base = _TABLE + _FIELDS * (seq % _MAX_ENTRIES)
        return header[base : base + _FIELDS]

    def _live_entries(self, header: np.ndarray) -> "list[np.ndarray]":
        return [self._entry(header, s) for s in range(int(header[_TAIL_SEQ]), int(header[_HEAD_SEQ]))]

    def _advance_tail(self, header: np.ndarray) -> None:
        while header[_TAIL_SEQ] < header[_HEAD_SEQ]:
            entry = self._entry(header, int(header[_TAIL_SEQ]))
            if entry[_STATE] != FREE:
                break
            header[_TAIL] = entry[_END]
            header[_TAIL_SEQ] += 1
        if header[_TAIL_SEQ] == header[_HEAD_SEQ]:
            # Empty: restart at the next wrap boundary, so the whole capacity is
            # one free run again (a unit must not straddle the end of the ring).
            head = int(header[_HEAD])
            header[_TAIL] = header[_HEAD] = head + (-head % self._size)

    def _note_usage(self, header: np.ndarray, units_delta: int) -> None:
        in_use = int(header[_HEAD] - header[_TAIL])
        self.state.count_usage(header, units_delta, in_use - int(header[H_BYTES]))

    def _reserve(self, header: np.ndarray, nbytes: int, extend_seq: int | None, pid: int) -> tuple[int, int] | None:
        """Place ``nbytes``; returns ``(entry seq, physical offset)`` or None if full."""
        size = self._size
        head, tail = int(header[_HEAD]), int(header[_TAIL])
        if extend_seq is not None and extend_seq == header[_HEAD_SEQ] - 1:
            entry = self._entry(header, extend_seq)
            start, end = int(entry[_START]), int(entry[_END])
            if end == head and (start % size) + (end - start) + nbytes <= size and end + nbytes - tail <= size:
                entry[_END] = end + nbytes
                header[_HEAD] = end + nbytes
                return extend_seq, (start % size) + (end - start)
        if header[_HEAD_SEQ] - header[_TAIL_SEQ] >= _MAX_ENTRIES:
            return None
        pos = head % size
        start = head + (size - pos) if pos + nbytes > size else head
        if start + nbytes - tail > size:
            return None
        seq = int(header[_HEAD_SEQ])
        entry = self._entry(header, seq)
        entry[_SEQ], entry[_START], entry[_END] = seq, start, start + nbytes
        entry[_STATE], entry[_OWNER], entry[_UNIT] = WRITING, pid, seq if extend_seq is None else -1
        header[_HEAD] = start + nbytes
        header[_HEAD_SEQ] = seq + 1
        return seq, start % size

    def _reclaim_dead_writers(self, header: np.ndarray) -> int:
        units = set()
        for entry in self._live_entries(header):
            if entry[_STATE] == WRITING and not pid_alive(int(entry[_OWNER])):
                entry[_STATE] = FREE
                units.add(int(entry[_UNIT]))
        if units:
            self._advance_tail(header)
            self._note_usage(header, -len(units))
        return len(units)

    def reclaim_locked(self, header: np.ndarray, producer_pids: "list[int] | tuple[int, ...]") -> int:
        """:meth:`reclaim` for a caller that already holds the arena lock."""
        pids = {int(p) for p in producer_pids}
        freed = set()
        for entry in self._live_entries(header):
            owner = int(entry[_OWNER])
            if entry[_STATE] in (WRITING, FILLED) and owner in pids and not pid_alive(owner):
                entry[_STATE] = FREE
                freed.add(int(entry[_UNIT]))
        if freed:
            self._advance_tail(header)
            self._note_usage(header, -len(freed))
        return len(freed)

    def _free_unit(self, header: np.ndarray, unit_seq: int, states: tuple[int, ...]) -> int:
        freed = 0
        for entry in self._live_entries(header):
            if entry[_UNIT] == unit_seq and entry[_STATE] in states:
                entry[_STATE] = FREE
                freed += 1
        if freed:
            self._advance_tail(header)
            self._note_usage(header, -1)
        return freed


def _rebuild_ring(state: ArenaState, capacity: int, timeout: float) -> SharedMemoryRingBuffer:
    ring = SharedMemoryRingBuffer.__new__(SharedMemoryRingBuffer)
    ring.capacity, ring.acquire_timeout = capacity, timeout
    ring._size = align_up(capacity)
    ring._state = state
    return ring


class RingWriter(CopyingWriter):
    """Producer endpoint of a :class:`SharedMemoryRingBuffer`."""

    def __init__(self, ring: SharedMemoryRingBuffer) -> None:
        self._ring = ring
        self._state = ring.state
        self.token = self._state.token
        self._open = False
        self._unit_seq: int | None = None
        self._last_seq: int | None = None
        self._ranges: list[tuple[int, int]] = []
        self.last_wait_seconds = 0.0
        self._timeout = ring.acquire_timeout

    def reset(self) -> None:
        """Abandon a unit left open."""
        if self._open:
            self.abort_unit()

    def begin_unit(self, timeout: float | None = None) -> None:
        """Open a new unit; space is reserved as binaries are written."""
        if self._open:
            raise RuntimeError("begin_unit: a unit is already open; commit_unit() or abort_unit() it first")
        self._open = True
        self._unit_seq = self._last_seq = None
        self._ranges = []
        self.last_wait_seconds = 0.0
        self._timeout = self._ring.acquire_timeout if timeout is None else timeout

    def allocate(self, nbytes: int) -> tuple[int, np.ndarray]:
        """Reserve ``nbytes`` in the open unit; returns ``(offset, writable uint8 view)``."""
        if not self._open:
            raise RuntimeError("no open unit: call begin_unit() first")
        ring, state = self._ring, self._state
        need = align_up(max(nbytes, 1))
        unit_bytes = sum(hi - lo for lo, hi in self._ranges) + need
        if unit_bytes > ring._size:
            # Waiting cannot help: the unit alone is larger than the whole ring.
            raise BufferError(
                f"a unit of at least {format_bytes(unit_bytes)} ({unit_bytes} bytes) does not fit "
                f"a ring of {format_bytes(ring.capacity)} ({ring.capacity} bytes); raise capacity"
            )
        start = time.monotonic()
        pid = current_pid()
        while True:
            with state.locked() as header:
                if state.shut_down:
                    raise BufferError("SharedMemoryRingBuffer was shut down while waiting for space")
                placed = ring._reserve(header, need, self._last_seq, pid)
                if placed is None and ring._reclaim_dead_writers(header):
                    placed = ring._reserve(header, need, self._last_seq, pid)
                if placed is not None:
                    seq, offset = placed
                    if self._unit_seq is None:
                        self._unit_seq = seq
                        ring._entry(header, seq)[_UNIT] = seq
                    else:
                        ring._entry(header, seq)[_UNIT] = self._unit_seq
                    ring._note_usage(header, 1 if seq == self._unit_seq and not self._ranges else 0)
                    break
                in_use = int(header[_HEAD] - header[_TAIL])
                units = int(header[H_UNITS])
            waited = time.monotonic() - start
            if waited >= self._timeout:
                raise BufferError(
                    f"shared-memory arena full: {format_bytes(need)} more requested, "
                    f"{format_bytes(ring.capacity - in_use)} of {format_bytes(ring.capacity)} free "
                    f"with {units} unit(s) in flight. Size capacity for the in-flight high-water "
                    "mark, roughly (buffer_size + 2) × max_item_bytes"
                    + ("" if self._timeout else ", or pass acquire_timeout > 0 to wait for space")
                )
            state.wakeup.wait(self._timeout - waited)
        self.last_wait_seconds += time.monotonic() - start
        self._last_seq = seq
        if self._ranges and self._ranges[-1][1] == offset:
            self._ranges[-1] = (self._ranges[-1][0], offset + need)
        else:
            self._ranges.append((offset, offset + need))
        return offset, state.data_view(offset, nbytes)

    def locate(self, address: int, nbytes: int) -> int | None:
        """Offset of memory already inside the open unit, else ``None``."""
        rel = address - self._state.data_address
        for lo, hi in self._ranges:
            if lo <= rel and rel + nbytes <= hi:
                return rel
        return None

    def _finish(self, new_state: int) -> int:
        if not self._open:
            raise RuntimeError("no open unit: call begin_unit() first")
        unit, ring, state = self._unit_seq, self._ring, self._state
        self._open = False
        self._unit_seq = self._last_seq = None
        self._ranges = []
        if unit is None:
            return EMPTY_SPAN
        with state.locked() as header:
            if new_state == FREE:
                ring._free_unit(header, unit, (WRITING,))
            else:
                for entry in ring._live_entries(header):
                    if entry[_UNIT] == unit and entry[_STATE] == WRITING:
                        entry[_STATE] = FILLED
        if new_state == FREE:
            state.wakeup.notify()
        return unit

    def commit_unit(self) -> int:
        """Close the unit; returns its span."""
        return self._finish(FILLED)

    def abort_unit(self) -> None:
        """Discard the open unit and its space."""
        self._finish(FREE)


class RingUnit:
    """One unit being restored: views valid until :meth:`finish` (copy out first)."""

    zero_copy = False

    @staticmethod
    def private_copy(view: np.ndarray) -> np.ndarray:
        """``view``'s bytes in a recycled private buffer (see :mod:`torch_arena._arena.private`)."""
        return process_buffers().copy_of(view)

    def __init__(self, ring: SharedMemoryRingBuffer, span: int, ranges: list[tuple[int, int]]) -> None:
        self._ring, self._state = ring, ring.state
        self.span, self.ranges = span, ranges

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """``uint8`` view of ``nbytes`` at ``offset``; ValueError if outside the unit."""
        for lo, hi in self.ranges:
            if lo <= offset and nbytes >= 0 and offset + nbytes <= hi:
                return self._state.data_view(offset, nbytes)
        raise ValueError(
            f"corrupt envelope: binary at offset {offset} (+{nbytes} bytes) lies outside its unit"
        )

    def finish(self, pinned: "list[object] | tuple[object, ...]" = ()) -> None:
        """Free the unit's space (its bytes must have been copied out)."""
        if self.span == EMPTY_SPAN or not self.ranges:
            return
        with self._state.locked() as header:
            self._ring._free_unit(header, self.span, (FILLED, HELD))
        self._state.wakeup.notify()
        self.ranges = []


class RingReader:
    """Consumer endpoint of a :class:`SharedMemoryRingBuffer` (copy-out)."""

    zero_copy = False

    def __init__(self, ring: SharedMemoryRingBuffer) -> None:
        self._ring = ring
        self.token = ring.state.token

    def reset(self) -> None:
        """Nothing to do: unread units are returned through :meth:`end_unit`."""

    def _claim(self, span: int, states: tuple[int, ...]) -> list[tuple[int, int]]:
        ring = self._ring
        size = ring._size
        ranges = []
        with ring.state.locked() as header:
            for entry in ring._live_entries(header):
                if entry[_UNIT] == span and entry[_STATE] in states:
                    entry[_STATE] = HELD
                    start, end = int(entry[_START]), int(entry[_END])
                    ranges.append((start % size, start % size + (end - start)))
        return ranges

    def open_unit(self, span: int) -> RingUnit:
        """Claim the committed unit ``span`` for reading."""
        if span == EMPTY_SPAN:
            return RingUnit(self._ring, span, [])
        ranges = self._claim(span, (FILLED,))
        if not ranges:
            raise ValueError(
                f"stale or corrupt envelope: no committed unit {span} in the ring "
                "(an envelope can be restored once)"
            )
        return RingUnit(self._ring, span, ranges)

    def read_binary(self, offset: int, nbytes: int) -> memoryview:
        """A private copy of one binary (protocol method)."""
        ring = self._ring
        size = ring._size
        with ring.state.locked() as header:
            inside = any(
                e[_STATE] in (FILLED, HELD)
                and (int(e[_START]) % size) <= offset
                and offset + nbytes <= (int(e[_START]) % size) + int(e[_END] - e[_START])
                for e in ring._live_entries(header)
            )
        if not inside or nbytes < 0:
            raise ValueError(f"corrupt envelope: binary at offset {offset} (+{nbytes} bytes) is not in the ring")
        return memoryview(bytearray(ring.state.data_view(offset, nbytes)))

    def end_unit(self, span: int, pinned: "list[object]") -> None:
        """Unit read: free its space now."""
        if span == EMPTY_SPAN:
            return
        with self._ring.state.locked() as header:
            self._ring._free_unit(header, span, (FILLED, HELD))
        self._ring.state.wakeup.notify()
