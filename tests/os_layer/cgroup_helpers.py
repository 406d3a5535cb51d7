"""Real memory cgroups for tests: find a writable hierarchy, make nested cgroups, remove them.

Shared by the limit tests (``test_limits.py``) and the loader jobs run under a
memory limit (``memory_jobs.py``). Making cgroups needs root and a mounted
memory controller: cgroup v1's ``memory`` hierarchy, or cgroup v2 with
``memory`` in the root's ``cgroup.subtree_control``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from torch_arena._os.cgroups import CgroupMount, locate, parse_mountinfo, parse_proc_cgroup

__all__ = ["HIERARCHIES", "IN_CGROUP", "LIMIT_FILE", "NO_HIERARCHY", "NestedCgroups"]

#: The file each version's limit is written to.
LIMIT_FILE = {1: "memory.limit_in_bytes", 2: "memory.max"}


def _usable_hierarchies() -> list[CgroupMount]:
    """One mounted hierarchy per version where a test can make memory cgroups:
    v1 with the ``memory`` controller, v2 with ``memory`` in the root's
    ``cgroup.subtree_control`` (so new cgroups get ``memory.max``), writable."""
    try:
        mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    except OSError:
        return []
    usable: dict[int, CgroupMount] = {}
    for mount in mounts:
        if mount.version == 2:
            try:
                if "memory" not in (Path(mount.mount_point) / "cgroup.subtree_control").read_text().split():
                    continue
            except OSError:
                continue
        if os.access(mount.mount_point, os.W_OK):
            usable.setdefault(mount.version, mount)
    return list(usable.values())


HIERARCHIES = _usable_hierarchies()


class NestedCgroups:
    """Makes chains of nested memory cgroups on ``mount`` and removes them all.

    Top-level cgroups are named ``<prefix>_<pid>_<n>``."""

    def __init__(self, mount: CgroupMount, prefix: str = "torch_arena_test") -> None:
        self.mount, self.made, self.count, self.prefix = mount, [], 0, prefix

    def path_of(self, directory: Path) -> str:
        """The cgroup's path as ``/proc/self/cgroup`` names it."""
        return os.path.join(self.mount.root, str(directory.relative_to(self.mount.mount_point)))

    def nest(self, limits: list[int | None]) -> list[Path]:
        """``<prefix>_<pid>_<n>/child/child...``, one level per limit
        (None: no limit set), outermost first."""
        self.count += 1
        directory = Path(self.mount.mount_point) / f"{self.prefix}_{os.getpid()}_{self.count}"
        dirs: list[Path] = []
        for limit in limits:
            if dirs and self.mount.version == 2:
                (dirs[-1] / "cgroup.subtree_control").write_text("+memory")
            directory = dirs[-1] / "child" if dirs else directory
            try:
                directory.mkdir()
            except OSError as exc:
                pytest.skip(f"cannot make a memory cgroup under {self.mount.mount_point} ({exc}): run as root")
            self.made.append(directory)
            dirs.append(directory)
            if limit is not None:
                (directory / LIMIT_FILE[self.mount.version]).write_text(str(limit))
        return dirs

    def remove(self) -> None:
        """Move any process left inside back to this test's own cgroup, then
        remove the cgroups, children first (the kernel refuses otherwise)."""
        own = parse_proc_cgroup(Path("/proc/self/cgroup").read_text()).get(self.mount.version, "/")
        where = locate(own, [self.mount], self.mount.version)
        home = Path(self.mount.mount_point, *where[1]) if where else Path(self.mount.mount_point)
        for directory in reversed(self.made):
            deadline = time.monotonic() + 10
            while directory.exists():
                for pid in (directory / "cgroup.procs").read_text().split():
                    try:
                        (home / "cgroup.procs").write_text(pid)
                    except OSError:  # it exited meanwhile
                        pass
                try:
                    directory.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)


#: Why a test that needs a memory cgroup cannot run here.
NO_HIERARCHY = (
    "no writable cgroup hierarchy with a memory controller is mounted (v1 memory, or v2 "
    "with memory in cgroup.subtree_control): run as root on a host with one"
)

#: ``[*IN_CGROUP, directory, program, *args]`` runs the program as a process that
#: first moves itself into the cgroup ``directory`` (its pid is the program's).
IN_CGROUP = ("sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"')
