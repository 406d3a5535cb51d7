"""What the segment pool and the ring buffer share.

An arena is one anonymous memory file (see :mod:`torch_arena._os.memory`) laid
out as a small header (an ``int64`` table both backends keep their unit states
in) followed by the data region. :class:`ArenaState` is the per-process side
of it: descriptors, the mapping, the lock and the wake-up pipe. It is kept
apart from the public arena object on purpose: restored views hold the state
(through their release callbacks) so that ``close()`` on the arena never pulls
memory from under a live view, and releases keep working until the last view
dies. The descriptors close when the last holder of the state is gone.

Releases triggered by the garbage collector may run in any thread, even in the
middle of another arena call on the same thread; they never block on the lock.
A release that cannot take the lock at once is queued, and whoever holds the
lock drains the queue before letting go (:meth:`ArenaState.locked`).
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from torch_arena._arena.leases import flush as flush_leases
from torch_arena._os.memory import PAGE_SIZE, create_memory_file, detach_fd, map_memory_file, share_fd
from torch_arena._os.sync import ProcessLock, Wakeup, current_pid

MAGIC = 0x5441_5245_4E41_0001  # "TARENA", layout version 1
# Common header slots (int64 each); backends use slots from BACKEND_SLOT on.
H_MAGIC, H_KIND, H_TOKEN, H_SHUTDOWN = 0, 1, 2, 3
H_UNITS, H_UNITS_HW, H_BYTES, H_BYTES_HW = 4, 5, 6, 7
BACKEND_SLOT = 16
ALIGN = 64

FREE, WRITING, FILLED, HELD = 0, 1, 2, 3


class ArenaSpaceTimeout(BufferError):
    """A producer waited its whole timeout for arena space that never came.

    Raised by the blocking backends; a loader that sees it stops waiting for
    space until a unit fits again, so a training loop that keeps its batches
    does not pay the timeout for every batch.
    """


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


def align_up(n: int, alignment: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``alignment``."""
    return (n + alignment - 1) // alignment * alignment


class CopyingWriter:
    """``write_binary`` for writers that can ``allocate`` (the protocol's one copy)."""

    def allocate(self, nbytes: int) -> tuple[int, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def write_binary(self, data: Any) -> tuple[int, int]:
        """Copy one contiguous bytes-like object into the unit; returns ``(offset, nbytes)``."""
        src = np.frombuffer(data, dtype=np.uint8)
        offset, dst = self.allocate(src.nbytes)
        np.copyto(dst, src)
        return offset, src.nbytes


class _Files:
    """The descriptors of one arena in one process; closed when dropped."""

    def __init__(self, memory_fd: int, read_fd: int, write_fd: int) -> None:
        self.memory_fd, self.read_fd, self.write_fd = memory_fd, read_fd, write_fd
        self.pid = current_pid()

    def __del__(self) -> None:
        close = getattr(os, "close", None)
        if close is None:
            return
        for fd in (self.memory_fd, self.read_fd, self.write_fd):
            try:
                close(fd)
            except OSError:
                pass


class ArenaState:
    """One process's handle on an arena's shared memory and primitives."""

    def __init__(
        self, files: _Files, total_bytes: int, header_bytes: int, token: int, reserved: bool = True
    ) -> None:
        self.files = files
        self.total_bytes = total_bytes
        self.header_bytes = header_bytes
        self.token = token
        self.reserved = reserved
        self.lock = ProcessLock(files.memory_fd)
        self.wakeup = Wakeup(files.read_fd, files.write_fd)
        self._mapping: Any = None
        self._mapping_pid = -1
        self._header: np.ndarray | None = None
        self._pending: collections.deque[Callable[[], None]] = collections.deque()

    @classmethod
    def create(
        cls, kind: int, data_bytes: int, header_slots: int, what: str, *, reserve_data: bool = True
    ) -> "ArenaState":
        """A new arena: header of ``header_slots`` int64 plus ``data_bytes``.

        With ``reserve_data`` off only the header is reserved: the data region
        is virtual, committed range by range by the backend.
        """
        header_bytes = align_up(header_slots * 8, PAGE_SIZE)
        total = header_bytes + data_bytes
        memory_fd = create_memory_file(total, what, reserve=None if reserve_data else header_bytes)
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        token = secrets.randbits(62) + 1
        state = cls(_Files(memory_fd, read_fd, write_fd), total, header_bytes, token, reserve_data)
        header = state.header
        header[H_MAGIC], header[H_KIND], header[H_TOKEN] = MAGIC, kind, token
        return state

    # -- per-process mapping ------------------------------------------------
    @property
    def mapping(self) -> Any:
        """This process's mapping of the whole file (made on first use)."""
        if self._mapping is None:
            self._mapping = map_memory_file(self.files.memory_fd, self.total_bytes, populate=self.reserved)
            self._mapping_pid = current_pid()
        return self._mapping

    @property
    def header(self) -> np.ndarray:
        """The ``int64`` header table, shared by every process."""
        if self._header is None:
            self._header = np.frombuffer(
                self.mapping.mmap, dtype=np.int64, count=self.header_bytes // 8
            )
        return self._header

    @property
    def data_address(self) -> int:
        """Address of the data region in this process."""
        return self.mapping.address + self.header_bytes

    def data_view(self, offset: int, nbytes: int) -> np.ndarray:
        """Plain ``uint8`` view of the data region (lifetime tied to the mapping)."""
        start = self.header_bytes + offset
        return self.mapping.array[start : start + nbytes]

    def anchored_view(self, offset: int, nbytes: int) -> np.ndarray:
        """``uint8`` view of the data region that derived views keep alive."""
        return self.mapping.anchored_view(self.header_bytes + offset, nbytes)

    # -- locking and deferred releases ---------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[np.ndarray]:
        """Hold the arena lock; yields the header. Drains queued releases on exit."""
        self.lock.acquire()
        try:
            try:
                yield self.header
            finally:
                self._drain_pending_locked()
        finally:
            self.lock.release()
            self._drain_pending()

    def _drain_pending_locked(self) -> None:
        released = False
        while self._pending:
            self._pending.popleft()()
            released = True
        if released:
            self.wakeup.notify()

    def _drain_pending(self) -> None:
        while self._pending:
            if not self.lock.try_acquire_thread():
                return  # the holder drains after us
            try:
                self._drain_pending_locked()
            finally:
                self.lock.release()

    def release_soon(self, release: Callable[[], None]) -> None:
        """Run ``release`` (which expects the lock) now if possible, else queue it.

        Safe from garbage-collector callbacks in any thread: never blocks on a
        lock this thread may already hold.
        """
        self._pending.append(release)
        self._drain_pending()

    # -- shutdown ------------------------------------------------------------
    @property
    def shut_down(self) -> bool:
        """Whether :meth:`shutdown` was called in any process."""
        return bool(self.header[H_SHUTDOWN])

    def shutdown(self) -> None:
        """Make every waiting producer give up now, in every process."""
        self.header[H_SHUTDOWN] = 1
        for _ in range(64):
            self.wakeup.notify()

    def count_usage(self, header: np.ndarray, units: int, nbytes: int) -> None:
        """Add to the in-use counters (under the lock) and track high-water marks."""
        header[H_UNITS] += units
        header[H_BYTES] += nbytes
        if header[H_UNITS] > header[H_UNITS_HW]:
            header[H_UNITS_HW] = header[H_UNITS]
        if header[H_BYTES] > header[H_BYTES_HW]:
            header[H_BYTES_HW] = header[H_BYTES]

    # -- pickling ------------------------------------------------------------
    def __reduce__(self) -> tuple[Any, ...]:
        files = self.files
        return (
            _rebuild_state,
            (
                share_fd(files.memory_fd),
                share_fd(files.read_fd),
                share_fd(files.write_fd),
                self.total_bytes,
                self.header_bytes,
                self.token,
                self.reserved,
            ),
        )


def _rebuild_state(
    memory_fd: object,
    read_fd: object,
    write_fd: object,
    total: int,
    header: int,
    token: int,
    reserved: bool = True,
) -> ArenaState:
    files = _Files(detach_fd(memory_fd), detach_fd(read_fd), detach_fd(write_fd))
    return ArenaState(files, total, header, token, reserved)


class ArenaBase:
    """Public behaviour common to both backends: lifetime, pickling, usage."""

    _state: ArenaState | None

    @property
    def state(self) -> ArenaState:
        """The live per-process state; raises once the arena is closed here."""
        if self._state is None:
            raise ValueError(f"{type(self).__name__} is closed in this process")
        return self._state

    @property
    def token(self) -> int:
        """Random identifier of this arena, written into every envelope."""
        return self.state.token

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called in this process."""
        return self._state is None

    def close(self) -> None:
        """Drop this process's handle on the arena.

        Views restored from the arena stay valid: the memory stays mapped, and
        their segments stay reserved, until the last of them is gone. Safe to
        call more than once.
        """
        self._state = None

    def unlink(self) -> None:
        """No-op, kept for the arena protocol.

        The memory has no name to remove: the kernel frees it once every
        process has closed it or exited, SIGKILLed ones included.
        """

    def shutdown_arena(self) -> None:
        """Wake every producer waiting for space so it fails at once."""
        if self._state is not None:
            self._state.shutdown()

    def reclaim(self, producer_pids: "list[int] | tuple[int, ...]") -> int:
        """Return units written by these (dead) producers that nobody will read.

        For integrations that know a producer's in-flight envelopes are lost
        (a DataLoader whose workers were shut down before their batches were
        read). Units already restored are not touched. Returns how many
        units were freed.
        """
        state = self.state
        with state.locked() as header:
            freed = self.reclaim_locked(header, producer_pids)
        if freed:
            state.wakeup.notify()
        return freed

    def reclaim_locked(self, header: np.ndarray, producer_pids: "list[int] | tuple[int, ...]") -> int:  # pragma: no cover
        """:meth:`reclaim` for a caller that already holds the arena lock."""
        raise NotImplementedError

    def usage(self) -> dict[str, int]:
        """Units and bytes in use now, and their high-water marks, over all processes."""
        flush_leases()
        header = self.state.header
        return {
            "units_in_use": int(header[H_UNITS]),
            "units_high_water": int(header[H_UNITS_HW]),
            "bytes_in_use": int(header[H_BYTES]),
            "bytes_high_water": int(header[H_BYTES_HW]),
        }

    def __enter__(self) -> "ArenaBase":
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.close()
        finally:
            self.unlink()
