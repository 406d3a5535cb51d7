"""The producer endpoint of every arena: units that take space as they are written.

The writer protocol (``begin_unit`` / binaries / ``commit_unit``) never says
how large a unit will be, so :class:`UnitWriter` takes space a *chunk* at a
time as binaries arrive; the backend decides how large a chunk is (a whole
segment, exactly the binary, or a growing extent) and where it lies. Within
a chunk, binaries are placed one after another, each 64-byte aligned. The
unit's slot is claimed together with its first chunk, so a unit costs two
lock round trips (first chunk, commit) whatever the backend; a unit without
binaries costs none and has the span ``EMPTY_SPAN``. A backend whose units
take all their space at once (the segment pool) claims it in ``begin_unit``,
which then waits for it, as SPDL's blocking pool does.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from torch_arena._arena.arena_file import align_up
from torch_arena._arena.core import ArenaCore
from torch_arena._arena.leases import reap_now
from torch_arena._arena.protocol import EMPTY_SPAN, PROTOCOL
from torch_arena._arena.space import Extent, Placement

__all__ = ["UnitWriter"]


class UnitWriter:
    """Producer endpoint of an arena (see :class:`~torch_arena._arena.protocol.ArenaWriter`)."""

    torch_arena_protocol = PROTOCOL
    direct = True

    def __init__(self, core: ArenaCore, acquire_timeout: float) -> None:
        self._core = core
        self.token = core.token
        self._acquire_timeout = acquire_timeout
        self._timeout = acquire_timeout
        self._open = False
        self._slot = -1
        self._gen = 0
        self._extents: list[Extent] = []
        self._last: Placement | None = None
        self._used = 0  # bytes written in the last extent, alignment included
        self._taken = 0  # bytes of space the unit holds
        self.last_wait_seconds = 0.0

    def reset(self) -> None:
        """Abandon a unit left open (its space goes back)."""
        if self._open:
            self.abort_unit()

    def begin_unit(self, timeout: float | None = None) -> None:
        """Open a new unit; space is taken (and waited for, up to ``timeout``,
        default the arena's ``acquire_timeout``) as binaries are written."""
        if self._open:
            raise RuntimeError("begin_unit: a unit is already open; commit_unit() or abort_unit() it first")
        self._core.check_open()
        reap_now()  # views this process dropped free their space first: it is reused warm
        self._open = True
        self._slot, self._extents, self._last, self._used, self._taken = -1, [], None, 0, 0
        self._timeout = self._acquire_timeout if timeout is None else timeout
        self.last_wait_seconds = 0.0
        if self._core.space.claims_at_begin:
            try:
                self._grow(0)
            except BaseException:
                self._open = False
                raise

    def allocate(self, nbytes: int) -> tuple[int, np.ndarray]:
        """Reserve ``nbytes`` in the open unit; returns ``(offset, writable uint8 view)``."""
        if not self._open:
            raise RuntimeError("no open unit: call begin_unit() first")
        start = align_up(self._used)
        if not self._extents or start + nbytes > self._extents[-1].length:
            self._grow(nbytes)
            start = align_up(self._used)
        offset = self._extents[-1].start + start
        self._used = start + nbytes
        return offset, self._core.file.data_view(offset, nbytes)

    def _grow(self, nbytes: int) -> None:
        core = self._core
        space = core.space
        want = space.chunk(self._taken, self._used, nbytes)
        started = time.monotonic()
        try:
            if self._slot < 0:
                self._slot, self._gen, placement = core.wait_for(
                    lambda units, pid: core.claim_and_take(units, want, nbytes, pid), timeout=self._timeout, need=want
                )
            else:
                slot = self._slot
                placement = core.wait_for(
                    lambda units, pid: space.take(units, slot, want, nbytes, pid), timeout=self._timeout, need=want
                )
        finally:
            self.last_wait_seconds += time.monotonic() - started
        try:
            space.after_take(placement, f"a unit of {core.name}")
        except MemoryError:
            self.abort_unit(punch=True)
            raise
        last = self._extents[-1] if self._extents else None
        if last is not None and last.start + last.length == placement.start:
            # Contiguous with the previous chunk (a ring extends its last
            # reservation): one extent, so binaries may continue across.
            self._extents[-1] = Extent(last.start, last.length + placement.length)
        else:
            self._extents.append(Extent(placement.start, placement.length))
            self._used = 0
        self._last = placement
        self._taken += placement.length

    def locate(self, address: int, nbytes: int) -> int | None:
        """Offset of memory already inside the open unit, else ``None``."""
        rel = address - self._core.file.data_address
        for start, length in self._extents:
            if start <= rel and rel + nbytes <= start + length:
                return rel
        return None

    def place(self, src: np.ndarray) -> int:
        """The offset of ``src``'s bytes in the unit: where they already lie
        (a batch collated in place), else where they are copied to."""
        nbytes = src.nbytes
        offset = self.locate(int(src.ctypes.data), nbytes) if nbytes else None
        if offset is None:
            offset, dst = self.allocate(nbytes)
            np.copyto(dst, src.reshape(-1).view(np.uint8) if src.dtype != np.uint8 else src.reshape(-1))
        return offset

    def write_binary(self, data: Any) -> tuple[int, int]:
        """Copy one contiguous bytes-like object into the unit (SPDL's protocol)."""
        src = np.frombuffer(data, dtype=np.uint8)
        offset, dst = self.allocate(src.nbytes)
        np.copyto(dst, src)
        return offset, src.nbytes

    def commit_unit(self) -> int:
        """Close the unit (its unused space goes back); returns its span."""
        if not self._open:
            raise RuntimeError("no open unit: call begin_unit() first")
        self._open = False
        if self._slot < 0:
            return EMPTY_SPAN
        last = self._last
        used_in_last = self._extents[-1].start + self._used - last.start if last is not None else 0
        self._core.commit(self._slot, last, used_in_last)
        return (self._gen << 32) | self._slot

    def abort_unit(self, *, punch: bool = False) -> None:
        """Discard the open unit; its space is free again (given back to the
        kernel with ``punch``, for memory that may be half committed)."""
        if not self._open:
            raise RuntimeError("no open unit: call begin_unit() first")
        self._open = False
        if self._slot >= 0:
            self._core.abort(self._slot, self._gen, punch=punch)
