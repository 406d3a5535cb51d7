"""The memory limits on this process's cgroup and on every ancestor of it.

A cluster job runs in a nested cgroup (SLURM's ``.../slurm/uid_N/job_M``, a
``systemd-run`` scope, a Kubernetes pod's path), and its limit is set there or
on any cgroup above it, not at the root of the cgroup mount. Reading only the
root's file misses it, and an arena sized from ``MemAvailable`` then gets the
job killed by the OOM killer. So this module finds the process's own cgroup
(``/proc/self/cgroup``), maps it onto the mounted hierarchy
(``/proc/self/mountinfo``), and reads each level from there up to the mount.

Decisions, so that callers need not repeat them:

* cgroup v1: ``memory.limit_in_bytes``; a value of 2**60 or more (the kernel
  writes ``LONG_MAX`` rounded down to a page) means unlimited. v1's
  ``memory.soft_limit_in_bytes`` is ignored: it only steers reclaim.
* cgroup v2: ``memory.max`` (``max`` means unlimited) and ``memory.high`` too.
  Above ``memory.high`` the kernel does not kill but throttles the cgroup in
  reclaim, and an arena's pages are shared memory that cannot be reclaimed
  without swap: the job would stall, so ``memory.high`` counts as a limit.
* Usage is ``memory.usage_in_bytes`` (v1) or ``memory.current`` (v2), less the
  inactive page cache (``total_inactive_file`` / ``inactive_file`` in
  ``memory.stat``), which the kernel drops before it fails a charge. That is
  the "working set" the Kubernetes kubelet evicts on; without it a job that
  reads its dataset through the page cache would look full.
* Levels above the mount's root (outside a cgroup namespace, or above a bind
  mount) cannot be read and are not guessed at.

The functions take the paths they read (the ``/proc`` directory, the mounts),
so the parsing can be tested on a fake tree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Sequence

from torch_arena._os.sizes import format_bytes

__all__ = [
    "DEFAULT_MOUNTS",
    "CgroupMount",
    "MemoryLimit",
    "locate",
    "memory_limits",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "read_hierarchy",
]

#: A v1 limit at or above this is the kernel's "unlimited" (LONG_MAX, page-rounded).
V1_UNLIMITED = 1 << 60

#: Per version: the limit files, the usage file and the ``memory.stat`` key of
#: the reclaimable page cache.
_FILES = {
    1: (("memory.limit_in_bytes",), "memory.usage_in_bytes", "total_inactive_file"),
    2: (("memory.max", "memory.high"), "memory.current", "inactive_file"),
}


@dataclass(frozen=True)
class CgroupMount:
    """A mounted cgroup hierarchy that can hold the memory controller.

    ``root`` is the mount's root field in ``/proc/self/mountinfo``: the cgroup
    that appears at ``mount_point``. It is ``/`` unless the mount is a bind
    mount of a sub-cgroup or was made outside this process's cgroup namespace.
    """

    version: int
    mount_point: str
    root: str = "/"


#: Where the memory files are when ``/proc/self`` says nothing usable: the
#: roots of the usual mounts (what torch_arena read before it knew of nesting).
DEFAULT_MOUNTS: tuple[CgroupMount, ...] = (
    CgroupMount(2, "/sys/fs/cgroup"),
    CgroupMount(1, "/sys/fs/cgroup/memory"),
)


@dataclass(frozen=True)
class MemoryLimit:
    """One limit file of one cgroup level, as read just now.

    ``limit`` is None when the file says unlimited; ``usage`` is None when the
    usage file could not be read (the limit alone then bounds the headroom);
    ``reclaimable`` is the inactive page cache included in ``usage``.
    """

    version: int
    cgroup: str
    file: str
    limit: int | None
    usage: int | None = None
    reclaimable: int = 0

    @property
    def name(self) -> str:
        """The limit file's name, e.g. ``memory.max``."""
        return os.path.basename(self.file)

    @property
    def used(self) -> int:
        """What counts against the limit: usage less the reclaimable page cache."""
        return max(0, (self.usage or 0) - self.reclaimable)

    @property
    def headroom(self) -> int | None:
        """Bytes that can still be charged under this limit (None: unlimited)."""
        return None if self.limit is None else max(0, self.limit - self.used)

    def describe(self) -> str:
        """E.g. ``cgroup v1 memory.limit_in_bytes of /job (1.0 GiB, 312.0 MiB used)``."""
        where = f"cgroup v{self.version} {self.name} of {self.cgroup}"
        if self.limit is None:
            return f"{where} (unlimited)"
        used = "usage unknown" if self.usage is None else f"{format_bytes(self.used)} used"
        return f"{where} ({format_bytes(self.limit)}, {used})"


def _unescape(field: str) -> str:
    """A mountinfo path with its octal escapes (``\\040`` for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_proc_cgroup(text: str) -> dict[int, str]:
    """``{1: path, 2: path}`` from ``/proc/self/cgroup``: the v1 hierarchy with
    the ``memory`` controller and the v2 (``0::``) one, whichever are listed."""
    paths: dict[int, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        path = path.removesuffix(" (deleted)")
        if hierarchy == "0" and controllers == "":
            paths[2] = path
        elif "memory" in controllers.split(","):
            paths[1] = path
    return paths


def parse_mountinfo(text: str) -> list[CgroupMount]:
    """The cgroup2 mounts and the v1 mounts holding ``memory``, in mount order."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        options = tail[2].split(",") if len(tail) > 2 else []
        if tail[0] == "cgroup2":
            version = 2
        elif tail[0] == "cgroup" and "memory" in options:
            version = 1
        else:
            continue
        mounts.append(CgroupMount(version, _unescape(fields[4]), _unescape(fields[3])))
    return mounts


def _relative(path: str, root: str) -> list[str] | None:
    """The components of cgroup ``path`` below the mount's ``root``, or None
    where the path is not under it (or climbs out of the namespace with ``..``)."""
    parts, root_parts = [p for p in path.split("/") if p], [p for p in root.split("/") if p]
    if ".." in parts or ".." in root_parts or parts[: len(root_parts)] != root_parts:
        return None
    return parts[len(root_parts):]


def locate(path: str, mounts: Sequence[CgroupMount], version: int) -> tuple[CgroupMount, list[str]] | None:
    """The mount of ``version`` under which cgroup ``path`` can be read, and the
    path's components below that mount's root; None if no mount shows it.

    Of several mounts (a bind mount besides the full one) the one with the
    shortest root wins: it shows the most ancestors.
    """
    found = []
    for mount in mounts:
        rel = _relative(path, mount.root) if mount.version == version else None
        if rel is not None and os.path.isdir(os.path.join(mount.mount_point, *rel)):
            found.append((len(mount.root.strip("/")), mount, rel))
    if not found:
        return None
    _, mount, rel = min(found, key=lambda item: item[0])
    return mount, rel


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # absent (no controller at this level), or not permitted
        return None


def _limit_value(text: str, version: int) -> tuple[bool, int | None]:
    """``(readable, limit)`` from a limit file's text; limit None = unlimited."""
    text = text.strip()
    if version == 2 and text == "max":
        return True, None
    if not text.isdigit():
        return False, None
    value = int(text)
    return True, (None if version == 1 and value >= V1_UNLIMITED else value)


def _stat_value(directory: str, key: str) -> int:
    text = _read(os.path.join(directory, "memory.stat")) or ""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def read_hierarchy(mount: CgroupMount, rel: Sequence[str]) -> list[MemoryLimit]:
    """Every readable limit file from the cgroup at ``rel`` below ``mount`` up
    to the mount's root, the cgroup itself first. Usage and page cache are
    read only where there is a limit, which keeps the common case to one read
    per level."""
    limit_files, usage_file, cache_key = _FILES[mount.version]
    out = []
    for depth in range(len(rel), -1, -1):
        directory = os.path.join(mount.mount_point, *rel[:depth])
        cgroup = "/" + "/".join([p for p in mount.root.split("/") if p] + list(rel[:depth]))
        for name in limit_files:
            path = os.path.join(directory, name)
            text = _read(path)
            readable, limit = _limit_value(text, mount.version) if text is not None else (False, None)
            if not readable:
                continue
            if limit is None:
                out.append(MemoryLimit(mount.version, cgroup, path, None))
                continue
            usage_text = (_read(os.path.join(directory, usage_file)) or "").strip()
            usage = int(usage_text) if usage_text.isdigit() else None
            cache = _stat_value(directory, cache_key) if usage is not None else 0
            out.append(MemoryLimit(mount.version, cgroup, path, limit, usage, min(cache, usage or 0)))
    return out


def memory_limits(proc: str = "/proc/self", default_mounts: Sequence[CgroupMount] = DEFAULT_MOUNTS) -> list[MemoryLimit]:
    """The memory limits on this process's cgroups, unlimited ones included:
    v1 first, then v2; within each, the process's own cgroup first, then each
    ancestor up to the mount's root.

    Where ``proc``'s ``cgroup`` or ``mountinfo`` cannot be read, or name no
    mounted hierarchy that shows this process's cgroup, the root of the
    ``default_mounts`` of that version is read instead.
    """
    paths = parse_proc_cgroup(_read(os.path.join(proc, "cgroup")) or "")
    mounts = parse_mountinfo(_read(os.path.join(proc, "mountinfo")) or "")
    out: list[MemoryLimit] = []
    for version in (1, 2):
        where = locate(paths[version], mounts, version) if version in paths else None
        if where is None:
            for mount in default_mounts:
                if mount.version == version:
                    out += read_hierarchy(mount, [])
        else:
            out += read_hierarchy(*where)
    return out
