"""The extent table of the elastic memory: variable-size ranges in shared memory.

The elastic memory's data region is one large *virtual* range of a memory
file. This table, kept in the file's shared header as ``int64`` columns,
covers it with non-overlapping extents, each in one of these states:

* ``COLD``: free, no memory behind it (never written, or given back);
* ``WARM``: free, memory committed and faulted in: reusing it costs one copy;
* ``BUSY``: part of a unit being written, in flight or held by views;
* ``TRIM``: free, being given back to the kernel by its owner process, outside
  the lock (its bytes no longer count as committed);
* ``UNUSED``: a spare row.

The columns are ``start``, ``length``, ``state``, ``owner`` (pid), ``unit``
(slot) and ``next``: a unit's busy rows form a chain through ``next``, whose
head the caller keeps per unit, so finding a unit's extents never scans the
table. Busy rows never move or merge, so the chains stay valid. Each column
is a memoryview of ``int64`` words (single reads and writes) with a numpy twin
for scans (``*_array``).

Every method runs under the arena lock and only touches the table: no system
calls. Placement is best fit among warm extents (a recycled range costs one
warm copy), then first fit by address among cold ones (which keeps memory
compact towards the start of the region). Freed extents are *not* merged with
their neighbours at once (that would cost every release two table scans):
when no free extent is large enough, adjacent free extents of the same warmth
are merged and the search runs again. Scans stop at the rows ever used (a
word before the columns), and the table is bounded: when no spare row is left
free extents are merged, and if that is not enough an extent is handed out
whole instead of being split.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BUSY", "COLD", "ExtentTable", "STATE_NAMES", "TRIM", "UNUSED", "WARM"]

UNUSED, COLD, WARM, BUSY, TRIM = 0, 1, 2, 3, 4
STATE_NAMES = {UNUSED: "unused", COLD: "cold", WARM: "warm", BUSY: "busy", TRIM: "trimming"}
COLUMNS = 6  # start, length, state, owner pid, unit slot, next row of the unit


class ExtentTable:
    """Column views over the extent rows of a shared header (no state of its own)."""

    __slots__ = (
        "_used", "rows", "start", "length", "state", "owner", "unit", "next",
        "start_array", "length_array", "state_array",
    )

    def __init__(self, header: np.ndarray, words: memoryview, first_slot: int, rows: int) -> None:
        self._used = words[first_slot : first_slot + 1]
        self.rows = rows
        base = first_slot + 1
        self.start, self.length, self.state, self.owner, self.unit, self.next = (
            words[base + i * rows : base + (i + 1) * rows] for i in range(COLUMNS)
        )
        self.start_array, self.length_array, self.state_array = (
            header[base + i * rows : base + (i + 1) * rows] for i in range(3)
        )

    @staticmethod
    def slots(rows: int) -> int:
        """Header slots a table of ``rows`` extents takes."""
        return 1 + COLUMNS * rows

    @property
    def used(self) -> int:
        """Rows ever used: every row at or past it is ``UNUSED``."""
        return self._used[0]

    def initialise(self, size: int) -> None:
        """One cold extent covering the whole region ``[0, size)``."""
        self.state_array[:] = UNUSED
        self._used[0] = 1
        self._set(0, 0, size, COLD)

    def _set(self, row: int, start: int, length: int, state: int, owner: int = 0) -> None:
        self.start[row], self.length[row], self.state[row] = start, length, state
        self.owner[row], self.unit[row], self.next[row] = owner, -1, -1

    def _spare_row(self) -> int:
        used = self.used
        row = int(np.argmin(self.state_array[:used]))  # UNUSED is 0
        if self.state[row] == UNUSED:
            return row
        if used < self.rows:
            self._used[0] = used + 1
            return used
        self.merge_free()
        row = int(np.argmin(self.state_array[:used]))
        return row if self.state[row] == UNUSED else -1

    def merge_free(self) -> None:
        """Merge every run of adjacent free extents of the same state."""
        used = self.used
        states = self.state_array[:used]
        rows = np.flatnonzero((states == WARM) | (states == COLD))
        if len(rows) < 2:
            return
        start, length, state = self.start, self.length, self.state
        keep, *rest = rows[np.argsort(self.start_array[rows])].tolist()
        for row in rest:
            if start[keep] + length[keep] == start[row] and state[keep] == state[row]:
                length[keep] += length[row]
                state[row] = UNUSED
            else:
                keep = row

    def take(
        self, nbytes: int, owner: int, unit: int, *, cold_allowed: bool, hint: int = -1
    ) -> tuple[int, int, bool] | None:
        """Hand out ``nbytes`` (page multiple) to ``unit``.

        Returns ``(row, start, fresh)`` where ``fresh`` means the range was cold
        and must be committed by the caller, or None when nothing fits (no
        warm extent large enough and, unless ``cold_allowed``, no cold one).
        ``hint``: a row to try first (the extent freed last, which in a steady
        state of similar units fits the next one without a scan), taken when
        warm and at most twice the size asked. A warm extent may be handed out
        whole (longer than asked) when the table has no spare row; a cold one
        never is.
        """
        if 0 <= hint < self.used and self.state[hint] == WARM and nbytes <= self.length[hint] <= 2 * nbytes:
            found: tuple[int, bool] | None = (hint, False)
        else:
            found = self._fit(nbytes, cold_allowed)
        if found is None:
            self.merge_free()
            found = self._fit(nbytes, cold_allowed)
            if found is None:
                return None
        row, fresh = found
        rest = self.length[row] - nbytes
        if rest > 0:
            spare = self._spare_row()
            if spare >= 0:
                self._set(spare, self.start[row] + nbytes, rest, self.state[row])
                self.length[row] = nbytes
            elif fresh:
                return None
        self.state[row], self.owner[row], self.unit[row] = BUSY, owner, unit
        return row, self.start[row], fresh

    def _fit(self, nbytes: int, cold_allowed: bool) -> tuple[int, bool] | None:
        used = self.used
        states = self.state_array[:used]
        lengths = self.length_array[:used]
        warm = np.flatnonzero((states == WARM) & (lengths >= nbytes))
        if len(warm):
            return int(warm[np.argmin(lengths[warm])]), False
        if cold_allowed:
            cold = np.flatnonzero((states == COLD) & (lengths >= nbytes))
            if len(cold):
                return int(cold[np.argmin(self.start_array[cold])]), True
        return None

    def shrink(self, row: int, keep: int) -> int:
        """Give back the tail of busy ``row`` past ``keep`` bytes as warm; returns
        the bytes given back (0 without a spare row)."""
        tail = self.length[row] - keep
        if tail <= 0:
            return 0
        spare = self._spare_row()
        if spare < 0:
            return 0
        self._set(spare, self.start[row] + keep, tail, WARM)
        self.length[row] = keep
        return tail

    def chain(self, head: int) -> list[int]:
        """The rows of a unit's chain, from its ``head`` row (-1: none)."""
        rows = []
        row, following = head, self.next
        while row >= 0:
            rows.append(row)
            row = following[row]
        return rows

    def free_rows(self, rows: "list[int]", state: int = WARM) -> int:
        """Make busy ``rows`` free (``WARM``: memory kept; ``TRIM``: being given
        back); returns their bytes."""
        freed = 0
        for row in rows:
            freed += self.length[row]
            self.state[row], self.owner[row], self.unit[row], self.next[row] = state, 0, -1, -1
        return freed

    def mark_trim(self, excess: int, owner: int) -> list[tuple[int, int]]:
        """Mark warm extents, highest address first, worth at least ``excess``
        bytes (page multiples) as ``TRIM`` for ``owner``; returns their ranges."""
        marked: list[tuple[int, int]] = []
        warm = self.rows_in(WARM)
        for row in warm[np.argsort(-self.start_array[warm])].tolist():
            if excess <= 0:
                break
            length = self.length[row]
            if length > excess:
                spare = self._spare_row()
                if spare >= 0:
                    self._set(spare, self.start[row] + length - excess, excess, TRIM, owner)
                    self.length[row] = length - excess
                    marked.append((self.start[spare], excess))
                    break
            self.state[row], self.owner[row] = TRIM, owner
            marked.append((self.start[row], length))
            excess -= length
        return marked

    def finish_trim(self, ranges: list[tuple[int, int]], owner: int) -> None:
        """The ranges ``owner`` marked are given back: make them cold."""
        used = self.used
        trimming = np.flatnonzero(self.state_array[:used] == TRIM).tolist()
        starts = {start for start, _ in ranges}
        for row in trimming:
            if self.start[row] in starts and self.owner[row] == owner:
                self.state[row], self.owner[row] = COLD, 0

    def rows_in(self, state: int) -> np.ndarray:
        """Rows in ``state``."""
        return np.flatnonzero(self.state_array[: self.used] == state)

    def bytes_in(self, state: int) -> int:
        """Total bytes of the extents in ``state``."""
        used = self.used
        return int(self.length_array[:used][self.state_array[:used] == state].sum())

    def row_containing(self, offset: int, nbytes: int) -> int:
        """The busy row that holds ``[offset, offset + nbytes)`` entirely, or -1."""
        used = self.used
        starts = self.start_array[:used]
        rows = np.flatnonzero(
            (self.state_array[:used] == BUSY) & (starts <= offset) & (offset + nbytes <= starts + self.length_array[:used])
        )
        return int(rows[0]) if len(rows) else -1
