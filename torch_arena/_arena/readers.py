"""The consumer endpoints: one zero-copy reader, one copy-out reader, for every backend.

:class:`ZeroCopyReader` (the pools): a unit's binaries are views of shared
memory. Each extent of an opened unit gets a *lease*, a ``uint8`` array made
straight from the mapping from which every view is sliced, so the unit stays
held while any view lives (:mod:`torch_arena._arena.leases`).

:class:`CopyOutReader` (the rings): the codec copies each binary out, into
recycled private memory (:mod:`torch_arena._arena.private`), and the unit is
released as soon as it is read; nothing in the consumer points into shared
memory. Except when the copy would not fit: where fresh private memory would
take what the arena may still grow into or run the machine short, or, inside
a memory cgroup (a cluster job's limit, where the kernel OOM-kills instead of
refusing), where the copies and the arena together would pass the arena's
cap, the unit is restored zero-copy, as a
pool's would be, and stays held while its views live. A spilled batch costs
ring space for as long as it is kept, never an OOM kill that torch's own
transport, which holds each batch once, would not have had.

Both check every ``(offset, nbytes)`` an envelope names against the extents
the shared table gives the unit, before touching memory, and both implement
SPDL's ``read_binary`` / ``end_unit`` as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from torch_arena._arena.core import ArenaCore
from torch_arena._arena.leases import LeaseTracker, reap_now
from torch_arena._arena.private import process_buffers
from torch_arena._arena.protocol import EMPTY_SPAN, PROTOCOL
from torch_arena._arena.space import Extent
from torch_arena._arena.units import split_span

__all__ = ["CopyOutReader", "ZeroCopyReader"]


def _outside(offset: int, nbytes: int, extents: Sequence[Extent]) -> ValueError:
    return ValueError(
        f"corrupt envelope: binary at offset {offset} (+{nbytes} bytes) lies outside its unit "
        f"(extents {[tuple(e) for e in extents]})"
    )


class _Unit:
    """An opened unit: bounds-checked views of its extents."""

    __slots__ = ("_reader", "key", "extents", "__weakref__")
    zero_copy: bool

    def __init__(self, reader: "_Reader", key: tuple[int, int]) -> None:
        self._reader = reader
        self.key = key
        self.extents: list[Extent] = []

    def _find(self, offset: int, nbytes: int) -> int:
        """Which extent holds the binary (ValueError if none does)."""
        if nbytes >= 0:
            for i, (start, length) in enumerate(self.extents):
                if start <= offset and offset + nbytes <= start + length:
                    return i
        raise _outside(offset, nbytes, self.extents)


class ZeroCopyUnit(_Unit):
    """A unit whose views stay valid while they live."""

    __slots__ = ("leases",)
    zero_copy = True

    def __init__(self, reader: "_Reader", key: tuple[int, int]) -> None:
        super().__init__(reader, key)
        self.leases: list[np.ndarray] | None = None

    def attach(self, extents: list[Extent]) -> None:
        """Make the leases and register them: the unit is held while they live."""
        file = self._reader.core.file
        self.extents = extents
        self.leases = leases = [file.anchored_view(start, length) for start, length in extents]
        self._reader.tracker.hold(self.key, leases)

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """``uint8`` view of ``nbytes`` at ``offset``; ValueError if outside the unit."""
        if self.leases is None:
            raise _outside(offset, nbytes, self.extents)
        i = self._find(offset, nbytes)
        rel = offset - self.extents[i].start
        return self.leases[i][rel : rel + nbytes]

    @staticmethod
    def private_copy(view: Any) -> np.ndarray:
        """A plain private copy (the codec never asks a zero-copy unit for one)."""
        return np.array(view, dtype=np.uint8, copy=True)

    def finish(self, pinned: Sequence[object] = ()) -> None:
        """Release the unit once every lease and every pinned anchor is gone."""
        if self.leases is not None:
            if pinned:  # more anchors (SPDL's views): the unit keeps the leases until the swap is done
                self._reader.tracker.hold(self.key, [*self.leases, *pinned])
            self.leases = None


class CopyOutUnit(_Unit):
    """A unit whose views are valid until :meth:`finish`: copy out first."""

    __slots__ = ("_done",)
    zero_copy = False

    def __init__(self, reader: "_Reader", key: tuple[int, int]) -> None:
        super().__init__(reader, key)
        self._done = False

    def attach(self, extents: list[Extent]) -> None:
        """The unit object is the anchor until :meth:`finish` releases it."""
        self.extents = extents
        self._reader.tracker.hold(self.key, [self])

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """``uint8`` view of ``nbytes`` at ``offset``; ValueError if outside the unit."""
        self._find(offset, nbytes)
        return self._reader.core.file.data_view(offset, nbytes)

    @staticmethod
    def private_copy(view: Any) -> np.ndarray:
        """``view``'s bytes in a recycled private buffer."""
        return process_buffers().copy_of(view)

    def finish(self, pinned: Sequence[object] = ()) -> None:
        """The unit is read (its bytes copied out): release it now."""
        if not self._done:
            self._done = True
            self._reader.tracker.hold(self.key, ())


class _EmptyUnit:
    """The unit of an envelope without binaries."""

    extents: tuple[Extent, ...] = ()

    def __init__(self, zero_copy: bool) -> None:
        self.zero_copy = zero_copy

    def view(self, offset: int, nbytes: int) -> Any:
        raise _outside(offset, nbytes, [])

    private_copy = staticmethod(ZeroCopyUnit.private_copy)

    def finish(self, pinned: Sequence[object] = ()) -> None:
        pass


class _Reader:
    torch_arena_protocol = PROTOCOL
    zero_copy: bool
    unit_class: Any
    spilled = 0

    def __init__(self, core: ArenaCore, description: str) -> None:
        self.core = core
        self.token = core.token
        self._description = description
        self.tracker = LeaseTracker(core.release)
        self._open: dict[int, Any] = {}  # units opened by read_binary (SPDL's protocol)

    def describe(self) -> str:
        """The arena this reader reads, for messages."""
        return self._description

    def reset(self) -> None:
        """Nothing to do: units kept from earlier iterations stay held, and
        every drain of the leases finds the ones whose views are gone."""

    def note_epoch(self) -> None:
        """An epoch boundary (see :class:`CopyOutReader`)."""

    def open_unit(self, span: int) -> Any:
        """Claim the committed unit ``span`` for reading."""
        if span == EMPTY_SPAN:
            return _EmptyUnit(self.zero_copy)
        self.core.check_open()
        slot, gen = split_span(span)
        reap_now()  # releases run here, in the consumer's thread, when something died
        unit = self.unit_class(self, (slot, gen))
        self.core.open(span, slot, gen, unit.attach)
        return unit

    def hold_unread(self, span: int, anchor: object) -> None:
        """Keep committed unit ``span`` until it is opened; released unread if
        ``anchor`` dies first (its open replaces the anchor with the unit)."""
        if span != EMPTY_SPAN:
            self.tracker.hold(split_span(span), [anchor])

    def _unit_holding(self, offset: int, nbytes: int) -> Any:
        slot, gen = self.core.locate_unit(offset, nbytes)
        unit = self._open.get(slot)
        if unit is None or unit.key != (slot, gen):
            unit = self._open[slot] = self.open_unit((gen << 32) | slot)
        return unit

    def end_unit(self, span: int, pinned: list[object]) -> None:
        """Unit read (SPDL's protocol): finish it, with ``pinned`` as anchors."""
        if span == EMPTY_SPAN:
            return
        unit = self._open.pop(split_span(span)[0], None)
        if unit is None:
            unit = self.open_unit(span)
        unit.finish(pinned)


class ZeroCopyReader(_Reader):
    """Consumer endpoint of the pools: zero-copy views."""

    zero_copy = True
    unit_class = ZeroCopyUnit

    def read_binary(self, offset: int, nbytes: int) -> memoryview:
        """A zero-copy view of one binary (SPDL's protocol)."""
        return memoryview(self._unit_holding(offset, nbytes).view(offset, nbytes))


class CopyOutReader(_Reader):
    """Consumer endpoint of the rings: private copies."""

    zero_copy = False
    unit_class = CopyOutUnit

    def note_epoch(self) -> None:
        """An epoch boundary: private buffers sized for earlier epochs may go."""
        process_buffers().note_epoch()

    def open_unit(self, span: int) -> Any:
        """Claim the committed unit ``span``: a copy-out unit, or a zero-copy
        one when its private copy would not fit (see the module's docstring)."""
        unit = super().open_unit(span)
        if not unit.zero_copy and unit.extents:
            nbytes = sum(length for _, length in unit.extents)
            if not process_buffers().has_room(nbytes, self.core.memory_figures):
                spilled = ZeroCopyUnit(self, unit.key)
                spilled.attach(unit.extents)  # the leases replace the unit as its anchors
                self.spilled += 1
                return spilled
        return unit

    def read_binary(self, offset: int, nbytes: int) -> memoryview:
        """A private copy of one binary (SPDL's protocol); a view where the
        unit was spilled (see the module's docstring)."""
        unit = self._unit_holding(offset, nbytes)
        view = unit.view(offset, nbytes)
        return memoryview(view if unit.zero_copy else unit.private_copy(view))
