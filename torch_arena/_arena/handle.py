"""What every public arena class shares: lifetime, pickling, endpoints, usage.

A public arena (:class:`~torch_arena.SharedMemorySegmentPool` and the others)
is a thin layer: its parameters, the :class:`~torch_arena._arena.space.Space`
they make, which reader it hands out, and how it describes itself and advises
when full. Everything else is :class:`ArenaHandle` over the one unit machinery
(:mod:`torch_arena._arena.core`).

Pickling sends an :class:`~torch_arena._arena.arena_file.ArenaSpec`: the
kind, token, sizes, parameters and duplicated descriptors. Unpickling checks
the file's header against it and rebuilds the handle from the parameters
through the same validation as the constructor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch_arena._arena.arena_file import H_SLOTS, UNIT_TABLE, ArenaFile, ArenaSpec
from torch_arena._arena.core import ArenaCore
from torch_arena._arena.space import Space
from torch_arena._arena.units import UnitTable
from torch_arena._arena.writer import UnitWriter

__all__ = [
    "ArenaHandle",
    "BLOCKING_TIMEOUT_S",
    "NON_BLOCKING_TIMEOUT_S",
    "check_positive_int",
    "check_timeout",
]

#: Default ``acquire_timeout`` of the blocking arenas (the pools, the elastic
#: ring): long, so it fires only for a consumer that stalled or died, never
#: for ordinary back-pressure. A loader waits ``arena_timeout`` instead.
BLOCKING_TIMEOUT_S = 60.0
#: Default ``acquire_timeout`` of :class:`~torch_arena.SharedMemoryRingBuffer`:
#: "arena full" at once, as SPDL's ring behaved up to spdl 0.7.
NON_BLOCKING_TIMEOUT_S = 0.0


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is a positive int (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_timeout(value: object) -> float:
    """``acquire_timeout`` as a float, or a ValueError if it is not a number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"acquire_timeout must be a number of seconds >= 0, got {value!r}")
    return float(value)


class ArenaHandle:
    """Public behaviour common to every arena."""

    #: The header's kind word (``KIND_*`` of :mod:`.arena_file`).
    KIND: ClassVar[int]
    #: The consumer endpoint class (zero-copy or copy-out).
    reader_class: ClassVar[Any]
    acquire_timeout: float
    #: The most units held at once whatever their size, or None (see the protocol).
    units_limit: int | None = None
    _core: ArenaCore | None = None

    # -- what a backend defines --------------------------------------------------------
    def _params(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """The constructor arguments another process needs."""
        raise NotImplementedError

    def _set_params(self, params: dict[str, Any]) -> None:  # pragma: no cover - abstract
        """Set (and validate) the parameters, as ``__init__`` does."""
        raise NotImplementedError

    def _make_space(self) -> Space:  # pragma: no cover - abstract
        """This process's allocator for the parameters."""
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        """A short phrase for messages."""
        raise NotImplementedError

    def advice(self, exc: BaseException, unit_bytes: int, units_in_flight: int) -> str:
        """What to change when a unit of ``unit_bytes`` did not fit (``exc``)."""
        if isinstance(exc, MemoryError):
            return (
                "the kernel refused more shared memory: free memory, lower num_workers or "
                "prefetch_factor, or make the arena smaller"
            )
        return self._advice(exc, unit_bytes, units_in_flight)

    def _advice(self, exc: BaseException, unit_bytes: int, units_in_flight: int) -> str:  # pragma: no cover
        raise NotImplementedError

    # -- life cycle ------------------------------------------------------------------
    def _create(self, what: str) -> None:
        space = self._make_space()
        slots = UNIT_TABLE + UnitTable.header_slots(space.unit_slots) + space.header_slots()
        file = ArenaFile.create(self.KIND, space.data_bytes, slots, what, reserve_data=space.reserve_data)
        file.header[H_SLOTS] = space.unit_slots
        self._core = core = ArenaCore(file, space, type(self).__name__)
        space.initialise(core.units(file.header))

    def __getstate__(self) -> ArenaSpec:
        return self.core.file.spec(self.KIND, self._params())

    def __setstate__(self, spec: ArenaSpec) -> None:
        if not isinstance(spec, ArenaSpec):
            raise TypeError(f"cannot unpickle a {type(self).__name__} from {type(spec).__name__}")
        self._set_params(spec.params)
        self._core = ArenaCore(ArenaFile.attach(spec, self.KIND), self._make_space(), type(self).__name__)

    @property
    def core(self) -> ArenaCore:
        """The unit machinery in this process; raises once the arena is closed here."""
        if self._core is None:
            raise ValueError(f"{type(self).__name__} is closed in this process")
        return self._core

    @property
    def file(self) -> ArenaFile:
        """The arena's memory file in this process (diagnostics and tests)."""
        return self.core.file

    @property
    def token(self) -> int:
        """Random identifier of this arena, written into every envelope."""
        return self.core.token

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called in this process."""
        return self._core is None

    def close(self) -> None:
        """Drop this process's handle on the arena.

        Views restored from the arena stay valid: the memory stays mapped, and
        their units stay held, until the last of them is gone. Its endpoints
        start no new unit. Safe to call more than once.
        """
        if self._core is not None:
            self._core.closed = True
        self._core = None

    def unlink(self) -> None:
        """No-op, kept for SPDL's arena protocol: the memory has no name to
        remove; the kernel frees it once every process has closed it or exited."""

    def __enter__(self) -> "ArenaHandle":
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.close()
        finally:
            self.unlink()

    # -- endpoints ---------------------------------------------------------------------
    def open_writer(self) -> UnitWriter:
        """A producer endpoint for this process (one per producing thread)."""
        return UnitWriter(self.core, self.acquire_timeout)

    def open_reader(self) -> Any:
        """The consumer endpoint."""
        return self.reader_class(self.core, f"a {type(self).__name__} ({self.describe()})")

    # -- operations ----------------------------------------------------------------------
    def shutdown_arena(self) -> None:
        """Wake every producer waiting for space, in every process, so it fails at once."""
        if self._core is not None:
            self._core.file.shutdown()

    def reclaim(self, producer_pids: Sequence[int]) -> int:
        """Return units written by these (dead) producers that nobody will read.

        For integrations that know a producer's in-flight envelopes are lost
        (a DataLoader whose workers were shut down before their batches were
        read). Units already restored are not touched; producers still alive
        are skipped. Returns how many units were freed.
        """
        return self.core.reclaim(producer_pids)

    def usage(self) -> dict[str, int]:
        """Units and bytes in use now and their high-water marks, over all
        processes, and the memory the arena holds (see
        :class:`~torch_arena._arena.protocol.ArenaUsage`)."""
        core = self.core
        usage = core.usage()
        usage["committed_bytes"], usage["committed_high_water"] = core.space.committed(core.units(core.file.header))
        return usage

    def note_epoch(self) -> None:
        """An epoch boundary: memory sized for earlier epochs may go back."""
        core = self.core
        with core.file.locked() as header:
            core.space.note_epoch(core.units(header))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({params})"

