"""How much memory an arena may take here: the kernel's and the memory cgroup's figures.

:func:`available_memory` is what the default arena budget and the doctor read;
:func:`preflight` refuses a size that clearly cannot be reserved before the
kernel is even asked.
"""

from __future__ import annotations

from torch_arena._os.sizes import format_bytes

__all__ = ["available_memory", "preflight"]


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
