"""One arena's memory file: its header layout, and one process's handle on it.

Every arena is one anonymous memory file (:mod:`torch_arena._os.memory`): a
header of ``int64`` words, then the data region. The header's common part:

=====  ===============  ===========================  ==============================================
slot   name             written                      meaning
=====  ===============  ===========================  ==============================================
0      ``MAGIC``        at creation                  ``"TARENA"`` and the layout version
1      ``KIND``         at creation                  which backend (``KIND_*`` below)
2      ``TOKEN``        at creation                  random id, written into every envelope
3      ``SHUTDOWN``     by anyone                    1: producers waiting for space give up
4, 5   ``UNITS``, _HW   under the lock               units not free; their high-water mark
6, 7   ``BYTES``, _HW   under the lock               bytes the backend charges to units; peak
8      ``WAITERS``      under the lock               producers waiting for space right now
9      ``SLOTS``        at creation                  rows of the unit table
10     ``SLOTS_USED``   under the lock               rows ever used (scans stop there)
16     unit table       see :mod:`.units`            4 columns × ``SLOTS`` rows
…      backend region   see the backend              the backend's own table (``Space``)
=====  ===============  ===========================  ==============================================

:class:`ArenaFile` is the per-process side: descriptors, the mapping (made on
first use in each process), the lock and the wake-up pipe. It is kept apart
from the public arena object on purpose: readers, writers and restored views
hold the file (through their endpoints and leases), so ``close()`` on the
arena never pulls memory from under a live view. The descriptors close when
the last holder is gone. :class:`ArenaSpec` is what crosses to another
process; :meth:`ArenaFile.attach` checks the header before trusting it.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Callable
from typing import Any

import numpy as np

from torch_arena._os.memory import PAGE_SIZE, create_memory_file, detach_fd, map_memory_file, share_fd
from torch_arena._os.sync import ProcessLock, Wakeup

__all__ = ["ArenaFile", "ArenaSpec", "KIND_NAMES", "align_up"]

MAGIC = 0x5441_5245_4E41_0002  # "TARENA", layout version 2
H_MAGIC, H_KIND, H_TOKEN, H_SHUTDOWN = 0, 1, 2, 3
H_UNITS, H_UNITS_HW, H_BYTES, H_BYTES_HW = 4, 5, 6, 7
H_WAITERS, H_SLOTS, H_SLOTS_USED = 8, 9, 10
UNIT_TABLE = 16
#: Alignment of every binary in a unit (zero-copy views land on aligned addresses).
ALIGN = 64

KIND_SEGMENT_POOL, KIND_RING_BUFFER, KIND_ELASTIC_POOL, KIND_ELASTIC_RING = 1, 2, 3, 4
KIND_NAMES = {
    KIND_SEGMENT_POOL: "SharedMemorySegmentPool",
    KIND_RING_BUFFER: "SharedMemoryRingBuffer",
    KIND_ELASTIC_POOL: "SharedMemoryElasticPool",
    KIND_ELASTIC_RING: "SharedMemoryElasticRing",
}


def align_up(n: int, alignment: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``alignment``."""
    return (n + alignment - 1) // alignment * alignment


class _Descriptors:
    """The descriptors of one arena in one process; closed when dropped."""

    def __init__(self, memory_fd: int, read_fd: int, write_fd: int) -> None:
        self.memory_fd, self.read_fd, self.write_fd = memory_fd, read_fd, write_fd

    def __del__(self) -> None:
        close = getattr(os, "close", None)
        if close is None:  # interpreter shutdown
            return
        for fd in (self.memory_fd, self.read_fd, self.write_fd):
            try:
                close(fd)
            except OSError:
                pass


@dataclasses.dataclass(frozen=True)
class ArenaSpec:
    """Everything another process needs to open an arena: its kind and token
    (checked against the header), sizes, the handle's parameters, and the
    descriptors, which pickle as duplicates (fork, spawn, forkserver, queues)."""

    kind: int
    token: int
    total_bytes: int
    header_bytes: int
    reserved: bool
    params: dict[str, Any]
    memory_fd: Any
    read_fd: Any
    write_fd: Any


class _Locked:
    """The arena lock as a context manager that yields the header (a class,
    not a generator: it is entered on every unit's path)."""

    __slots__ = ("file",)

    def __init__(self, file: "ArenaFile") -> None:
        self.file = file

    def __enter__(self) -> np.ndarray:
        file = self.file
        header = file.header  # first: nothing may raise once the lock is held
        file.lock.acquire()
        return header

    def __exit__(self, *exc_info: object) -> None:
        self.file.lock.release()


class ArenaFile:
    """One process's handle on an arena's memory file and primitives."""

    def __init__(self, fds: _Descriptors, total_bytes: int, header_bytes: int, token: int, reserved: bool) -> None:
        self.fds = fds
        self.total_bytes = total_bytes
        self.header_bytes = header_bytes
        self.token = token
        self.reserved = reserved
        self.lock = ProcessLock(fds.memory_fd)
        self.wakeup = Wakeup(fds.read_fd, fds.write_fd)
        self._mapping: Any = None
        self._header: np.ndarray | None = None
        self._words: memoryview | None = None
        self._cache: dict[str, tuple[np.ndarray, Any]] = {}
        self._locked: _Locked | None = None

    @classmethod
    def create(
        cls, kind: int, data_bytes: int, header_slots: int, what: str, *, reserve_data: bool = True
    ) -> "ArenaFile":
        """A new arena: a header of ``header_slots`` words plus ``data_bytes``.

        With ``reserve_data`` off only the header is reserved: the data region
        is virtual, committed range by range by the backend.
        """
        header_bytes = align_up(header_slots * 8, PAGE_SIZE)
        total = header_bytes + data_bytes
        memory_fd = create_memory_file(total, what, reserve=None if reserve_data else header_bytes)
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        token = secrets.randbits(62) + 1
        file = cls(_Descriptors(memory_fd, read_fd, write_fd), total, header_bytes, token, reserve_data)
        header = file.header
        header[H_MAGIC], header[H_KIND], header[H_TOKEN] = MAGIC, kind, token
        return file

    def spec(self, kind: int, params: dict[str, Any]) -> ArenaSpec:
        """What to pickle to open this arena elsewhere."""
        fds = self.fds
        return ArenaSpec(
            kind, self.token, self.total_bytes, self.header_bytes, self.reserved, dict(params),
            share_fd(fds.memory_fd), share_fd(fds.read_fd), share_fd(fds.write_fd),
        )

    @classmethod
    def attach(cls, spec: ArenaSpec, expected_kind: int) -> "ArenaFile":
        """Open the arena ``spec`` describes, after checking that its file holds
        an arena of ``expected_kind`` with the spec's token."""
        fds = _Descriptors(detach_fd(spec.memory_fd), detach_fd(spec.read_fd), detach_fd(spec.write_fd))
        want = KIND_NAMES.get(expected_kind, f"kind {expected_kind}")
        try:
            magic, kind, token = np.frombuffer(os.pread(fds.memory_fd, 24, 0), dtype=np.int64).tolist()
        except (OSError, ValueError) as exc:
            raise ValueError(f"torch_arena: cannot read the header of the {want} being unpickled: {exc}") from None
        if magic != MAGIC:
            raise ValueError(
                f"torch_arena: the file of the {want} being unpickled is not a torch_arena arena of this "
                "version (bad magic): the pickled handle does not come from this torch_arena"
            )
        if kind != expected_kind or spec.kind != expected_kind:
            raise ValueError(
                f"torch_arena: the pickled handle is a {want}, but its file holds a "
                f"{KIND_NAMES.get(kind, f'kind {kind}')}: unpickle it as that class"
            )
        if token != spec.token:
            raise ValueError("torch_arena: the pickled arena handle does not match its file (token differs)")
        return cls(fds, spec.total_bytes, spec.header_bytes, spec.token, spec.reserved)

    # -- per-process mapping ---------------------------------------------------
    @property
    def mapping(self) -> Any:
        """This process's mapping of the whole file (made on first use)."""
        if self._mapping is None:
            self._mapping = map_memory_file(self.fds.memory_fd, self.total_bytes, populate=self.reserved)
        return self._mapping

    @property
    def header(self) -> np.ndarray:
        """The ``int64`` header, shared by every process."""
        if self._header is None:
            self._header = np.frombuffer(self.mapping.mmap, dtype=np.int64, count=self.header_bytes // 8)
        return self._header

    @property
    def words(self) -> memoryview:
        """The same header as ``int64`` words of a memoryview: indexing gives
        Python ints, about three times cheaper than numpy scalars, which counts
        on the paths every unit takes (tables scan with :attr:`header`)."""
        if self._words is None:
            self._words = memoryview(self.mapping.mmap)[: self.header_bytes].cast("q")
        return self._words

    def cached(self, name: str, make: Callable[["ArenaFile"], Any]) -> Any:
        """``make(self)`` once per process: column views of the header's tables
        (building them is a measurable part of a unit's cost)."""
        entry = self._cache.get(name)
        header = self.header
        if entry is None or entry[0] is not header:
            entry = self._cache[name] = (header, make(self))
        return entry[1]

    @property
    def data_address(self) -> int:
        """Address of the data region in this process."""
        return self.mapping.address + self.header_bytes

    def data_view(self, offset: int, nbytes: int) -> np.ndarray:
        """Plain ``uint8`` view of the data region (lifetime tied to the mapping)."""
        start = self.header_bytes + offset
        return self.mapping.array[start : start + nbytes]

    def anchored_view(self, offset: int, nbytes: int) -> np.ndarray:
        """``uint8`` view of the data region that every derived view keeps alive."""
        return self.mapping.anchored_view(self.header_bytes + offset, nbytes)

    def give_back(self, offset: int, nbytes: int) -> None:
        """Return a page-aligned range of the data region to the kernel."""
        self.mapping.release(self.header_bytes + offset, nbytes)

    # -- locking, usage and shutdown --------------------------------------------
    def locked(self) -> "_Locked":
        """``with file.locked() as header:`` holds the arena lock (see NOTE [
        Arena units, leases, locks and fork ] in :mod:`.protocol`)."""
        locked = self._locked
        if locked is None:
            locked = self._locked = _Locked(self)
        return locked

    def notify_waiters(self) -> None:
        """Wake producers waiting for space, if any (read without the lock: a
        missed one re-checks within a slice)."""
        if self.words[H_WAITERS] > 0:
            self.wakeup.notify()

    @property
    def shut_down(self) -> bool:
        """Whether :meth:`shutdown` was called in any process."""
        return bool(self.header[H_SHUTDOWN])

    def shutdown(self) -> None:
        """Make every waiting producer give up now, in every process."""
        self.header[H_SHUTDOWN] = 1
        for _ in range(64):
            self.wakeup.notify()
