"""The contract between arenas, the codec and the loader.

An *arena* is shared memory that several processes map. A *writer* (one per
producing thread, in any process) writes one *unit* at a time: every binary of
one item or batch. A *reader* (in the consuming process) opens a unit by its
*span* (an int the writer returned and the envelope carries), reads views of
its binaries, and finishes it. Every torch_arena backend implements the
protocols below; the codec, the session and the loader are typed against them
and import no backend.

SPDL's own arenas implement a subset (``begin_unit`` / ``write_binary`` /
``commit_unit`` / ``abort_unit`` on the writer, ``read_binary`` / ``end_unit``
on the reader): :class:`SpdlWriter` and :class:`SpdlReader`. torch_arena's
endpoints implement those too, so its arenas work as SPDL's ``arena=``; the
codec adapts SPDL's endpoints to :class:`ArenaWriter` / :class:`ArenaReader`
(:mod:`torch_arena._codec.endpoints`).

NOTE [ Arena units, leases, locks and fork ]
---------------------------------------------
The rules every backend follows, which comments elsewhere point to:

* **Unit life cycle.** A unit slot in the shared unit table goes
  FREE → WRITING (a writer claims it, under the arena lock) → FILLED
  (committed) → HELD (a reader opened it) → RELEASED (the reader is done) →
  FREE (collected). Space is charged to the unit from its first binary until it
  is collected; what differs between backends is only *how space is found*
  (:class:`torch_arena._arena.space.Space`).
* **The lock.** Every transition except HELD → RELEASED happens under the
  arena lock (:class:`torch_arena._os.sync.ProcessLock`: ``flock`` on the
  memory file, which the kernel drops when a holder dies). The lock is never
  held across a page fault, a ``posix_fallocate`` or a hole punch, and never
  taken by code the garbage collector may run (the locks are not reentrant).
* **Releases are stores, not lock round trips.** A reader releases a unit by
  one aligned 8-byte store of RELEASED into its state word: only the reading
  process ever writes a HELD unit's state, so no lock is needed, and the
  training process pays no lock and no table work for a release. The unit's
  space is collected (made free) by the next writer that takes the lock, in the
  worker's CPU budget, or by any call that reports usage.
* **Leases.** A zero-copy unit stays HELD while any view of it lives. Each
  view derives from a *lease* (a ``uint8`` array made straight from the
  mapping, so every derived view keeps it alive); a weak reference on each
  lease queues a hint when it dies, and a *drain* releases units whose leases
  are all dead (:mod:`torch_arena._arena.leases`). Drains are idempotent and
  run in the consumer's own arena calls or, a moment later, in a reaper
  thread; a ``KeyboardInterrupt`` inside one loses nothing.
* **Dead processes.** A unit WRITING for a dead writer is freed by the next
  writer that finds no room; units FILLED by dead producers whose envelopes
  will never be read are freed by :meth:`Arena.reclaim` (the loader calls it
  when it shuts its workers down). The memory file has no name: nothing is
  left behind when every process is gone, SIGKILLed ones included.
* **Wake-ups are hints.** A writer that finds no room counts itself as a
  waiter and sleeps on a pipe in short slices, re-checking the table under the
  lock each time; a release writes a byte when someone waits. A lost byte
  costs one slice, never correctness.
* **Fork.** A child starts with an empty lease registry (the parent's views
  are the parent's to release), fresh per-process lock state, and maps the
  file again on first use. Arenas travel to spawn and forkserver children as
  a picklable spec holding duplicated descriptors; unpickling checks the
  header's magic, kind and token, so a handle of the wrong kind or a foreign
  file is refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypedDict, runtime_checkable

import numpy as np

__all__ = [
    "EMPTY_SPAN",
    "PROTOCOL",
    "Arena",
    "ArenaReader",
    "ArenaUnit",
    "ArenaUsage",
    "ArenaWriter",
    "SpdlReader",
    "SpdlWriter",
    "is_native",
]

#: Version of the protocol below; torch_arena's endpoints carry it as
#: ``torch_arena_protocol``, which is how the codec tells them from SPDL's.
PROTOCOL = 2

#: The span of a unit without binaries (its envelope carries everything).
EMPTY_SPAN = (1 << 63) - 1


def is_native(endpoint: object) -> bool:
    """Whether ``endpoint`` implements this module's protocol (not only SPDL's)."""
    return getattr(endpoint, "torch_arena_protocol", 0) == PROTOCOL


class SpdlWriter(Protocol):
    """SPDL's writer endpoint: what any arena's writer offers."""

    def begin_unit(self) -> None: ...
    def write_binary(self, data: Any) -> tuple[int, int]: ...
    def commit_unit(self) -> int: ...
    def abort_unit(self) -> None: ...
    def reset(self) -> None: ...


class SpdlReader(Protocol):
    """SPDL's reader endpoint: what any arena's reader offers."""

    zero_copy: bool

    def read_binary(self, offset: int, nbytes: int) -> memoryview: ...
    def end_unit(self, span: int, pinned: list[object]) -> None: ...
    def reset(self) -> None: ...


class ArenaWriter(Protocol):
    """The producer endpoint: writes one unit at a time. One per thread.

    Life cycle: ``begin_unit`` → any number of ``allocate`` / ``write_binary``
    → exactly one of ``commit_unit`` (returns the span) or ``abort_unit``.
    Space is taken as binaries arrive (a unit's size is never announced), and
    waiting for space happens there, up to the timeout given to
    ``begin_unit`` (default: the arena's ``acquire_timeout``); a unit that
    cannot fit even in an empty arena raises
    :class:`~torch_arena.errors.ArenaUnitTooLarge` at once.
    """

    torch_arena_protocol: int
    token: int
    """The arena's token, written into every envelope."""
    last_wait_seconds: float
    """Seconds the latest unit waited for space."""
    direct: bool
    """Whether ``allocate`` hands out memory inside the unit itself (so a
    collate function can build the batch in place); False for adapters of
    foreign writers, whose ``allocate`` raises."""

    def begin_unit(self, timeout: float | None = None) -> None: ...

    def allocate(self, nbytes: int) -> tuple[int, np.ndarray]:
        """Reserve ``nbytes`` in the open unit: ``(offset, writable uint8 view)``."""
        ...

    def place(self, src: np.ndarray) -> int:
        """The offset of ``src``'s bytes in the open unit: where they already
        lie (written in place after ``allocate``), else a new copy."""
        ...

    def write_binary(self, data: Any) -> tuple[int, int]: ...
    def commit_unit(self) -> int: ...
    def abort_unit(self) -> None: ...

    def reset(self) -> None:
        """Abandon a unit left open (its space goes back)."""
        ...


class ArenaUnit(Protocol):
    """One opened unit. ``view`` bounds-checks every ``(offset, nbytes)``
    against the unit's own space before touching memory (a ValueError saying
    "corrupt envelope" otherwise). ``finish`` is called exactly once."""

    zero_copy: bool
    """True: views stay valid while they live (the unit is released when the
    last dies). False: views are valid until ``finish``; copy out first."""

    def view(self, offset: int, nbytes: int) -> Any: ...

    def private_copy(self, view: Any) -> np.ndarray:
        """``view``'s bytes as a private ``uint8`` array the caller may keep
        (copy-out units put it in recycled private memory)."""
        ...

    def finish(self, pinned: Sequence[object] = ()) -> None:
        """The unit is read. Zero-copy: release it once every view and every
        object in ``pinned`` is gone. Copy-out: release it now."""
        ...


class ArenaReader(Protocol):
    """The consumer endpoint, in the process that restores. ``open_unit``
    refuses a span that is not waiting to be read (stale, restored already,
    another arena's) with a ValueError."""

    torch_arena_protocol: int
    token: int
    zero_copy: bool
    """Whether units open zero-copy (a pool) or copy out (a ring)."""
    spilled: int
    """Units a copy-out reader opened zero-copy because their private copy
    would not have fit in memory (always 0 for a zero-copy reader)."""

    def open_unit(self, span: int) -> ArenaUnit: ...

    def hold_unread(self, span: int, anchor: object) -> None:
        """Keep the committed unit ``span`` for later: if ``anchor`` dies before
        the unit is opened, the unit is released unread."""
        ...

    def read_binary(self, offset: int, nbytes: int) -> Any: ...
    def end_unit(self, span: int, pinned: list[object]) -> None: ...
    def reset(self) -> None: ...
    def describe(self) -> str: ...

    def note_epoch(self) -> None:
        """An epoch boundary: private memory sized for earlier epochs may go."""
        ...


class ArenaUsage(TypedDict, total=False):
    """What :meth:`Arena.usage` reports (the first six keys always)."""

    units_in_use: int
    units_high_water: int
    bytes_in_use: int
    bytes_high_water: int
    committed_bytes: int
    """Memory the arena holds now (a fixed arena: its whole size)."""
    committed_high_water: int
    max_bytes: int
    """The cap on committed memory (self-sizing arenas only)."""


@runtime_checkable
class Arena(Protocol):
    """An arena handle. Picklable: it travels to worker processes (fork,
    spawn, forkserver) and any number of them may write at once."""

    token: int
    closed: bool
    units_limit: int | None
    """The most units the arena holds at once whatever their size (a fixed
    pool's segment count), or None."""

    def open_writer(self) -> ArenaWriter: ...
    def open_reader(self) -> ArenaReader: ...

    def close(self) -> None:
        """Drop this process's handle; restored views stay valid."""
        ...

    def unlink(self) -> None: ...

    def shutdown_arena(self) -> None:
        """Make every waiting producer, in every process, give up now."""
        ...

    def reclaim(self, producer_pids: Sequence[int]) -> int:
        """Free units these dead producers wrote that nobody will read."""
        ...

    def usage(self) -> ArenaUsage: ...

    def note_epoch(self) -> None:
        """An epoch boundary: memory sized for earlier epochs may go back."""
        ...

    def describe(self) -> str:
        """A short phrase for messages ("an elastic pool capped at 8.0 GiB")."""
        ...

    def advice(self, exc: BaseException, unit_bytes: int, units_in_flight: int) -> str:
        """What to change when a unit of ``unit_bytes`` did not fit (``exc``)
        while up to ``units_in_flight`` units are in flight or held."""
        ...
