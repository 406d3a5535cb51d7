"""How much memory an arena may take here: the kernel's and the memory cgroups' figures.

:func:`available_memory` is what the default arena budget and the doctor read;
:func:`preflight` refuses a size that clearly cannot be reserved before the
kernel is even asked. The cgroup figures come from :mod:`torch_arena._os.cgroups`,
which reads the process's own cgroup and every ancestor (a cluster job's limit
is set on a nested cgroup, not on the root of the mount).
"""

from __future__ import annotations

from torch_arena._os.cgroups import MemoryLimit, memory_limits
from torch_arena._os.sizes import format_bytes

__all__ = ["MemoryLimit", "available_memory", "memory_limits", "preflight", "tightest_limit"]

MEMINFO_SOURCE = "MemAvailable in /proc/meminfo"


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def tightest_limit(limits: list[MemoryLimit]) -> MemoryLimit | None:
    """The limit with the least headroom (the one an arena would hit first),
    or None where every level is unlimited."""
    bounded = [lim for lim in limits if lim.headroom is not None]
    return min(bounded, key=lambda lim: lim.headroom or 0) if bounded else None


def available_memory() -> tuple[int | None, str]:
    """How much memory a new arena can still take, and where the figure came from.

    The smaller of the kernel's ``MemAvailable`` and the least headroom under
    any memory cgroup limit on this process (its own cgroup or an ancestor;
    see :func:`memory_limits`). The source names the file and the cgroup, e.g.
    ``"cgroup v1 memory.limit_in_bytes of /job (1.0 GiB, 312.0 MiB used)"``.
    Returns ``(None, reason)`` where neither can be read.
    """
    candidates: list[tuple[int, str]] = []
    mem_available = _mem_available()
    if mem_available is not None:
        candidates.append((mem_available, MEMINFO_SOURCE))
    tightest = tightest_limit(memory_limits())
    if tightest is not None and tightest.headroom is not None:
        candidates.append((tightest.headroom, tightest.describe()))
    if not candidates:
        return None, "no memory figure could be read (neither /proc/meminfo nor a memory cgroup)"
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
