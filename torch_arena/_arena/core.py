"""The unit machinery: one implementation below every backend.

:class:`ArenaCore` is one arena as seen from one process: its memory file,
its unit table and its backend's :class:`~torch_arena._arena.space.Space`.
Writers, readers and leases hold the core, not the public arena object, so
``close()`` on the arena never pulls memory from under them. Everything that
is the same for every backend happens here, once:

* claiming a unit slot together with its first space, in one lock round trip
  (a unit's size is never announced, so space is taken as binaries arrive);
* the one wait for space (:meth:`ArenaCore.wait_for`): collect released
  units, reclaim dead writers, let the backend make room, flush this
  process's dead leases once, then wait in slices up to the timeout and raise
  :class:`~torch_arena.errors.ArenaSpaceTimeout` with the backend's account of
  how full it is;
* commit, abort, open, the lock-free release and collection;
* :meth:`ArenaCore.reclaim` of units dead producers left unread, and usage.

The rules (who may change a unit's state, under which lock) are in NOTE [
Arena units, leases, locks and fork ] in :mod:`torch_arena._arena.protocol`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from torch_arena._arena.arena_file import (
    H_BYTES,
    H_BYTES_HW,
    H_UNITS,
    H_UNITS_HW,
    H_WAITERS,
    ArenaFile,
)
from torch_arena._arena.leases import flush as flush_leases
from torch_arena._arena.space import Extent, Placement, Space
from torch_arena._arena.units import FILLED, HELD, RELEASED, STATE_NAMES, WRITING, UnitTable
from torch_arena._os.sync import current_pid, pid_alive
from torch_arena.errors import ArenaSpaceTimeout

__all__ = ["ArenaCore"]

T = TypeVar("T")


def _merged(extents: list[Extent]) -> list[Extent]:
    """``extents`` by address with contiguous ones joined (a writer may place
    a binary across two chunks that happen to be adjacent)."""
    merged: list[Extent] = []
    for start, length in sorted(extents):
        if merged and merged[-1].start + merged[-1].length == start:
            merged[-1] = Extent(merged[-1].start, merged[-1].length + length)
        else:
            merged.append(Extent(start, length))
    return merged


class ArenaCore:
    """One arena's unit machinery in this process."""

    def __init__(self, file: ArenaFile, space: Space, name: str) -> None:
        self.file = file
        self.space = space
        space.attach(file)
        self.name = name
        """The arena's class name, for messages."""
        self.token = file.token
        self.closed = False
        """Set when the public handle is closed in this process: its endpoints
        start no new unit, releases of units already read still happen."""

    def check_open(self) -> None:
        """Raise if the arena's handle was closed in this process."""
        if self.closed:
            raise ValueError(f"{self.name} is closed in this process")

    def units(self, header: np.ndarray) -> UnitTable:
        """The unit table of ``header`` (views made once per process)."""
        return self.file.cached("units", UnitTable)

    # -- writers (lock held) -----------------------------------------------------------
    def claim_and_take(self, units: UnitTable, nbytes: int, need: int, pid: int) -> tuple[int, int, Placement] | None:
        """A new unit slot and its first space: ``(slot, generation, placement)``."""
        slot = units.claim(pid)
        if slot is None:
            return None
        placement = self.space.take(units, slot, nbytes, need, pid)
        if placement is None:
            units.clear(slot)  # the bumped generation is harmless
            return None
        units.count(1, 0)
        return slot, units.gen[slot], placement

    def _drop(self, units: UnitTable, slot: int, *, punch: bool) -> None:
        """Free ``slot`` and its space (lock held)."""
        self.space.free_unit(units, slot, punch=punch)
        units.count(-1, -units.nbytes[slot])
        units.clear(slot)

    # -- writers (each takes the lock) ---------------------------------------------
    def commit(self, slot: int, last: Placement | None, used: int) -> None:
        """Unit ``slot`` is complete; ``used`` bytes of its ``last`` chunk are written."""
        with self.file.locked() as header:
            units = self.units(header)
            ranges = self.space.close_unit(units, slot, last, used)
            units.state[slot] = FILLED
        if ranges:
            self.space.give_back(ranges)

    def abort(self, slot: int, gen: int, *, punch: bool) -> None:
        """Drop unit ``slot`` of generation ``gen`` if it is still being written."""
        with self.file.locked() as header:
            units = self.units(header)
            if units.is_current(slot, gen, WRITING):
                self._drop(units, slot, punch=punch)
        self.file.notify_waiters()

    def wait_for(self, attempt: Callable[[UnitTable, int], T | None], *, timeout: float, need: int) -> T:
        """Run ``attempt(units, pid)`` under the lock until it returns a value,
        making room as described in the module docstring, for up to ``timeout``
        seconds; ``need`` is the space asked for, for the backend's message."""
        file, space = self.file, self.space
        pid = current_pid()
        started = time.monotonic()
        flushed = waiting = False
        try:
            while True:
                ranges: tuple[Extent, ...] = ()
                with file.locked() as header:
                    units = self.units(header)
                    if waiting:
                        header[H_WAITERS] -= 1
                        waiting = False
                    if file.shut_down:
                        raise BufferError(f"{self.name} was shut down while waiting for space")
                    self.collect(units)
                    result = attempt(units, pid)
                    if result is None and self.reclaim_dead_writers(units):
                        result = attempt(units, pid)
                    if result is None:
                        ranges = space.make_room(units, need, pid)
                    waited = time.monotonic() - started
                    if result is None and not ranges and flushed:
                        if waited >= timeout:
                            raise ArenaSpaceTimeout(space.full_message(units, need, waited, timeout))
                        header[H_WAITERS] += 1
                        waiting = True
                if result is not None:
                    return result
                if ranges:
                    space.give_back(ranges)
                elif not flushed:
                    # Views this process dropped may not be released yet: release
                    # them (outside the lock) before waiting for anyone else.
                    flush_leases()
                    flushed = True
                else:
                    file.wakeup.wait(timeout - waited)
        finally:
            if waiting:
                with file.locked() as header:
                    header[H_WAITERS] -= 1

    # -- readers -----------------------------------------------------------------------
    def open(self, span: int, slot: int, gen: int, register: Callable[[list[Extent]], None]) -> None:
        """Claim committed unit ``slot`` for reading. ``register(extents)`` (the
        reader's leases on them) runs before the unit is marked held, so an
        interrupt in between leaves it to the lease (which releases it)
        instead of leaking it."""
        with self.file.locked() as header:
            units = self.units(header)
            if not 0 <= slot < len(units):
                raise ValueError(f"corrupt envelope: span {span} names unit slot {slot} of {len(units)}")
            if not units.is_current(slot, gen, FILLED):
                raise ValueError(
                    f"stale or corrupt envelope: unit {slot} generation {gen} is not waiting to be read "
                    f"(it is {STATE_NAMES.get(units.state[slot], '?')}, generation "
                    f"{units.gen[slot]}); an envelope can be restored once"
                )
            register(_merged(self.space.extents(units, slot)))
            units.state[slot], units.owner[slot] = HELD, current_pid()

    def locate_unit(self, offset: int, nbytes: int) -> tuple[int, int]:
        """``(slot, generation)`` of the unit holding a binary (SPDL's
        ``read_binary`` names no unit); ValueError if none does."""
        with self.file.locked() as header:
            units = self.units(header)
            slot = self.space.unit_at(units, offset, nbytes)
            if slot < 0 or nbytes < 0:
                raise ValueError(f"corrupt envelope: binary at offset {offset} (+{nbytes} bytes) is in no unit")
            return slot, units.gen[slot]

    def release(self, key: tuple[int, int]) -> None:
        """The reader is done with unit ``key = (slot, generation)``: one store,
        no lock (see the NOTE). Idempotent: a unit released already, collected
        or reused has moved on from the state or generation checked here."""
        units = self.units(self.file.header)
        slot, gen = key
        if units.is_current(slot, gen, FILLED, HELD):
            units.state[slot] = RELEASED
            self.file.notify_waiters()

    # -- collection and reclaim (lock held) ------------------------------------------
    def collect(self, units: UnitTable) -> int:
        """Free the space of released units; returns how many."""
        slots = units.slots_in(RELEASED)
        for slot in slots:
            self._drop(units, slot, punch=False)
        return len(slots)

    def reclaim_dead_writers(self, units: UnitTable) -> int:
        """Free units whose writer died mid-unit (their memory may be half
        committed: given back), and the backend's own leftovers of dead processes."""
        freed = 0
        for slot in units.slots_in(WRITING):
            if not pid_alive(units.owner[slot]):
                self._drop(units, slot, punch=True)
                freed += 1
        return freed + self.space.reclaim_dead(units)

    def reclaim(self, producer_pids: Sequence[int]) -> int:
        """Free units these dead producers wrote or committed that nobody will read."""
        pids = {int(p) for p in producer_pids}
        freed = 0
        with self.file.locked() as header:
            units = self.units(header)
            for slot in units.slots_in(WRITING, FILLED):
                owner = units.owner[slot]
                if owner in pids and not pid_alive(owner):
                    self._drop(units, slot, punch=units.state[slot] == WRITING)
                    freed += 1
        if freed:
            self.file.wakeup.notify()
        return freed

    # -- reporting ---------------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        """Units and bytes in use now and their peaks, over all processes."""
        words = self.file.words
        return self.with_units(
            lambda units: {
                "units_in_use": words[H_UNITS],
                "units_high_water": words[H_UNITS_HW],
                "bytes_in_use": words[H_BYTES],
                "bytes_high_water": words[H_BYTES_HW],
            }
        )

    def memory_figures(self) -> tuple[int, int | None]:
        """Memory the arena holds now, and its cap (None: a fixed arena)."""
        with self.file.locked() as header:
            units = self.units(header)
            return self.space.committed(units)[0], self.space.cap(units)

    def states(self) -> list[str]:
        """Every unit slot's state by name (diagnostics)."""
        return self.with_units(UnitTable.state_names)

    def with_units(self, fn: Callable[[UnitTable], Any]) -> Any:
        """``fn(units)`` under the lock, after releasing this process's dead
        leases and collecting released units (so what it reports is exact)."""
        flush_leases()
        with self.file.locked() as header:
            units = self.units(header)
            self.collect(units)
            return fn(units)
