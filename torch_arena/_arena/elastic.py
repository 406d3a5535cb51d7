"""The self-sizing arenas: :class:`SharedMemoryElasticPool` and :class:`SharedMemoryElasticRing`.

Both are the elastic memory (:mod:`torch_arena._arena.elastic_space`): no
segment size, no count, a unit of any size up to the cap, memory committed as
units need it and given back when the working set shrinks. They differ only
in their reader: the pool hands out zero-copy views (a unit is held while any
of them lives), the ring copies each unit into recycled private memory and
releases it at once. ``ArenaDataLoader(arena="pool")`` and ``arena="ring"``
make them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch_arena._arena.arena_file import KIND_ELASTIC_POOL, KIND_ELASTIC_RING
from torch_arena._arena.elastic_space import ElasticSpace
from torch_arena._arena.extents import STATE_NAMES
from torch_arena._arena.handle import BLOCKING_TIMEOUT_S, ArenaHandle, check_timeout
from torch_arena._arena.readers import CopyOutReader, ZeroCopyReader
from torch_arena._os.limits import available_memory
from torch_arena._os.memory import PAGE_SIZE
from torch_arena._os.sizes import format_bytes, parse_bytes
from torch_arena.errors import ArenaSpaceTimeout

__all__ = ["SharedMemoryElasticPool", "SharedMemoryElasticRing", "default_max_bytes"]

#: Share of the available memory an elastic arena may commit by default.
DEFAULT_SHARE = 2


def default_max_bytes() -> int:
    """The default cap on an elastic arena's committed memory: half of the
    memory available now (the smaller of ``MemAvailable`` and the headroom
    under the memory cgroup's limit), at least 64 MiB."""
    available, _ = available_memory()
    if available is None:
        return 4 << 30
    return max(64 << 20, available // DEFAULT_SHARE // PAGE_SIZE * PAGE_SIZE)


class _ElasticArena(ArenaHandle):
    """The elastic memory behind a public handle; subclasses choose the reader."""

    noun: ClassVar[str]

    def __init__(self, max_bytes: "int | float | str | None" = None, *, acquire_timeout: float = BLOCKING_TIMEOUT_S) -> None:
        cap = default_max_bytes() if max_bytes is None else parse_bytes(max_bytes, "max_bytes")
        self._set_params({"max_bytes": cap, "acquire_timeout": acquire_timeout})
        self._create(f"{type(self).__name__}(max_bytes={cap})")

    def _params(self) -> dict[str, Any]:
        return {"max_bytes": self.max_bytes, "acquire_timeout": self.acquire_timeout}

    def _set_params(self, params: dict[str, Any]) -> None:
        self.max_bytes = parse_bytes(params["max_bytes"], "max_bytes")
        self.acquire_timeout = check_timeout(params["acquire_timeout"])

    def _make_space(self) -> ElasticSpace:
        return ElasticSpace(self.max_bytes, self.noun, type(self).__name__)

    @property
    def capacity(self) -> int:
        """The cap on committed bytes (``max_bytes``)."""
        return self.max_bytes

    def usage(self) -> dict[str, int]:
        """:meth:`ArenaHandle.usage`, plus the cap (``max_bytes``)."""
        usage = super().usage()
        usage["max_bytes"] = self.max_bytes
        return usage

    def extent_states(self) -> dict[str, int]:
        """Bytes per extent state ('warm', 'busy', 'cold', ...), for diagnostics."""
        core = self.core
        by_state = core.with_units(core.space.state_bytes)
        return {STATE_NAMES[state]: nbytes for state, nbytes in by_state.items()}

    def trim(self, keep_bytes: int = 0) -> int:
        """Give warm (free, committed) memory above ``keep_bytes`` back to the
        kernel now; returns the bytes given back. Units in use are untouched."""
        core = self.core
        space: ElasticSpace = core.space  # type: ignore[assignment]
        return space.give_back(core.with_units(lambda units: space.trim(units, keep_bytes)))

    def describe(self) -> str:
        return f"an elastic {self.noun} capped at {format_bytes(self.max_bytes)}"

    def _advice(self, exc: BaseException, unit_bytes: int, units_in_flight: int) -> str:
        if isinstance(exc, ArenaSpaceTimeout):
            return (
                f"the arena is at its budget (arena_budget={format_bytes(self.max_bytes)}) with batches in "
                "flight or still alive in the training loop, and none was released within arena_timeout: "
                "keep fewer batches alive (copy what you keep with .clone()), raise arena_budget (e.g. "
                f"arena_budget='{-(-2 * self.max_bytes // (1 << 20))}MiB'; max_bytes= on an arena you make), "
                "or raise arena_timeout"
            )
        return (
            f"give it room for every batch in flight, e.g. arena_budget >= "
            f"{format_bytes(unit_bytes * units_in_flight)} ({units_in_flight} × the batch)"
        )


class SharedMemoryElasticPool(_ElasticArena):
    """A zero-copy pool that sizes itself to the units written into it.

    No segment size, no count: a unit of any size up to ``max_bytes`` fits,
    memory is committed as units need it and given back when the working set
    shrinks, and a unit's space is never reused while a view of it lives.
    Picklable (fork, spawn, forkserver), any number of producer processes,
    SPDL's endpoint protocol (so it also works as ``arena=`` for SPDL's
    ``run_pipeline_in_subprocess``).

    Args:
        max_bytes: Cap on committed memory: bytes as an int, an integral float
            or a string (``"4GiB"``). Default: :func:`default_max_bytes`, half
            of the memory available when the pool is made.
        acquire_timeout: Seconds a producer waits, once the cap is reached, for
            restored units to be released before
            :class:`~torch_arena.ArenaSpaceTimeout`.
    """

    KIND = KIND_ELASTIC_POOL
    reader_class = ZeroCopyReader
    noun = "pool"


class SharedMemoryElasticRing(_ElasticArena):
    """The ring's semantics over the elastic memory: nothing to size.

    The same memory as :class:`SharedMemoryElasticPool`, with a copy-out
    reader: every restore is a private copy (nothing in the consumer points
    into shared memory, so batches the training loop keeps cost no arena
    space) into recycled private memory, and a unit's space is free again as
    soon as it is read. What ``ArenaDataLoader(arena="ring")`` uses;
    :class:`~torch_arena.SharedMemoryRingBuffer` keeps SPDL's fixed ring.

    Args:
        max_bytes: Cap on committed memory (default: half of the memory available).
        acquire_timeout: Seconds a producer waits for space at the cap.
    """

    KIND = KIND_ELASTIC_RING
    reader_class = CopyOutReader
    noun = "ring"
