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

__all__ = [
    "MemoryLimit", "available_memory", "check_commit", "commit_reserve", "memory_limits", "preflight",
    "room_for_private", "tightest_limit",
]

MEMINFO_SOURCE = "MemAvailable in /proc/meminfo"

#: What a commit must leave free under a memory cgroup limit: this share of the
#: limit, at least :data:`MIN_COMMIT_RESERVE` (room for the job's other
#: allocations meanwhile: page tables, a worker's next samples, another writer).
COMMIT_RESERVE_SHARE = 32
MIN_COMMIT_RESERVE = 16 << 20


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
    candidates, _ = _memory_figures()
    if not candidates:
        return None, "no memory figure could be read (neither /proc/meminfo nor a memory cgroup)"
    return min(candidates)


def _memory_figures() -> tuple[list[tuple[int, str]], MemoryLimit | None]:
    """Every figure of memory still available, with its source (the kernel's
    ``MemAvailable``, the tightest cgroup's headroom), and that cgroup limit."""
    candidates: list[tuple[int, str]] = []
    mem_available = _mem_available()
    if mem_available is not None:
        candidates.append((mem_available, MEMINFO_SOURCE))
    tightest = tightest_limit(memory_limits())
    if tightest is not None and tightest.headroom is not None:
        candidates.append((tightest.headroom, tightest.describe()))
    return candidates, tightest


def preflight(nbytes: int, what: str) -> None:
    """Raise :class:`MemoryError` if ``nbytes`` clearly cannot be reserved now."""
    available, source = available_memory()
    if available is not None and nbytes > available:
        raise MemoryError(
            f"torch_arena: cannot reserve {format_bytes(nbytes)} of shared memory for "
            f"{what}: only {format_bytes(available)} is available ({source}). "
            "Make the arena smaller (segment_size × count, capacity, or arena_budget)."
        )


def commit_reserve(limit: MemoryLimit) -> int:
    """Bytes a commit leaves free under ``limit`` (see :data:`COMMIT_RESERVE_SHARE`)."""
    return max(MIN_COMMIT_RESERVE, (limit.limit or 0) // COMMIT_RESERVE_SHARE)


def check_commit(nbytes: int, what: str) -> None:
    """Raise :class:`MemoryError` if committing ``nbytes`` now would leave less
    than :func:`commit_reserve` under the tightest memory cgroup limit.

    Checked *before* the commit because the kernel does not refuse it: a
    ``posix_fallocate`` of shared memory past a memory cgroup's limit does not
    fail with ENOMEM, the OOM killer kills the cgroup's largest process (often
    the training process, which maps every batch) and the fallocate goes on.
    """
    tightest = tightest_limit(memory_limits())
    if tightest is None or tightest.headroom is None:
        return
    reserve = commit_reserve(tightest)
    if nbytes + reserve > tightest.headroom:
        raise MemoryError(
            f"torch_arena: not committing {format_bytes(nbytes)} of shared memory for {what}: only "
            f"{format_bytes(tightest.headroom)} is left under {tightest.describe()}, and "
            f"{format_bytes(reserve)} stays free for the job's other needs (past a memory cgroup's "
            "limit the kernel kills the largest process instead of refusing memory). "
            "Make the arena smaller (arena_budget), or keep fewer batches alive."
        )


def room_for_private(fresh_bytes: int, batch_bytes: int, held_bytes: int, committed: int, cap: int | None) -> bool:
    """Whether a copy-out restore may take ``fresh_bytes`` of new private
    memory, for a batch of ``batch_bytes``, where the process already keeps
    ``held_bytes`` of such copies and the arena holds ``committed`` bytes of
    shared memory and may hold ``cap`` (None: a fixed arena).

    The copy must leave room for what the arena may still commit, the commit
    reserve and three batches (the workers build their next batches
    meanwhile, and the loop holds one). Inside a memory cgroup the copies and
    the arena's shared memory also share the arena's cap, as a pool's batches
    do: there a copy-out ring holding each batch twice is an OOM kill that
    torch's transport, holding it once, would not have had. Unlike a commit,
    a copy has a way out (the batch is restored zero-copy), so it is refused
    early rather than late.
    """
    candidates, tightest = _memory_figures()
    if not candidates:
        return True
    available, _ = min(candidates)
    reserve = commit_reserve(tightest) if tightest is not None else MIN_COMMIT_RESERVE
    claimed = max(0, cap - committed) if cap is not None else 0
    if fresh_bytes + claimed + reserve + 3 * batch_bytes > available:
        return False
    return tightest is None or cap is None or held_bytes + fresh_bytes + committed <= cap
