"""Anonymous shared memory passed by file descriptor.

Every arena lives in one memory file that has no name in any file system:
``memfd_create`` on Linux, or ``shm_open`` followed at once by ``shm_unlink``
elsewhere. Three consequences follow, and they are the reason for the design:

* nothing ever appears in ``/dev/shm``, so nothing can be left behind there
  when a process is SIGKILLed: the kernel frees the memory when the last
  descriptor and the last mapping are gone;
* the memory is not bounded by the size of ``/dev/shm`` (Docker's default is
  64 MiB, where torch's own transport fails);
* the file reaches child processes as a descriptor, which works for fork,
  spawn and forkserver alike (see :func:`share_fd`).

The whole size is reserved with ``posix_fallocate`` when the arena is made, so
running out of memory is a clear :class:`MemoryError` at construction, never a
SIGBUS in the middle of an epoch. :func:`preflight` refuses sizes that cannot
fit before the kernel is even asked.
"""

from __future__ import annotations

import mmap
import os
import secrets
from multiprocessing import reduction

import numpy as np

__all__ = [
    "available_memory",
    "create_memory_file",
    "format_bytes",
    "map_memory_file",
    "preflight",
    "share_fd",
]

PAGE_SIZE = mmap.PAGESIZE


def format_bytes(n: int) -> str:
    """``n`` bytes as a short human-readable string (``'32.0 MiB'``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> tuple[int | None, str]:
    """How much memory a new arena can still take, and where the figure came from.

    The smaller of the kernel's ``MemAvailable`` and the headroom left under the
    memory cgroup's limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``).
    Returns ``(None, reason)`` where neither can be read.
    """
    candidates: list[tuple[int, str]] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    kib = int(line.split()[1])
                    candidates.append((kib * 1024, "MemAvailable in /proc/meminfo"))
                    break
    except (OSError, ValueError, IndexError):
        pass
    for limit_path, usage_path, label in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "cgroup v2 memory.max"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
            "cgroup v1 memory.limit_in_bytes",
        ),
    ):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < (1 << 60):
            candidates.append((max(0, limit - usage), label))
    if not candidates:
        return None, "no memory figure could be read"
    return min(candidates)


def preflight(nbytes: int, what: str) -> None:
    """Raise :class:`MemoryError` if ``nbytes`` clearly cannot be reserved now."""
    available, source = available_memory()
    if available is not None and nbytes > available:
        raise MemoryError(
            f"torch_arena: cannot reserve {format_bytes(nbytes)} of shared memory for "
            f"{what}: only {format_bytes(available)} is available ({source}). "
            "Make the arena smaller (segment_size × count, capacity, or arena_budget)."
        )


def create_memory_file(nbytes: int, what: str) -> int:
    """Create an anonymous memory file of ``nbytes``, fully reserved; return its fd.

    Raises :class:`MemoryError` naming the size and what is available when the
    memory cannot be reserved.
    """
    if nbytes <= 0:
        raise ValueError(f"torch_arena: {what} needs a positive size, got {nbytes}")
    preflight(nbytes, what)
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("torch_arena", os.MFD_CLOEXEC)
    else:  # pragma: no cover - non-Linux fallback
        import _posixshmem

        name = f"/torch_arena-{secrets.token_hex(12)}"
        fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        _posixshmem.shm_unlink(name)
    try:
        os.ftruncate(fd, nbytes)
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        os.close(fd)
        available, source = available_memory()
        have = "unknown" if available is None else format_bytes(available)
        raise MemoryError(
            f"torch_arena: could not reserve {format_bytes(nbytes)} of shared memory for "
            f"{what} ({exc.strerror}); {have} available ({source}). "
            "Make the arena smaller (segment_size × count, capacity, or arena_budget)."
        ) from exc
    return fd


class MemoryMapping:
    """One process's mapping of a memory file, pre-faulted.

    ``array`` is a flat ``uint8`` view over the whole file; ``address`` is where
    it starts in this process. Dropping the object unmaps the memory once no
    view into it is left (numpy and torch views keep the mapping exported).
    """

    def __init__(self, fd: int, nbytes: int) -> None:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        self.mmap = mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.nbytes = nbytes
        self.array = np.frombuffer(self.mmap, dtype=np.uint8)
        self.address = int(self.array.ctypes.data)

    def anchored_view(self, offset: int, nbytes: int) -> np.ndarray:
        """A ``uint8`` view whose own lifetime tracks every view derived from it.

        Made straight from the mmap (not sliced from :attr:`array`) so numpy does
        not collapse derived views' ``base`` past it: while any slice, reshape,
        ``torch.from_numpy`` tensor or memoryview of the result lives, the result
        lives. Segment release hangs on that.
        """
        return np.frombuffer(self.mmap, dtype=np.uint8, count=nbytes, offset=offset)


def map_memory_file(fd: int, nbytes: int) -> MemoryMapping:
    """Map ``nbytes`` of the memory file ``fd`` read-write into this process."""
    return MemoryMapping(fd, nbytes)


def share_fd(fd: int) -> object:
    """Wrap ``fd`` so pickling hands a duplicate of it to another process.

    Inside process start-up (spawn, forkserver) the descriptor rides along with
    the new process; elsewhere (a queue, a Pipe) it is fetched once over a
    Unix socket. Unpickle with :func:`detach_fd`.
    """
    return reduction.DupFd(fd)


def detach_fd(shared: object) -> int:
    """The receiving side of :func:`share_fd`: a descriptor this process owns."""
    return shared.detach()  # type: ignore[attr-defined]
