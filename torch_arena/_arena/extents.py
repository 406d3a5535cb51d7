"""The extent table of the elastic pool: variable-size ranges in shared memory.

The elastic pool's data region is one large *virtual* range of a memory file.
This table, kept in the file's shared header as ``int64`` columns, covers it
with non-overlapping extents, each in one of these states:

* ``COLD``: free, no memory behind it (never written, or given back);
* ``WARM``: free, memory committed and faulted in: reusing it costs one copy;
* ``BUSY``: part of a unit being written, in flight or held by views;
* ``TRIM``: free, being given back to the kernel by its owner process, outside
  the lock (its bytes no longer count as committed);
* ``UNUSED``: a spare row.

Every function here runs under the arena lock and only touches the table:
no system calls, so the lock is never held across a page fault, a
``posix_fallocate`` or a hole punch. Placement is best fit among warm extents
(a recycled range costs one warm copy), then first fit by address among cold
ones (which keeps memory compact towards the start of the region); freed
extents coalesce with free neighbours of the same warmth. The table is
bounded: when no spare row is left an extent is handed out whole instead of
being split.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ExtentTable", "UNUSED", "COLD", "WARM", "BUSY", "TRIM"]

UNUSED, COLD, WARM, BUSY, TRIM = 0, 1, 2, 3, 4
STATE_NAMES = {UNUSED: "unused", COLD: "cold", WARM: "warm", BUSY: "busy", TRIM: "trimming"}
COLUMNS = 5  # start, length, state, owner pid, unit slot


class ExtentTable:
    """Column views over the extent rows of a shared header (no state of its own)."""

    __slots__ = ("start", "length", "state", "owner", "unit")

    def __init__(self, header: np.ndarray, first_slot: int, rows: int) -> None:
        cols = header[first_slot : first_slot + COLUMNS * rows].reshape(COLUMNS, rows)
        self.start, self.length, self.state, self.owner, self.unit = cols

    @staticmethod
    def slots(rows: int) -> int:
        """Header slots a table of ``rows`` extents takes."""
        return COLUMNS * rows

    def initialise(self, size: int) -> None:
        """One cold extent covering the whole region ``[0, size)``."""
        self.state[:] = UNUSED
        self._set(0, 0, size, COLD)

    def _set(self, row: int, start: int, length: int, state: int, owner: int = 0, unit: int = -1) -> None:
        self.start[row], self.length[row], self.state[row] = start, length, state
        self.owner[row], self.unit[row] = owner, unit

    def _spare_row(self) -> int:
        row = int(np.argmin(self.state))
        return row if self.state[row] == UNUSED else -1

    def split(self, row: int, nbytes: int) -> bool:
        """Keep the first ``nbytes`` in ``row``; the rest becomes a row of the same
        state. Returns False (the extent stays whole) without a spare row."""
        rest = int(self.length[row]) - nbytes
        if rest <= 0:
            return True
        spare = self._spare_row()
        if spare < 0:
            return False
        self._set(spare, int(self.start[row]) + nbytes, rest, int(self.state[row]))
        self.length[row] = nbytes
        return True

    def coalesce(self, row: int) -> int:
        """Merge free ``row`` with free neighbours of the same state; returns its row."""
        state = self.state[row]
        end = self.start[row] + self.length[row]
        after = np.flatnonzero((self.start == end) & (self.state == state))
        if len(after):
            self.length[row] += self.length[after[0]]
            self.state[after[0]] = UNUSED
        before = np.flatnonzero((self.start + self.length == self.start[row]) & (self.state == state))
        if len(before):
            self.length[before[0]] += self.length[row]
            self.state[row] = UNUSED
            row = int(before[0])
        return row

    def take(self, nbytes: int, owner: int, unit: int, *, cold_allowed: bool) -> tuple[int, int, bool] | None:
        """Hand out ``nbytes`` (page multiple) to ``unit``.

        Returns ``(row, start, fresh)`` where ``fresh`` means the range was cold
        and must be committed by the caller, or None when nothing fits (no
        warm extent large enough and, unless ``cold_allowed``, no cold one).
        A warm extent may be handed out whole (longer than asked) when the
        table has no spare row; a cold one never is.
        """
        fits = self.length >= nbytes
        warm = np.flatnonzero((self.state == WARM) & fits)
        fresh = False
        if len(warm):
            row = int(warm[np.argmin(self.length[warm])])
        else:
            cold = np.flatnonzero((self.state == COLD) & fits) if cold_allowed else ()
            if not len(cold):
                return None
            row = int(cold[np.argmin(self.start[cold])])
            fresh = True
        if not self.split(row, nbytes) and fresh:
            return None
        self.state[row], self.owner[row], self.unit[row] = BUSY, owner, unit
        return row, int(self.start[row]), fresh

    def shrink(self, row: int, keep: int) -> int:
        """Give back the tail of busy ``row`` past ``keep`` bytes as warm; returns
        the bytes given back (0 without a spare row)."""
        tail = int(self.length[row]) - keep
        if tail <= 0:
            return 0
        spare = self._spare_row()
        if spare < 0:
            return 0
        self._set(spare, int(self.start[row]) + keep, tail, WARM)
        self.length[row] = keep
        self.coalesce(spare)
        return tail

    def rows_of(self, unit: int) -> np.ndarray:
        """Rows of the busy extents of ``unit``, by address."""
        rows = np.flatnonzero((self.state == BUSY) & (self.unit == unit))
        return rows[np.argsort(self.start[rows])]

    def free_rows(self, rows: "np.ndarray | list[int]", state: int = WARM) -> int:
        """Make busy ``rows`` free (``WARM``: memory kept; ``TRIM``: being given
        back); returns their bytes."""
        freed = 0
        for row in rows:
            freed += int(self.length[row])
            self.state[row], self.owner[row], self.unit[row] = state, 0, -1
            if state == WARM:
                self.coalesce(int(row))
        return freed

    def mark_trim(self, excess: int, owner: int) -> list[tuple[int, int]]:
        """Mark warm extents, highest address first, worth at least ``excess``
        bytes (page multiples) as ``TRIM`` for ``owner``; returns their ranges."""
        marked: list[tuple[int, int]] = []
        warm = np.flatnonzero(self.state == WARM)
        for row in warm[np.argsort(-self.start[warm])]:
            if excess <= 0:
                break
            length = int(self.length[row])
            if length > excess:
                keep = length - excess
                spare = self._spare_row()
                if spare >= 0:
                    self._set(spare, int(self.start[row]) + keep, excess, TRIM, owner)
                    self.length[row] = keep
                    marked.append((int(self.start[spare]), excess))
                    break
            self.state[row], self.owner[row] = TRIM, owner
            marked.append((int(self.start[row]), length))
            excess -= length
        return marked

    def finish_trim(self, ranges: list[tuple[int, int]], owner: int) -> None:
        """The ranges ``owner`` marked are given back: make them cold."""
        for start, _ in ranges:
            rows = np.flatnonzero((self.state == TRIM) & (self.start == start) & (self.owner == owner))
            for row in rows:
                self.state[row], self.owner[row] = COLD, 0
                self.coalesce(int(row))

    def rows_in(self, state: int) -> np.ndarray:
        """Rows in ``state``."""
        return np.flatnonzero(self.state == state)

    def bytes_in(self, state: int) -> int:
        """Total bytes of the extents in ``state``."""
        return int(self.length[self.state == state].sum())

    def row_containing(self, offset: int, nbytes: int) -> int:
        """The busy row that holds ``[offset, offset + nbytes)`` entirely, or -1."""
        rows = np.flatnonzero(
            (self.state == BUSY) & (self.start <= offset) & (offset + nbytes <= self.start + self.length)
        )
        return int(rows[0]) if len(rows) else -1
