"""The consumer side of the elastic pool: zero-copy units over their extents.

Two readers share it. :class:`ElasticReader` gives the pool's zero-copy
views. :class:`ElasticCopyReader` gives the ring's semantics over the same
memory (:class:`~torch_arena.SharedMemoryElasticRing`): every binary is copied
into recycled private memory (:mod:`torch_arena._arena.private`) and the unit's
extents are free again as soon as it is read.

A restored zero-copy unit holds one *lease* per extent: a ``uint8`` array made straight
from the mapping, from which every view the codec hands out is sliced, so the
lease lives while any view does. When the unit is finished the leases (and
whatever the codec pins) go to a :class:`~torch_arena._arena.leases.LeaseTracker`;
the unit's extents become free once all of them are gone. Every binary an
envelope names is checked against the extents the shared table gives the
unit, before any memory is touched.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from torch_arena._arena.base import FILLED, HELD
from torch_arena._arena.leases import LeaseTracker, reap_now
from torch_arena._arena.private import process_buffers
from torch_arena._os.sync import current_pid

__all__ = ["ElasticCopyReader", "ElasticReader", "ElasticUnit"]


class ElasticUnit:
    """One restored unit: bounds-checked zero-copy views, released when they die."""

    zero_copy = True

    def __init__(
        self, reader: "ElasticReader", slot: int, gen: int, extents: list[tuple[int, int]], rows: tuple[int, ...] = ()
    ) -> None:
        self._tracker = reader.tracker
        self.key = (slot, gen, rows)
        self.extents = extents
        state = reader.state
        self.leases: list[np.ndarray] | None = [state.anchored_view(start, n) for start, n in extents]

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """``uint8`` view of ``nbytes`` at ``offset``; ValueError if outside the unit."""
        if self.leases is not None and nbytes >= 0:
            for (start, length), lease in zip(self.extents, self.leases):
                if start <= offset and offset + nbytes <= start + length:
                    return lease[offset - start : offset - start + nbytes]
        raise ValueError(
            f"corrupt envelope: binary at offset {offset} (+{nbytes} bytes) lies outside the "
            f"extents of its unit {self.extents}"
        )

    def finish(self, pinned: "list[object] | tuple[object, ...]" = ()) -> None:
        """The unit is read: free it once every lease and pinned anchor is gone."""
        leases, self.leases = self.leases, None
        if leases is not None:
            self._tracker.hold(self.key, [*leases, *pinned])


class ElasticCopyUnit(ElasticUnit):
    """A unit restored by copying out: its views are valid until :meth:`finish`."""

    zero_copy = False

    @staticmethod
    def private_copy(view: np.ndarray) -> np.ndarray:
        """``view``'s bytes in a recycled private buffer (see :mod:`torch_arena._arena.private`)."""
        return process_buffers().copy_of(view)

    def finish(self, pinned: "list[object] | tuple[object, ...]" = ()) -> None:
        """The unit is read (its bytes copied out): its extents are free now."""
        if self.leases is not None:
            self.leases = None
            self._tracker.hold(self.key, [])  # nothing to wait for: released at once


class ElasticReader:
    """Consumer endpoint of a :class:`~torch_arena.SharedMemoryElasticPool`."""

    zero_copy = True
    unit_class: type[ElasticUnit] = ElasticUnit

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self.state = pool.state
        self.token = self.state.token
        self.tracker = LeaseTracker(self.state, pool.release_function())
        self._open: dict[int, ElasticUnit] = {}

    def reset(self) -> None:
        """Nothing to do: views kept from earlier iterations stay valid, and
        every drain of the leases (see :mod:`torch_arena._arena.leases`) finds the
        units whose views are gone, whatever was interrupted before."""

    def open_unit(self, span: int) -> ElasticUnit:
        """Claim the committed unit ``span`` for reading."""
        slot, gen = span & 0xFFFFFFFF, span >> 32
        pool = self._pool
        reap_now()
        with self.state.locked() as header:
            tables = pool.tables(header)
            if not 0 <= slot < len(tables.ustate):
                raise ValueError(f"corrupt envelope: span {span} names unit slot {slot} of {len(tables.ustate)}")
            if tables.ugen[slot] != gen or tables.ustate[slot] != FILLED:
                raise ValueError(
                    f"stale or corrupt envelope: unit {slot} generation {gen} is not waiting to be "
                    f"read (generation {int(tables.ugen[slot])}); an envelope can be restored once"
                )
            extents = tables.extents
            rows = extents.rows_of(slot)
            unit = self.unit_class(
                self, slot, gen, [(int(extents.start[r]), int(extents.length[r])) for r in rows], tuple(int(r) for r in rows)
            )
            # Until finish() hands the unit to its views, the unit object holds
            # it. Registered before the unit is marked: an interrupt in between
            # frees it when the object goes, instead of leaking it.
            self.tracker.hold(unit.key, [unit])
            tables.ustate[slot], tables.uowner[slot] = HELD, current_pid()
        return unit

    def _unit_holding(self, offset: int, nbytes: int) -> ElasticUnit:
        with self.state.locked() as header:
            tables = self._pool.tables(header)
            row = tables.extents.row_containing(offset, nbytes)
            if row < 0:
                raise ValueError(f"corrupt envelope: binary at offset {offset} (+{nbytes} bytes) is in no unit")
            slot = int(tables.extents.unit[row])
            gen = int(tables.ugen[slot])
        unit = self._open.get(slot)
        if unit is None or unit.key[1] != gen:
            unit = self._open[slot] = self.open_unit((gen << 32) | slot)
        return unit

    def read_binary(self, offset: int, nbytes: int) -> memoryview:
        """Zero-copy view of one binary (SPDL's protocol; see :func:`torch_arena.restore`)."""
        return memoryview(self._unit_holding(offset, nbytes).view(offset, nbytes))

    def end_unit(self, span: int, pinned: "list[object]") -> None:
        """Unit read: its extents free once every view of it (and ``pinned``) is gone."""
        unit = self._open.pop(span & 0xFFFFFFFF, None)
        if unit is None:
            unit = self.open_unit(span)
        unit.finish(pinned)


class ElasticCopyReader(ElasticReader):
    """Consumer endpoint of a :class:`~torch_arena.SharedMemoryElasticRing`
    (copy-out into recycled private memory)."""

    zero_copy = False
    unit_class = ElasticCopyUnit

    def read_binary(self, offset: int, nbytes: int) -> memoryview:
        """A private copy of one binary (SPDL's protocol)."""
        return memoryview(process_buffers().copy_of(self._unit_holding(offset, nbytes).view(offset, nbytes)))
