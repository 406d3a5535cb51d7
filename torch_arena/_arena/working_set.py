"""The working-set rule: how much free memory is worth keeping.

Memory that batches no longer use is worth keeping warm (reusing it costs one
copy; fresh memory costs page faults) but not forever: a loader that once saw
big batches must not keep their memory. The rule, used by the elastic memory
(shared by every process, in the arena header) and by the private buffers of
copy-out restores (one process's): keep ``1.25 ×`` the *working set* ``+ 16
MiB``, where the working set is the peak of bytes in use over the current and
the previous *window*. A window is :data:`WINDOW` events (units committed,
buffers handed out) or one epoch, whichever ends first, so memory sized for
batches long gone goes back within two windows whatever the epoch length.
"""

from __future__ import annotations

from collections.abc import MutableSequence

__all__ = ["CELLS", "WINDOW", "WorkingSet"]

#: Events per window.
WINDOW = 16
KEEP_NUM, KEEP_DEN, KEEP_SLACK = 5, 4, 16 << 20
#: Integer cells a :class:`WorkingSet` keeps its state in.
CELLS = 3
_CUR, _PREV, _EVENTS = range(CELLS)


class WorkingSet:
    """The rule over three integer cells: a list (one process) or ``int64``
    words of a shared header (callers hold the arena lock)."""

    __slots__ = ("cells",)

    def __init__(self, cells: MutableSequence[int]) -> None:
        self.cells = cells

    def observe(self, in_use: int) -> None:
        """Bytes in use right now (after memory was taken)."""
        if in_use > self.cells[_CUR]:
            self.cells[_CUR] = in_use

    def tick(self, in_use: int) -> None:
        """One event; a full window starts the next one."""
        cells = self.cells
        cells[_EVENTS] += 1
        if cells[_EVENTS] >= WINDOW:
            self.roll(in_use)

    def roll(self, in_use: int) -> None:
        """Start a new window now (at an epoch boundary, or a full window)."""
        cells = self.cells
        cells[_PREV], cells[_CUR], cells[_EVENTS] = cells[_CUR], in_use, 0

    def keep(self) -> int:
        """Bytes worth keeping: in use plus warm, free memory."""
        cells = self.cells
        return int(max(cells[_PREV], cells[_CUR])) * KEEP_NUM // KEEP_DEN + KEEP_SLACK
