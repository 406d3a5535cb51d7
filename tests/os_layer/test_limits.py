"""Memory limits of nested cgroups: the default arena budget and the doctor see them.

The first half parses fake ``/proc/self/cgroup`` and ``mountinfo`` texts and
reads fake cgroup trees under ``tmp_path`` (cgroup v2 is only tested that way
where the machine's v2 hierarchy has no memory controller, as on a hybrid
host). The second half makes real nested cgroups on every mounted hierarchy
that has a usable memory controller, starts a Python process inside, and
checks what it and ``python -m torch_arena doctor`` report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cgroup_helpers import HIERARCHIES, IN_CGROUP, LIMIT_FILE, NO_HIERARCHY, NestedCgroups

import torch_arena._os.limits as limits_module
from torch_arena._os.cgroups import (
    V1_UNLIMITED,
    CgroupMount,
    MemoryLimit,
    locate,
    memory_limits,
    parse_mountinfo,
    parse_proc_cgroup,
    read_hierarchy,
)
from torch_arena._os.limits import available_memory, tightest_limit
from torch_arena._os.sizes import format_bytes

REPO = Path(__file__).resolve().parents[2]
MiB, GiB = 1 << 20, 1 << 30
V1_MAX_TEXT = "9223372036854771712"  # what the kernel shows for an unlimited v1 cgroup

HYBRID_CGROUP = """\
9:name=systemd:/
4:memory:/slurm/uid_1000/job_42
2:cpuacct,cpu:/slurm/uid_1000/job_42
0::/
"""
HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:12 - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PURE_V2_MOUNTINFO = "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"


# -- parsing ------------------------------------------------------------------


def test_proc_cgroup_hybrid_and_pure_v2():
    assert parse_proc_cgroup(HYBRID_CGROUP) == {1: "/slurm/uid_1000/job_42", 2: "/"}
    assert parse_proc_cgroup("0::/system.slice/job.scope\n") == {2: "/system.slice/job.scope"}
    assert parse_proc_cgroup("7:blkio,memory:/a:b\n0::/gone (deleted)\nbad line\n") == {1: "/a:b", 2: "/gone"}
    assert parse_proc_cgroup("") == {}


def test_mountinfo_keeps_memory_hierarchies_only():
    assert parse_mountinfo(HYBRID_MOUNTINFO) == [
        CgroupMount(1, "/sys/fs/cgroup/memory", "/"),
        CgroupMount(2, "/sys/fs/cgroup/unified", "/"),
    ]
    assert parse_mountinfo(PURE_V2_MOUNTINFO) == [CgroupMount(2, "/sys/fs/cgroup", "/")]


def test_mountinfo_namespace_root_and_escapes():
    """A container's mount shows the cgroup it was made from as its root; a
    space in a path is written ``\\040``."""
    text = (
        "1 0 0:1 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n"
        "2 0 0:2 /kubepods/pod\\0401 /mnt/my\\040cg rw master:3 - cgroup2 cgroup2 rw\n"
        "3 0 0:3 / /weird - cgroup\n"  # no super options: not a memory hierarchy
    )
    assert parse_mountinfo(text) == [
        CgroupMount(1, "/sys/fs/cgroup/memory", "/docker/abc"),
        CgroupMount(2, "/mnt/my cg", "/kubepods/pod 1"),
    ]


def test_locate_maps_the_path_below_the_mount_root(tmp_path):
    (tmp_path / "full" / "kubepods" / "pod1" / "c").mkdir(parents=True)
    (tmp_path / "bind" / "c").mkdir(parents=True)
    full = CgroupMount(2, str(tmp_path / "full"), "/")
    bind = CgroupMount(2, str(tmp_path / "bind"), "/kubepods/pod1")
    ns_root = CgroupMount(2, str(tmp_path / "bind" / "c"), "/kubepods/pod1/c")
    assert locate("/kubepods/pod1/c", [bind, full], 2) == (full, ["kubepods", "pod1", "c"])  # most ancestors
    assert locate("/kubepods/pod1/c", [bind], 2) == (bind, ["c"])
    assert locate("/kubepods/pod1/c", [ns_root], 2) == (ns_root, [])  # no cgroup namespace: root == path
    assert locate("/kubepods/pod1/c", [bind], 1) is None  # wrong version
    assert locate("/other/pod", [bind], 2) is None  # not under the mount's root
    assert locate("/../../x", [full], 2) is None  # outside this cgroup namespace
    assert locate("/kubepods/missing", [full], 2) is None  # no such directory


# -- reading fake trees -----------------------------------------------------------


def _write(directory: Path, **files: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text + "\n")


def test_v1_tree_every_ancestor_and_unlimited_values(tmp_path):
    root = tmp_path / "memory"
    _write(root, memory_limit_in_bytes=V1_MAX_TEXT, memory_usage_in_bytes="999")
    _write(root / "slurm", memory_limit_in_bytes=str(V1_UNLIMITED))
    _write(root / "slurm" / "job", memory_limit_in_bytes=str(GiB), memory_usage_in_bytes=str(300 * MiB),
           memory_stat=f"cache 1\ninactive_file 7\ntotal_inactive_file {100 * MiB}")
    found = read_hierarchy(CgroupMount(1, str(root)), ["slurm", "job"])
    assert [(lim.cgroup, lim.limit) for lim in found] == [("/slurm/job", GiB), ("/slurm", None), ("/", None)]
    job = found[0]
    assert (job.usage, job.reclaimable, job.used, job.headroom) == (300 * MiB, 100 * MiB, 200 * MiB, 824 * MiB)
    assert job.file == str(root / "slurm" / "job" / "memory.limit_in_bytes")
    assert job.describe() == "cgroup v1 memory.limit_in_bytes of /slurm/job (1.0 GiB, 200.0 MiB used)"
    assert tightest_limit(found) is job and tightest_limit(found[1:]) is None


def test_v2_tree_max_and_high_ancestor_is_tightest(tmp_path):
    """A pure v2 host: the job's parent has the tighter ``memory.max``, the job a
    ``memory.high`` below it; the root has no memory files at all."""
    root = tmp_path / "cgroup"
    _write(root, cgroup_controllers="cpu memory")
    _write(root / "user.slice", memory_max=str(GiB), memory_high="max", memory_current=str(900 * MiB),
           memory_stat="anon 5\ninactive_file 0\n")
    _write(root / "user.slice" / "job.scope", memory_max="max", memory_high=str(768 * MiB),
           memory_current=str(600 * MiB))
    found = read_hierarchy(CgroupMount(2, str(root)), ["user.slice", "job.scope"])
    assert [(lim.cgroup, lim.name, lim.headroom) for lim in found] == [
        ("/user.slice/job.scope", "memory.max", None),
        ("/user.slice/job.scope", "memory.high", 168 * MiB),
        ("/user.slice", "memory.max", 124 * MiB),
        ("/user.slice", "memory.high", None),
    ]
    assert tightest_limit(found).describe() == "cgroup v2 memory.max of /user.slice (1.0 GiB, 900.0 MiB used)"


def test_unreadable_files_are_skipped_or_bound_by_the_limit(tmp_path):
    _write(tmp_path, memory_max="garbage", memory_high=str(64 * MiB))  # no memory.current
    (lim,) = read_hierarchy(CgroupMount(2, str(tmp_path)), [])
    assert (lim.name, lim.usage, lim.headroom) == ("memory.high", None, 64 * MiB)
    assert lim.describe().endswith("(64.0 MiB, usage unknown)")


def _fake_proc(tmp_path: Path, cgroup: str, mountinfo: str) -> str:
    proc = tmp_path / "proc"
    _write(proc, cgroup=cgroup, mountinfo=mountinfo)
    return str(proc)


def test_memory_limits_from_a_fake_proc_hybrid(tmp_path):
    v1, v2 = tmp_path / "memory", tmp_path / "unified"
    _write(v1 / "slurm" / "uid_1000" / "job_42", memory_limit_in_bytes=str(GiB), memory_usage_in_bytes="0")
    _write(v1, memory_limit_in_bytes=V1_MAX_TEXT)
    _write(v2, cgroup_controllers="hugetlb")  # the hybrid v2 hierarchy: no memory files
    mountinfo = HYBRID_MOUNTINFO.replace("/sys/fs/cgroup/memory", str(v1)).replace("/sys/fs/cgroup/unified", str(v2))
    found = memory_limits(_fake_proc(tmp_path, HYBRID_CGROUP, mountinfo), default_mounts=())
    assert [(lim.version, lim.cgroup, lim.limit) for lim in found] == [
        (1, "/slurm/uid_1000/job_42", GiB), (1, "/", None),
    ]  # the levels between have no files here: skipped, and the mount's root is read


def test_memory_limits_under_a_cgroup_namespace(tmp_path):
    """Inside a container with its own cgroup namespace the process is at ``/``
    of a mount whose root is ``/``: that level is the container's own cgroup."""
    _write(tmp_path / "cg", memory_max=str(2 * GiB), memory_current=str(GiB))
    mountinfo = PURE_V2_MOUNTINFO.replace("/sys/fs/cgroup", str(tmp_path / "cg"))
    (lim,) = memory_limits(_fake_proc(tmp_path, "0::/\n", mountinfo), default_mounts=())
    assert (lim.cgroup, lim.headroom) == ("/", GiB)


def test_memory_limits_fall_back_to_the_mount_roots(tmp_path):
    """No /proc to read, or a cgroup no mount shows: the roots of the usual
    mounts are read, as before nesting was known."""
    _write(tmp_path / "v1", memory_limit_in_bytes=str(3 * GiB), memory_usage_in_bytes=str(GiB))
    defaults = (CgroupMount(1, str(tmp_path / "v1")), CgroupMount(2, str(tmp_path / "none")))
    for proc in (str(tmp_path / "no_proc"), _fake_proc(tmp_path, "4:memory:/elsewhere\n", "")):
        (lim,) = memory_limits(proc, default_mounts=defaults)
        assert (lim.version, lim.cgroup, lim.headroom) == (1, "/", 2 * GiB)


def test_available_memory_takes_the_tightest_headroom(monkeypatch):
    job = MemoryLimit(1, "/job", "/sys/fs/cgroup/memory/job/memory.limit_in_bytes", 64 * MiB, 16 * MiB)
    monkeypatch.setattr(limits_module, "memory_limits", lambda: [MemoryLimit(1, "/", "/x", None), job])
    assert available_memory() == (48 * MiB, "cgroup v1 memory.limit_in_bytes of /job (64.0 MiB, 16.0 MiB used)")
    monkeypatch.setattr(limits_module, "memory_limits", lambda: [])
    assert available_memory()[1] == "MemAvailable in /proc/meminfo"
    with pytest.raises(MemoryError, match="of /job"):
        monkeypatch.setattr(limits_module, "memory_limits", lambda: [job])
        limits_module.preflight(GiB, "a test arena")


def test_a_commit_leaves_the_reserve_free_under_the_tightest_limit(monkeypatch):
    """The kernel OOM-kills rather than refuse a charge past a memory cgroup's
    limit, so a commit is refused before it is made (PROTOTYPE, issue 17)."""
    job = MemoryLimit(1, "/job", "/sys/fs/cgroup/memory/job/memory.limit_in_bytes", GiB, GiB - 100 * MiB)
    monkeypatch.setattr(limits_module, "memory_limits", lambda: [MemoryLimit(1, "/", "/x", None), job])
    assert limits_module.commit_reserve(job) == 32 * MiB  # 1/32 of the limit, at least 16 MiB
    limits_module.check_commit(68 * MiB, "a unit")
    with pytest.raises(MemoryError, match=r"not committing 69\.0 MiB .* 100\.0 MiB is left under cgroup v1 "):
        limits_module.check_commit(69 * MiB, "a unit")
    monkeypatch.setattr(limits_module, "memory_limits", lambda: [MemoryLimit(1, "/", "/x", None)])
    limits_module.check_commit(64 * GiB, "a unit")  # no limit: the kernel's own refusal stands


# -- real nested cgroups ------------------------------------------------------

#: Run in a process placed in the cgroup: what the arena's default budget sees.
PROBE = """
import json
from torch_arena._os.cgroups import parse_proc_cgroup
from torch_arena._os.limits import available_memory
try:
    from torch_arena._arena.elastic import default_max_bytes
except ImportError:  # moved by a rewrite of the arenas: half of what is available, as it was
    default_max_bytes = None
available, source = available_memory()
budget = default_max_bytes() if default_max_bytes else available // 2
with open("/proc/self/cgroup") as f:
    placed = parse_proc_cgroup(f.read())
print(json.dumps({"available": available, "source": source, "budget": budget,
                  "budget_from": "default_max_bytes" if default_max_bytes else "available // 2",
                  "placed": placed}))
"""


@pytest.fixture(params=HIERARCHIES or [None], ids=lambda m: f"v{m.version}" if m else "none")
def cgroups(request):
    """Nested memory cgroups on each usable hierarchy, removed even when the test fails."""
    if request.param is None:
        pytest.skip(NO_HIERARCHY)
    made = NestedCgroups(request.param)
    try:
        yield made
    finally:
        made.remove()


def _in_cgroup(directory: Path, *argv: str) -> subprocess.CompletedProcess:
    """``python *argv`` in a process that first moves itself into ``directory``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [*IN_CGROUP, str(directory), sys.executable, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=120, check=False)


CASES = {"one level": [GiB], "child tighter": [GiB, 512 * MiB], "ancestor tighter": [512 * MiB, GiB]}


@pytest.mark.slow
@pytest.mark.parametrize("levels", list(CASES.values()), ids=list(CASES))
def test_budget_and_doctor_inside_nested_cgroups(cgroups, levels):
    """A process in the innermost cgroup gets a default budget of at most half
    the tightest limit on the way up, and the doctor names where it is set."""
    version, limit_file = cgroups.mount.version, LIMIT_FILE[cgroups.mount.version]
    dirs = cgroups.nest(levels)
    tight = min(range(len(levels)), key=lambda i: levels[i])
    tight_path, tight_file = cgroups.path_of(dirs[tight]), str(dirs[tight] / limit_file)

    probe = _in_cgroup(dirs[-1], "-c", PROBE)
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    assert seen["placed"][str(version)] == cgroups.path_of(dirs[-1])
    assert 0 < seen["available"] <= levels[tight]
    assert seen["source"].startswith(f"cgroup v{version} {limit_file} of {tight_path} ("), seen["source"]
    assert 0 < seen["budget"] <= levels[tight] // 2, seen

    report = _in_cgroup(dirs[-1], "-m", "torch_arena", "doctor", "--batch-bytes", str(MiB), "--json")
    assert report.returncode == 0, report.stdout + report.stderr
    facts, rec = json.loads(report.stdout)["facts"], json.loads(report.stdout)["recommendation"]
    assert (facts["cgroup_limit"], facts["cgroup_path"], facts["cgroup_file"]) == (levels[tight], tight_path, tight_file)
    assert facts["cgroup_source"].startswith(f"cgroup v{version} {limit_file} of {tight_path} (")
    assert facts["arena_available"] <= levels[tight] and rec["pool_default_cap"] <= levels[tight] // 2
    listed = [(lim["cgroup"], lim["limit"]) for lim in facts["cgroup_limits"] if lim["file"].endswith(limit_file)]
    assert listed[: len(levels)] == [(cgroups.path_of(d), limit) for d, limit in zip(dirs, levels)][::-1]

    plain = _in_cgroup(dirs[-1], "-m", "torch_arena", "doctor", "--batch-bytes", str(MiB))
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert f"  cgroup limit      {format_bytes(levels[tight])}: cgroup v{version} {limit_file} of {tight_path} (" \
        in plain.stdout, plain.stdout
    assert f"  cgroup file       {tight_file}\n" in plain.stdout
