"""How a backend finds space for units: the one thing that differs between them.

The unit machinery (:mod:`torch_arena._arena.core`: the unit table, waiting
for space, dead-writer reclaim, collection, both readers and the writer) is
the same for every arena. A backend is a :class:`Space`:

* the segment pool: unit slot *i* owns segment *i*; taking space for a unit is
  handing it its segment (:mod:`.segment_pool`);
* the ring: space is taken at the head of one circular region and comes back
  from the tail, in order (:mod:`.ring_buffer`);
* the elastic memory: variable extents of a large virtual region, committed
  as they are first used and given back when the working set shrinks
  (:mod:`.elastic_space`).

Methods documented "lock held" run under the arena lock and only read and
write the header: no system call, so the lock is never held across a page
fault, a ``posix_fallocate`` or a hole punch. The others run outside it.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, NamedTuple

from torch_arena._arena.arena_file import UNIT_TABLE
from torch_arena._arena.units import UnitTable
from torch_arena._os.sizes import format_bytes
from torch_arena.errors import ArenaUnitTooLarge

if TYPE_CHECKING:
    from torch_arena._arena.arena_file import ArenaFile

__all__ = ["Extent", "Placement", "Space", "too_large"]


def too_large(need: int, where: str, limit: int, knob: str) -> ArenaUnitTooLarge:
    """The error for a unit of ``need`` bytes that can never fit ``where``."""
    return ArenaUnitTooLarge(
        f"a unit of at least {format_bytes(need)} ({need} bytes) does not fit {where} "
        f"({limit} bytes); raise {knob}"
    )


class Extent(NamedTuple):
    """A contiguous range of the data region: ``(start, length)`` in bytes."""

    start: int
    length: int


class Placement(NamedTuple):
    """Where :meth:`Space.take` put a chunk of a unit, and what the writer must
    do outside the lock before writing into it."""

    start: int
    length: int
    fresh: bool = False
    """The range has no memory behind it yet: commit it (:meth:`Space.after_take`)."""
    give_back: tuple[Extent, ...] = ()
    """Ranges marked to be returned to the kernel first."""
    hint: int = -1
    """The backend's own note on where it keeps the chunk (a table row)."""


class Space(abc.ABC):
    """A backend's allocator over the data region of one arena."""

    #: Rows of the unit table (the most units in flight and held at once).
    unit_slots: int
    #: Bytes of the data region (virtual for the elastic memory).
    data_bytes: int
    #: Whether the whole data region is reserved when the arena is made.
    reserve_data: bool = True
    #: Word in messages and advice: "pool", "ring".
    noun: str = "arena"
    #: Whether a unit takes its (only) space when it begins, so ``begin_unit``
    #: waits for it (SPDL's blocking pool); otherwise space is taken, and
    #: waited for, as binaries arrive.
    claims_at_begin: bool = False
    #: The arena's memory file in this process (see :meth:`attach`).
    file: "ArenaFile | None" = None

    #: The class of this process's views of the backend's header region,
    #: made from ``(units, region)`` (None: the backend has no region).
    views_class: Any = None

    def views(self, units: UnitTable) -> Any:
        """This process's views of the backend's header region, kept beside the
        unit table's (so made once per mapping)."""
        made = units.backend
        if made is None:
            made = units.backend = self.views_class(units, self.region)
        return made

    def header_slots(self) -> int:
        """Words of its own the backend keeps in the header, after the unit table
        (from :attr:`region` on)."""
        return 0

    @property
    def region(self) -> int:
        """First header word of the backend's own region."""
        return UNIT_TABLE + UnitTable.header_slots(self.unit_slots)

    def initialise(self, units: UnitTable) -> None:
        """Set up the backend's header region of a new arena."""

    def attach(self, file: "ArenaFile") -> None:
        """The arena's memory file in this process (set by the core)."""
        self.file = file

    # -- sizing ------------------------------------------------------------------
    @abc.abstractmethod
    def chunk(self, taken: int, used: int, nbytes: int) -> int:
        """Bytes to take for a binary of ``nbytes`` that does not fit the unit's
        current chunk; the unit holds ``taken`` bytes of space of which ``used``
        (alignment included) are written. Raises
        :class:`~torch_arena.errors.ArenaUnitTooLarge` when the unit could
        never fit, even in an empty arena."""

    # -- under the lock -------------------------------------------------------------
    @abc.abstractmethod
    def take(self, units: UnitTable, slot: int, nbytes: int, need: int, pid: int) -> Placement | None:
        """Place ``nbytes`` (at least ``need``) for unit ``slot``, or None when
        there is no room now. Lock held; charges the bytes to the unit."""

    def close_unit(self, units: UnitTable, slot: int, last: Placement | None, used: int) -> tuple[Extent, ...]:
        """The unit is committed with ``used`` bytes written in its ``last``
        chunk: give back what it does not need. Returns ranges to give back to
        the kernel once the lock is released. Lock held."""
        return ()

    @abc.abstractmethod
    def free_unit(self, units: UnitTable, slot: int, *, punch: bool) -> None:
        """The unit's space is free again (``punch``: its memory may be half
        committed by a writer that failed or died; give it back). Lock held."""

    @abc.abstractmethod
    def extents(self, units: UnitTable, slot: int) -> list[Extent]:
        """Where a committed unit's binaries may lie. Lock held."""

    @abc.abstractmethod
    def unit_at(self, units: UnitTable, offset: int, nbytes: int) -> int:
        """The slot of the unit whose space holds ``[offset, offset + nbytes)``,
        or -1 (SPDL's ``read_binary`` names no unit). Lock held."""

    def make_room(self, units: UnitTable, nbytes: int, pid: int) -> tuple[Extent, ...]:
        """Free memory that cannot serve a request for ``nbytes`` so that it can
        be served (the elastic memory at its cap). Lock held."""
        return ()

    def reclaim_dead(self, units: UnitTable) -> int:
        """Leftovers of dead processes that the unit table does not know. Lock held."""
        return 0

    def note_epoch(self, units: UnitTable) -> None:
        """An epoch boundary (see :meth:`torch_arena._arena.protocol.Arena.note_epoch`). Lock held."""

    # -- outside the lock -------------------------------------------------------------
    def after_take(self, placement: Placement, what: str) -> None:
        """Prepare a placed chunk for writing (commit fresh memory). Raises
        :class:`MemoryError` when the kernel refuses."""

    def give_back(self, ranges: tuple[Extent, ...]) -> int:
        """Return marked ranges to the kernel; the bytes given back."""
        return 0

    def committed(self, units: UnitTable) -> tuple[int, int]:
        """Memory the arena holds now, and the most it has held (a fixed
        arena: its whole data region, reserved when it was made)."""
        return self.data_bytes, self.data_bytes

    def cap(self, units: UnitTable) -> int | None:
        """The most memory the arena may commit (lock held), or None for a
        fixed arena (all of it was reserved when it was made)."""
        return None

    # -- messages ---------------------------------------------------------------------
    @abc.abstractmethod
    def full_message(self, units: UnitTable, need: int, waited: float, timeout: float) -> str:
        """Why ``need`` more bytes found no room after ``waited`` seconds (lock held)."""
