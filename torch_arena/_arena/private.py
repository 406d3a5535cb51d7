"""Recycled private memory for copy-out restores.

A copy-out restore (the ring's semantics: nothing in the training process
points into shared memory) costs what the destination costs. Freshly
allocated memory faults in page by page as the copy first touches it: for
32 MiB about four times a copy into memory touched before. So the training
process keeps the buffers of restored batches that died and copies the next
batch into one of them: a restore costs one warm copy.

Each buffer is a private anonymous mapping (``MAP_PRIVATE``, not shared with
any other process, not even a fork child after the fork). A restored object
is a view of an *anchor*: a ``uint8`` array made straight from the mapping,
which every view derived from it (slices, reshapes, ``torch.from_numpy``,
memoryviews) keeps alive. The buffer is handed out again only once its
anchor is dead; the weak reference's callback is ``deque.append``, a single
C call. Free buffers above what the working-set rule keeps
(:mod:`torch_arena._arena.working_set`) are unmapped, so a loader that once
saw big batches does not keep their memory.
"""

from __future__ import annotations

import collections
import mmap
import threading
import time
import weakref
from collections.abc import Callable

import numpy as np

from torch_arena._arena.working_set import CELLS, WorkingSet
from torch_arena._os.limits import room_for_private
from torch_arena._os.memory import PAGE_SIZE
from torch_arena._os.sync import current_pid

__all__ = ["PrivateBuffers", "process_buffers", "size_class"]

_CHECK_EVERY = 4 << 20  # fresh bytes asked for between two reads of the memory limit
_RECHECK_S = 0.1  # the most time between two reads while free buffers serve


def size_class(nbytes: int) -> int:
    """``nbytes`` rounded up to a page, then to a step of a quarter of its power
    of two (at most 25 % larger), so buffers of similar sizes are reused."""
    pages = -(-max(nbytes, 1) // PAGE_SIZE)
    step = max(1, (1 << max(0, pages.bit_length() - 1)) // 4)
    return -(-pages // step) * step * PAGE_SIZE


class PrivateBuffers:
    """One process's cache of private buffers for copy-out restores."""

    def __init__(self) -> None:
        self.pid = current_pid()
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []
        self._busy: dict[int, tuple[weakref.ref, mmap.mmap]] = {}
        self._returned: collections.deque[weakref.ref] = collections.deque()
        self._busy_bytes = 0
        self._free_bytes = 0
        self._working_set = WorkingSet([0] * CELLS)
        self._unchecked = 0  # fresh bytes asked for since the limit was last read
        self._checked_at = 0.0
        self.fresh = 0
        """Buffers mapped anew (each costs first-touch page faults)."""
        self.reused = 0
        """Buffers handed out again (each costs one warm copy)."""

    def copy_of(self, src: np.ndarray) -> np.ndarray:
        """A private ``uint8`` copy of ``src`` in a recycled buffer."""
        dst = self.take(src.nbytes)
        np.copyto(dst, src)
        return dst

    def has_room(self, nbytes: int, arena_memory: Callable[[], tuple[int, int | None]]) -> bool:
        """Whether a copy-out restore of ``nbytes`` fits in memory beside the
        arena's, ``arena_memory()`` being its committed bytes and its cap
        (:func:`~torch_arena._os.limits.room_for_private`). The limit is read
        when fresh memory is asked for (once per few MiB of small batches),
        and at most every :data:`_RECHECK_S` when free buffers serve: memory
        may have run short since, and then the free buffers go back too."""
        now = time.monotonic()
        with self._lock:
            self._collect()
            fresh = nbytes - self._free_bytes
            if fresh > 0:
                self._unchecked += fresh
                due = self._unchecked >= _CHECK_EVERY
            else:
                due = now - self._checked_at >= _RECHECK_S
            if not due:
                return True
            self._unchecked, self._checked_at = 0, now
            held = self._busy_bytes + self._free_bytes
        if room_for_private(max(fresh, 0), nbytes, held, *arena_memory()):
            return True
        with self._lock:  # memory is short: free buffers kept for reuse go back too
            self._trim(keep=0)
        return False

    def take(self, nbytes: int) -> np.ndarray:
        """A writable ``uint8`` array of ``nbytes`` that nobody else holds."""
        with self._lock:
            self._collect()
            buf = self._best_fit(nbytes)
            if buf is None:
                buf = mmap.mmap(-1, size_class(nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                if hasattr(mmap, "MADV_HUGEPAGE"):
                    try:
                        buf.madvise(mmap.MADV_HUGEPAGE)
                    except OSError:
                        pass
                self.fresh += 1
            else:
                self.reused += 1
            anchor = np.frombuffer(buf, dtype=np.uint8, count=nbytes)
            ref = weakref.ref(anchor, self._returned.append)
            self._busy[id(ref)] = (ref, buf)
            self._busy_bytes += len(buf)
            self._working_set.observe(self._busy_bytes)
            self._working_set.tick(self._busy_bytes)
        return anchor

    def _best_fit(self, nbytes: int) -> mmap.mmap | None:
        want = size_class(nbytes)
        best = -1
        for i, buf in enumerate(self._free):
            size = len(buf)
            if want <= size <= 2 * want and (best < 0 or size < len(self._free[best])):
                best = i
        if best < 0:
            return None
        buf = self._free.pop(best)
        self._free_bytes -= len(buf)
        return buf

    def _collect(self) -> None:
        """Buffers whose anchors died become free (lock held)."""
        while self._returned:
            ref = self._returned.popleft()
            entry = self._busy.pop(id(ref), None)
            if entry is not None and entry[0] is ref:
                buf = entry[1]
                self._busy_bytes -= len(buf)
                self._free.append(buf)
                self._free_bytes += len(buf)
        self._trim()

    def _trim(self, keep: int | None = None) -> None:
        if keep is None:
            keep = self._working_set.keep()
        if self._busy_bytes + self._free_bytes <= keep:
            return
        self._free.sort(key=len)
        while self._free and self._busy_bytes + self._free_bytes > keep:
            buf = self._free.pop()  # the largest first
            self._free_bytes -= len(buf)
            try:
                buf.close()
            except BufferError:  # pragma: no cover - an export outlived its anchor
                pass

    def note_epoch(self) -> None:
        """An epoch boundary: buffers sized for earlier epochs may go."""
        with self._lock:
            self._working_set.roll(self._busy_bytes)
            self._collect()

    def stats(self) -> dict[str, int]:
        """Bytes of buffers in use and kept free, and how many were fresh or reused."""
        with self._lock:
            self._collect()
            return {"busy_bytes": self._busy_bytes, "free_bytes": self._free_bytes,
                    "fresh": self.fresh, "reused": self.reused}


_buffers: PrivateBuffers | None = None


def process_buffers() -> PrivateBuffers:
    """This process's buffer cache (a fork child starts with an empty one)."""
    global _buffers
    if _buffers is None or _buffers.pid != current_pid():
        _buffers = PrivateBuffers()
    return _buffers
