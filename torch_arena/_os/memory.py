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
import secrets
from multiprocessing import reduction

import numpy as np

from torch_arena._os.limits import available_memory, check_commit, preflight
from torch_arena._os.sizes import format_bytes

__all__ = [
    "commit_range",
    "committed_bytes",
    "create_memory_file",
    "map_memory_file",
    "share_fd",
]

PAGE_SIZE = mmap.PAGESIZE


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
    a later write into the range can never SIGBUS, and before asking it when
    the commit would run the tightest memory cgroup out of room
    (:func:`~torch_arena._os.limits.check_commit`: there the kernel would not
    refuse but OOM-kill a process).
    """
    if nbytes <= 0 or not hasattr(os, "posix_fallocate"):
        return
    check_commit(nbytes, what)
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
