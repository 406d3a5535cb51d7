"""The segment pool: fixed-size segments, one unit each, zero-copy restore.

SPDL's blocking pool. Unit slot *i* owns segment *i* of ``segment_size``
bytes: a unit takes a free slot and its segment with its first binary
(waiting up to ``acquire_timeout`` when none is free), writes its binaries
into it one after another, and is restored as zero-copy views into the
segment. The segment is free again when the last of those views dies,
whatever order units are released in: holding one batch never stalls the
others, and a segment is never handed to a writer while a view into it lives.
All memory is reserved when the pool is made.
"""

from __future__ import annotations

from typing import Any

from torch_arena._arena.arena_file import KIND_SEGMENT_POOL, align_up
from torch_arena._arena.handle import BLOCKING_TIMEOUT_S, ArenaHandle, check_positive_int, check_timeout
from torch_arena._arena.readers import ZeroCopyReader
from torch_arena._arena.space import Extent, Placement, Space, too_large
from torch_arena._arena.units import FILLED, HELD, UnitTable
from torch_arena._os.memory import PAGE_SIZE
from torch_arena._os.sizes import format_bytes
from torch_arena.errors import ArenaSpaceTimeout

__all__ = ["SharedMemorySegmentPool"]


class SegmentSpace(Space):
    """Space for the segment pool: a unit's one chunk is its slot's segment."""

    noun = "pool"
    claims_at_begin = True

    def __init__(self, segment_size: int, count: int) -> None:
        self.segment_size = segment_size
        self.unit_slots = count
        self.stride = align_up(segment_size, PAGE_SIZE)
        self.data_bytes = self.stride * count

    def chunk(self, taken: int, used: int, nbytes: int) -> int:
        need = align_up(used) + nbytes if taken else nbytes
        if need > self.segment_size:
            raise too_large(need, f"a segment of {format_bytes(self.segment_size)}", self.segment_size, "segment_size")
        return self.segment_size

    def take(self, units: UnitTable, slot: int, nbytes: int, need: int, pid: int) -> Placement | None:
        return Placement(slot * self.stride, self.segment_size)

    def close_unit(self, units: UnitTable, slot: int, last: Placement | None, used: int) -> tuple[Extent, ...]:
        units.charge(slot, used)  # a unit is charged what it wrote, not its whole segment
        return ()

    def free_unit(self, units: UnitTable, slot: int, *, punch: bool) -> None:
        pass  # the segment is the slot's: freeing the slot frees it

    def extents(self, units: UnitTable, slot: int) -> list[Extent]:
        return [Extent(slot * self.stride, units.nbytes[slot])]

    def unit_at(self, units: UnitTable, offset: int, nbytes: int) -> int:
        slot = offset // self.stride
        if 0 <= slot < self.unit_slots and units.state[slot] in (FILLED, HELD):
            return slot
        return -1

    def full_message(self, units: UnitTable, need: int, waited: float, timeout: float) -> str:
        return (
            f"SharedMemorySegmentPool: no free segment after {waited:.1f} s: all {self.unit_slots} segments "
            f"of {format_bytes(self.segment_size)} are in use (restored views still alive, or units in "
            "flight). Drop restored batches sooner, raise count, or raise acquire_timeout."
        )


class SharedMemorySegmentPool(ArenaHandle):
    """A blocking pool of ``count`` shared-memory segments of ``segment_size`` bytes.

    Restores are zero-copy views that keep their segment reserved while alive.
    The pool is picklable (it travels to fork, spawn and forkserver children
    as file descriptors) and any number of producer processes may write into
    it at once. All memory is reserved up front.

    Args:
        segment_size: Bytes per segment: the largest unit (one item or batch,
            all its binaries together plus 64-byte alignment) it can hold.
        count: Number of segments: how many units can be in flight or held.
        acquire_timeout: Seconds a producer waits for a free segment before
            :class:`~torch_arena.ArenaSpaceTimeout`.
    """

    KIND = KIND_SEGMENT_POOL
    reader_class = ZeroCopyReader

    def __init__(self, segment_size: int, count: int, *, acquire_timeout: float = BLOCKING_TIMEOUT_S) -> None:
        self._set_params({"segment_size": segment_size, "count": count, "acquire_timeout": acquire_timeout})
        self._create(f"SharedMemorySegmentPool(segment_size={segment_size}, count={count})")

    def _params(self) -> dict[str, Any]:
        return {"segment_size": self.segment_size, "count": self.count, "acquire_timeout": self.acquire_timeout}

    def _set_params(self, params: dict[str, Any]) -> None:
        self.segment_size = check_positive_int("segment_size", params["segment_size"])
        self.count = check_positive_int("count", params["count"])
        self.acquire_timeout = check_timeout(params["acquire_timeout"])

    def _make_space(self) -> SegmentSpace:
        return SegmentSpace(self.segment_size, self.count)

    @property
    def units_limit(self) -> int:  # type: ignore[override]
        """One unit per segment."""
        return self.count

    @property
    def capacity(self) -> int:
        """Total bytes of all segments."""
        return self.segment_size * self.count

    def segment_states(self) -> list[str]:
        """Each segment's state, for diagnostics ('free', 'being written', …)."""
        return self.core.states()

    def describe(self) -> str:
        return f"a pool of {self.count} segments of {format_bytes(self.segment_size)}"

    def _advice(self, exc: BaseException, unit_bytes: int, units_in_flight: int) -> str:
        if isinstance(exc, ArenaSpaceTimeout):
            return (
                "the training loop keeps batches alive (or the pool has fewer segments than the "
                f"{units_in_flight} batches in flight), so keep fewer of them (or copy what you keep), "
                f"or pass a pool with a segment for each: SharedMemorySegmentPool(segment_size="
                f"{unit_bytes + (64 << 10)}, count={units_in_flight} + batches kept), or arena='pool' "
                "(an elastic pool)"
            )
        return (
            f"raise segment_size to at least {unit_bytes + (64 << 10)} "
            "(SharedMemorySegmentPool(segment_size=..., count=...)), or pass arena='pool' (an elastic "
            "pool that sizes itself)"
        )
