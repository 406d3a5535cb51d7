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

Memory is reserved with ``posix_fallocate`` before anything is written into
it, so running out of memory is a clear :class:`MemoryError`, never a SIGBUS in
the middle of an epoch: the fixed backends reserve their whole size when they
are made (:func:`create_memory_file`); the elastic pool makes a file with a
large *virtual* size, which costs nothing until written, and reserves each
range when it first hands it out (:func:`commit_range`), giving ranges back to
the kernel when they are no longer needed (:meth:`MemoryMapping.release`).
:func:`preflight` refuses sizes that cannot fit before the kernel is even asked.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
from multiprocessing import reduction

import numpy as np

__all__ = [
    "available_memory",
    "commit_range",
    "committed_bytes",
    "create_memory_file",
    "format_bytes",
    "map_memory_file",
    "parse_bytes",
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


_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(value: object, name: str) -> int:
    """A positive byte count from an int, an integral float (``1.5e9``) or a
    string with an optional unit (``"4GiB"``, ``"512 MB"``, ``"1.5e9"``).

    Decimal units (kB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB,
    GiB, TiB, and the bare K, M, G, T) powers of 1024. Raises ValueError
    naming ``name`` and the accepted forms.
    """
    number: float | int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float):
        number = value if value.is_integer() else None
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match.group(2).lower() in _UNITS:
            scaled = float(match.group(1)) * _UNITS[match.group(2).lower()]
            number = scaled if scaled.is_integer() else None
    if number is None or not number > 0 or number >= 1 << 62:
        raise ValueError(
            f"{name} must be a positive number of bytes: an int, an integral float such as "
            f"1.5e9, or a string such as '4GiB' or '512MB'; got {value!r}"
        )
    return int(number)


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


def create_memory_file(nbytes: int, what: str, *, reserve: int | None = None) -> int:
    """Create an anonymous memory file of ``nbytes``; return its fd.

    The first ``reserve`` bytes (default: all of them) are reserved at once;
    the rest is virtual until :func:`commit_range`. Raises
    :class:`MemoryError` naming the size and what is available when the
    memory cannot be reserved.
    """
    if nbytes <= 0:
        raise ValueError(f"torch_arena: {what} needs a positive size, got {nbytes}")
    reserve = nbytes if reserve is None else reserve
    preflight(reserve, what)
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("torch_arena", os.MFD_CLOEXEC)
    else:  # pragma: no cover - non-Linux fallback
        import _posixshmem

        name = f"/torch_arena-{secrets.token_hex(12)}"
        fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        _posixshmem.shm_unlink(name)
    try:
        try:
            os.ftruncate(fd, nbytes)
        except OSError as exc:
            raise _reserve_error(nbytes, what, exc) from exc
        commit_range(fd, 0, reserve, what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _reserve_error(nbytes: int, what: str, exc: OSError) -> MemoryError:
    available, source = available_memory()
    have = "unknown" if available is None else format_bytes(available)
    return MemoryError(
        f"torch_arena: could not reserve {format_bytes(nbytes)} of shared memory for "
        f"{what} ({exc.strerror}); {have} available ({source}). "
        "Make the arena smaller (segment_size × count, capacity, or arena_budget)."
    )


def commit_range(fd: int, offset: int, nbytes: int, what: str) -> None:
    """Reserve ``nbytes`` at ``offset`` of the memory file (pages allocated now).

    Raises :class:`MemoryError` naming the sizes when the kernel refuses, so
    a later write into the range can never SIGBUS.
    """
    if nbytes <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, offset, nbytes)
    except OSError as exc:
        raise _reserve_error(nbytes, what, exc) from exc


def committed_bytes(fd: int) -> int:
    """Bytes of memory the file holds right now (what the kernel has allocated)."""
    return os.fstat(fd).st_blocks * 512


class MemoryMapping:
    """One process's mapping of a memory file, pre-faulted unless ``populate`` is off.

    ``array`` is a flat ``uint8`` view over the whole file; ``address`` is where
    it starts in this process. Dropping the object unmaps the memory once no
    view into it is left (numpy and torch views keep the mapping exported).
    A mapping of a mostly virtual file (the elastic pool) is not populated,
    and asks for transparent huge pages where the kernel offers them for
    shared memory (harmless where it does not).
    """

    def __init__(self, fd: int, nbytes: int, *, populate: bool = True) -> None:
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        self.mmap = mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        if not populate and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self.mmap.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
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


    def release(self, offset: int, nbytes: int) -> None:
        """Give the pages of a page-aligned range back to the kernel, in every process.

        The range reads as zeros afterwards and commits nothing until written
        (or :func:`commit_range`) again.
        """
        self.mmap.madvise(mmap.MADV_REMOVE, offset, nbytes)


def map_memory_file(fd: int, nbytes: int, *, populate: bool = True) -> MemoryMapping:
    """Map ``nbytes`` of the memory file ``fd`` read-write into this process."""
    return MemoryMapping(fd, nbytes, populate=populate)


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
