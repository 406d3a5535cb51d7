"""The unit table: one row per unit slot, the same for every backend.

Four ``int64`` columns in the arena header (column-major, so a scan of one
column is one contiguous numpy operation):

==========  ==================================================================
column      meaning
==========  ==================================================================
``state``   ``FREE`` → ``WRITING`` → ``FILLED`` → ``HELD`` → ``RELEASED`` → ``FREE``
``gen``     bumped at every claim; a span is ``gen << 32 | slot``, so a stale
            envelope or a late release of an earlier use is recognised
``owner``   pid of the writer (``WRITING``, ``FILLED``) or reader (``HELD``)
``nbytes``  bytes the backend charges to the unit
==========  ==================================================================

The transitions and who makes them are in NOTE [ Arena units, leases, locks
and fork ] (:mod:`torch_arena._arena.protocol`). Each column is a memoryview
of ``int64`` words (single reads and writes: Python ints, cheap) with a numpy
twin for scans (``state_array``). Scans stop at the header's ``SLOTS_USED``
(rows ever used), so a table with thousands of slots costs what the units
actually in use cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from torch_arena._arena.arena_file import H_BYTES, H_BYTES_HW, H_SLOTS, H_SLOTS_USED, H_UNITS, H_UNITS_HW, UNIT_TABLE

if TYPE_CHECKING:
    from torch_arena._arena.arena_file import ArenaFile

__all__ = ["FREE", "FILLED", "HELD", "RELEASED", "STATE_NAMES", "UnitTable", "WRITING", "split_span"]

FREE, WRITING, FILLED, HELD, RELEASED = 0, 1, 2, 3, 4
STATE_NAMES = {FREE: "free", WRITING: "being written", FILLED: "committed", HELD: "restored", RELEASED: "released"}
COLUMNS = 4


def split_span(span: int) -> tuple[int, int]:
    """``(slot, generation)`` of a unit's span."""
    return span & 0xFFFFFFFF, span >> 32


class UnitTable:
    """Column views over the unit table of one arena file (no state of its own)."""

    __slots__ = ("header", "words", "slots", "state", "gen", "owner", "nbytes", "state_array", "backend")

    def __init__(self, file: "ArenaFile") -> None:
        header, words = file.header, file.words
        slots = self.slots = words[H_SLOTS]
        self.header, self.words = header, words
        self.state, self.gen, self.owner, self.nbytes = (
            words[UNIT_TABLE + i * slots : UNIT_TABLE + (i + 1) * slots] for i in range(COLUMNS)
        )
        self.state_array = header[UNIT_TABLE : UNIT_TABLE + slots]
        self.backend: object = None
        """The backend's views of its own header region (see ``Space.views``)."""

    @staticmethod
    def header_slots(slots: int) -> int:
        """Header words a table of ``slots`` units takes."""
        return COLUMNS * slots

    def __len__(self) -> int:
        return self.slots

    def claim(self, pid: int) -> int | None:
        """A free slot, now ``WRITING`` for ``pid`` with a new generation, or None (lock held)."""
        words = self.words
        used = words[H_SLOTS_USED]
        slot = int(np.argmin(self.state_array[:used])) if used else 0  # FREE is 0: the first free row
        if not used or self.state[slot] != FREE:
            if used >= self.slots:
                return None
            slot = used
            words[H_SLOTS_USED] = used + 1
        self.state[slot], self.owner[slot], self.nbytes[slot] = WRITING, pid, 0
        self.gen[slot] += 1
        return slot

    def is_current(self, slot: int, gen: int, *states: int) -> bool:
        """Whether ``slot`` is still generation ``gen`` and in one of ``states``."""
        return self.gen[slot] == gen and self.state[slot] in states

    def slots_in(self, *states: int) -> list[int]:
        """Slots in any of ``states``, in slot order."""
        column = self.state_array[: self.words[H_SLOTS_USED]]
        if len(states) == 1:
            return np.flatnonzero(column == states[0]).tolist()
        return np.flatnonzero(np.isin(column, states)).tolist()

    def clear(self, slot: int) -> None:
        """Make ``slot`` free (lock held; the caller gave its space back)."""
        self.state[slot], self.owner[slot], self.nbytes[slot] = FREE, 0, 0

    def count(self, units: int, nbytes: int) -> None:
        """Add to the header's in-use counters and track their peaks (lock held)."""
        words = self.words
        in_use = words[H_UNITS] = words[H_UNITS] + units
        held = words[H_BYTES] = words[H_BYTES] + nbytes
        if in_use > words[H_UNITS_HW]:
            words[H_UNITS_HW] = in_use
        if held > words[H_BYTES_HW]:
            words[H_BYTES_HW] = held

    def charge(self, slot: int, nbytes: int) -> None:
        """Charge ``nbytes`` more (or fewer) to unit ``slot`` (lock held)."""
        self.nbytes[slot] += nbytes
        self.count(0, nbytes)

    def state_names(self) -> list[str]:
        """Every slot's state by name (diagnostics)."""
        return [STATE_NAMES[s] for s in self.state.tolist()]
