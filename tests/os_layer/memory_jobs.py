"""Run a job inside a fresh memory cgroup, as a cluster job runs, and say how it ended.

:func:`run_in_memory_cgroup` makes a cgroup with a memory limit (see
``cgroup_helpers.py``), starts a Python program as a process that moves itself
in first, watches it, and removes everything it made, also when something
fails: the job's processes (waited for, then SIGKILLed by pid if they linger:
the cgroup holds only this job's processes), the cgroup, and any ``/dev/shm``
entry a job process left is reported. The :class:`JobOutcome` says:

* ``completed``, a clear Python ``error`` (its type and message), ``killed``
  (``killed_role``: ``main`` from the exit status, ``worker`` from the
  DataLoader's "DataLoader worker (pid …) exited unexpectedly / is killed by
  signal" error), or ``hung`` (the timeout ran out);
* the cgroup's OOM kills (v1 ``memory.oom_control`` / v2 ``memory.events``)
  and its peak usage (v1 ``memory.max_usage_in_bytes`` / v2 ``memory.peak``);
* what the kernel log says it killed, where ``dmesg`` can be read (pid, role,
  anonymous and shared-memory RSS);
* sampled every few milliseconds while it runs: the cgroup's usage and
  ``memory.stat`` at the sampled peak, and each process's ``/proc/<pid>/status``
  peaks (``VmRSS``, ``RssAnon``, ``RssShmem``).

:func:`loader_job` runs ``cgroup_loader_child.py`` (one DataLoader, stock or an
arena) that way. Run as a program, this module measures a table::

    python tests/os_layer/memory_jobs.py --limits 1GiB 2GiB --sizes 64 96 128 \\
        --arenas stock pool ring --repeat 2 [--json table.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(HERE) not in sys.path:  # run as a program
    sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cgroup_helpers import HIERARCHIES, IN_CGROUP, NO_HIERARCHY, NestedCgroups  # noqa: E402

from torch_arena._os.sizes import format_bytes, parse_bytes  # noqa: E402

__all__ = ["CHILD", "JobOutcome", "hierarchy", "loader_job", "run_in_memory_cgroup"]

MiB, GiB = 1 << 20, 1 << 30
CHILD = HERE / "cgroup_loader_child.py"
SHM = "/dev/shm"

#: Per cgroup version: usage file, peak file, OOM-kill counter (file, key),
#: and the ``memory.stat`` keys worth keeping (anonymous, shared memory, cache).
_FILES = {
    1: ("memory.usage_in_bytes", "memory.max_usage_in_bytes", ("memory.oom_control", "oom_kill"),
        ("rss", "shmem", "cache", "mapped_file")),
    2: ("memory.current", "memory.peak", ("memory.events", "oom_kill"), ("anon", "shmem", "file", "file_mapped")),
}
_STATUS_KEYS = ("VmRSS", "RssAnon", "RssShmem", "RssFile")
_WORKER_DIED = re.compile(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\) (?:is killed by signal: ([^.]+)|exited unexpectedly)")


def hierarchy() -> Any:
    """The hierarchy jobs run on: v1's memory controller where mounted (what
    cluster nodes of this kind use), else v2; None where neither is usable."""
    by_version = {mount.version: mount for mount in HIERARCHIES}
    return by_version.get(1) or by_version.get(2)


@dataclasses.dataclass
class JobOutcome:
    """How one job in a memory cgroup ended, and what it used."""

    limit: int
    outcome: str = "crashed"
    """``completed``, ``error``, ``killed``, ``hung`` or ``crashed`` (a failing
    exit without a Python error or a signal)."""
    killed_role: str | None = None
    """``main`` or ``worker`` when ``outcome`` is ``killed``."""
    signal: str | None = None
    error: str | None = None
    """``Type: message`` of the Python error the job reported (a worker's death
    included, as torch words it)."""
    returncode: int | None = None
    oom_kills: int = 0
    peak: int = 0
    """The cgroup's peak usage (the kernel's own high-water mark)."""
    seconds: float = 0.0
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    victims: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """The OOM kills in this cgroup the kernel log tells of: the victim, the
    process whose allocation found no room, and the kind of allocation."""
    sampled_peak: int = 0
    stat_at_peak: dict[str, int] = dataclasses.field(default_factory=dict)
    process_at_peak: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    """Each process's ``/proc/<pid>/status`` figures at the sampled peak, by role."""
    timeline: list[tuple[float, int, int, int]] = dataclasses.field(default_factory=list)
    """``(seconds, usage, shmem, anon)`` of the cgroup, a sample every 0.1 s or so."""
    process_peaks: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    """Each process's own peaks over the run, by role (``main``, ``worker <pid>``)."""
    stdout_tail: str = ""
    """The job's stdout lines that are not JSON events."""
    stderr_tail: str = ""
    lingering: list[int] = dataclasses.field(default_factory=list)
    """Job processes still alive after the job ended (killed by the harness)."""
    shm_left: list[str] = dataclasses.field(default_factory=list)
    """``/dev/shm`` entries a job process made and left behind (removed by the harness)."""

    @property
    def event(self) -> dict[str, Any]:
        """The job's last ``done`` or ``error`` event ({} if none)."""
        ends = [e for e in self.events if e.get("event") in ("done", "error")]
        return ends[-1] if ends else {}

    @property
    def start(self) -> dict[str, Any]:
        starts = [e for e in self.events if e.get("event") == "start"]
        return starts[0] if starts else {}

    @property
    def batches(self) -> int:
        return sum(1 for e in self.events if e.get("event") == "batch")

    @property
    def left_behind(self) -> list[str]:
        """What the job left: lingering processes, ``/dev/shm`` entries."""
        return [f"process {pid}" for pid in self.lingering] + [f"{SHM}/{name}" for name in self.shm_left]

    def summary(self) -> str:
        """E.g. ``killed (worker, Killed) after 8 batches, 1 OOM kill, peak 1.0 GiB``."""
        what = self.outcome
        if self.outcome == "killed":
            what += f" ({self.killed_role}, {self.signal})"
        elif self.outcome == "error":
            what += f" ({(self.error or '').splitlines()[0][:160]})"
        fallbacks = self.event.get("fallbacks")
        extra = f", {fallbacks} fallbacks" if fallbacks else ""
        return (f"{what} after {self.batches} batches{extra}, {self.oom_kills} OOM kill(s), "
                f"peak {format_bytes(self.peak)}, {self.seconds:.1f} s")


class _Sampler(threading.Thread):
    """Polls the cgroup and its processes while the job runs."""

    def __init__(self, directory: Path, version: int, roles: dict[int, str], interval: float) -> None:
        super().__init__(daemon=True, name="memory-job-sampler")
        self.directory, self.roles, self.interval = directory, roles, interval
        self.usage_file, _, _, self.stat_keys = _FILES[version]
        self.stop_event = threading.Event()
        self.peak, self.stat_at_peak = 0, {}
        self.process_at_peak: dict[int, dict[str, int]] = {}
        self.process_peaks: dict[int, dict[str, int]] = {}
        self.threads: dict[int, int] = {}
        """Thread id -> process id, for every thread seen."""
        self.timeline: list[tuple[float, int, int, int]] = []
        self.started = time.monotonic()

    def by_role(self, figures: dict[int, dict[str, int]]) -> dict[str, dict[str, int]]:
        """``figures`` keyed ``main``, ``worker <pid>`` or ``other <pid>`` (the
        roles are known once the job has said which pids its workers have)."""
        def role(pid: int) -> str:
            name = self.roles.get(pid, "other")
            return name if name == "main" else f"{name} {pid}"
        return {role(pid): values for pid, values in figures.items()}

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                usage = int((self.directory / self.usage_file).read_text())
                pids = [int(p) for p in (self.directory / "cgroup.procs").read_text().split()]
            except (OSError, ValueError):
                continue
            for pid in pids:  # the kernel log names a thread: map it to its process
                try:
                    self.threads.update((int(tid), pid) for tid in os.listdir(f"/proc/{pid}/task"))
                except OSError:
                    pass
            statuses = {pid: _status(pid) for pid in pids}
            for pid, status in statuses.items():
                peaks = self.process_peaks.setdefault(pid, {})
                for key, value in status.items():
                    peaks[key] = max(peaks.get(key, 0), value)
            now = time.monotonic() - self.started
            if usage > self.peak or not self.timeline or now - self.timeline[-1][0] >= 0.1:
                stat = _stat(self.directory, self.stat_keys)
                anon = stat.get("rss", stat.get("anon", 0))
                self.timeline.append((round(now, 2), usage, stat.get("shmem", 0), anon))
                if usage > self.peak:
                    self.peak, self.process_at_peak, self.stat_at_peak = usage, statuses, stat


def _status(pid: int) -> dict[str, int]:
    """``/proc/<pid>/status`` memory figures in bytes ({} once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in _STATUS_KEYS:
            out[key] = int(value.split()[0]) * 1024
    return out


def _stat(directory: Path, keys: tuple[str, ...]) -> dict[str, int]:
    try:
        text = (directory / "memory.stat").read_text()
    except OSError:
        return {}
    pairs = (line.split() for line in text.splitlines())
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[0] in keys}


def _counter(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


#: Call-trace frames that say what charge ran the cgroup out of memory (the
#: innermost one found names it).
_ALLOCATIONS = {
    "shmem_fallocate": "posix_fallocate of shared memory",
    "shmem_fault": "shared-memory page fault",
    "pte_alloc_one": "page table, in a page fault",
    "do_anonymous_page": "anonymous page fault",
    "do_huge_pmd_anonymous_page": "anonymous page fault (huge page)",
    "do_wp_page": "copy-on-write page fault",
}


def _kernel_ooms(cgroup: str, roles: dict[int, str], threads: dict[int, int]) -> list[dict[str, Any]]:
    """The OOM kills in ``cgroup`` from the kernel log (best effort: [] where
    ``dmesg`` cannot be read): which process ran the cgroup out of memory
    (``invoker``: the log names a thread, ``threads`` maps it to its process),
    in which kind of allocation, and whom the OOM killer killed (``pid``,
    ``role``, ``anon_rss``, ``shmem_rss``)."""
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    kills: list[dict[str, Any]] = []
    block: dict[str, Any] = {}
    for line in log.splitlines():
        if "invoked oom-killer:" in line:
            block = {"frames": []}
        elif (task := re.search(r" PID: (\d+) Comm: ", line)) and block and "invoker" not in block:
            block["invoker"] = int(task.group(1))
        elif block and (frame := re.match(r"\[[\d. ]+\]\s+(\w+)\+0x", line)):  # not "? " guesses
            block["frames"].append(frame.group(1))
        elif (found := re.search(r"oom-kill:.*oom_memcg=([^,]*),.*,pid=(\d+)", line)) and block:
            block["ours"] = found.group(1) == cgroup
        elif (killed := re.search(r"Killed process (\d+) \(.*?\).*anon-rss:(\d+)kB, .*shmem-rss:(\d+)kB", line)):
            if block.get("ours"):
                pid = int(killed.group(1))
                invoker = threads.get(block.get("invoker", 0), block.get("invoker", 0))
                kind = next((_ALLOCATIONS[f] for f in block["frames"] if f in _ALLOCATIONS), "other")
                kills.append({"pid": pid, "role": roles.get(pid, "other"), "anon_rss": int(killed.group(2)) * 1024,
                              "shmem_rss": int(killed.group(3)) * 1024, "invoker": invoker,
                              "invoker_role": roles.get(invoker, "other"), "allocation": kind})
            block = {}
    return kills


def _shm_entries() -> set[str]:
    try:
        return set(os.listdir(SHM))
    except OSError:
        return set()


def _remove_shm_left(before: set[str], pids: dict[int, str]) -> list[str]:
    """New ``/dev/shm`` entries named after a job process (torch's own names
    carry the pid: ``torch_<pid>_<n>_<n>``): removed, and returned. torch
    leaves one when the OOM killer kills a worker between making and
    unlinking a batch's file."""
    ours = {f"_{pid}_" for pid in pids}
    left = sorted(n for n in _shm_entries() - before if any(p in n for p in ours))
    for name in left:
        try:
            os.unlink(os.path.join(SHM, name))
        except FileNotFoundError:
            pass
    return left


def _settle(directory: Path, grace: float) -> list[int]:
    """Wait up to ``grace`` seconds for the cgroup to empty, then SIGKILL each
    process still in it (every one is this job's); returns their pids."""
    procs = directory / "cgroup.procs"
    deadline = time.monotonic() + grace
    while (pids := [int(p) for p in procs.read_text().split()]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while procs.read_text().split() and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def _classify(job: JobOutcome, rc: int, hung: bool) -> None:
    job.returncode = rc
    end = job.event
    if end.get("event") == "error":
        job.error = f"{end.get('type')}: {end.get('message')}"
    died = _WORKER_DIED.search(job.error or "")
    if hung:
        job.outcome = "hung"
    elif rc < 0:
        job.outcome, job.killed_role, job.signal = "killed", "main", signal.Signals(-rc).name
    elif died:
        job.outcome, job.killed_role = "killed", "worker"
        job.signal = died.group(2) or "exited unexpectedly"
    elif job.oom_kills:
        # The main process lived to report, yet the OOM killer struck: a worker
        # (torch then fails wherever it was, e.g. ConnectionResetError while
        # receiving a batch's descriptor from the dead worker).
        roles = {v["role"] for v in job.victims} or {"worker"}
        job.outcome, job.killed_role, job.signal = "killed", "/".join(sorted(roles)), "SIGKILL"
    elif end.get("event") == "error":
        job.outcome = "error"
    elif rc == 0:
        job.outcome = "completed"


def run_in_memory_cgroup(argv: list[str], limit: int, *, timeout: float = 240.0, interval: float = 0.02,
                         env: dict[str, str] | None = None) -> JobOutcome:
    """Run ``python *argv`` in a fresh memory cgroup limited to ``limit`` bytes.

    The program may print JSON event lines on stdout; a ``start`` event with
    ``main`` and ``workers`` pids names the processes' roles. Raises
    ``RuntimeError`` where no memory cgroup can be made (see
    :data:`cgroup_helpers.NO_HIERARCHY`)."""
    mount = hierarchy()
    if mount is None:
        raise RuntimeError(NO_HIERARCHY)
    _, peak_file, (oom_file, oom_key), _ = _FILES[mount.version]
    cgroups = NestedCgroups(mount, prefix=f"torch_arena_job_{secrets.token_hex(3)}")
    job = JobOutcome(limit)
    shm_before = _shm_entries()
    roles: dict[int, str] = {}
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    try:
        (directory,) = cgroups.nest([limit])
        started = time.monotonic()
        proc = subprocess.Popen([*IN_CGROUP, str(directory), sys.executable, *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=full_env, cwd=str(REPO), start_new_session=True)
        roles[proc.pid] = "main"
        sampler = _Sampler(directory, mount.version, roles, interval)
        sampler.start()
        stdout: list[str] = []
        stderr: list[str] = []

        def read_stdout() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                try:
                    event = json.loads(line)
                except ValueError:
                    stdout.append(line)
                    continue
                if event.get("event") == "start":
                    roles.update({pid: "worker" for pid in event.get("workers", ())})
                job.events.append(event)

        readers = [threading.Thread(target=read_stdout, daemon=True),
                   threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)]  # type: ignore[arg-type]
        for reader in readers:
            reader.start()
        hung = False
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            hung = True
            os.killpg(proc.pid, signal.SIGKILL)  # the job's own process group
            rc = proc.wait()
        job.seconds = time.monotonic() - started
        for reader in readers:
            reader.join(10)
        job.lingering = _settle(directory, grace=15.0)
        sampler.stop_event.set()
        sampler.join()
        job.oom_kills = _counter(directory / oom_file, oom_key)
        try:
            job.peak = int((directory / peak_file).read_text())
        except (OSError, ValueError):
            job.peak = sampler.peak
        job.sampled_peak, job.stat_at_peak = sampler.peak, sampler.stat_at_peak
        job.timeline = sampler.timeline
        job.process_at_peak = sampler.by_role(sampler.process_at_peak)
        job.process_peaks = sampler.by_role(sampler.process_peaks)
        job.stdout_tail, job.stderr_tail = "".join(stdout)[-4000:], "".join(stderr)[-4000:]
        job.victims = _kernel_ooms(cgroups.path_of(directory), roles, sampler.threads) if job.oom_kills else []
        _classify(job, rc, hung)
    finally:
        cgroups.remove()
    job.shm_left = _remove_shm_left(shm_before, roles)
    return job


def loader_job(arena: str, batch_mib: int, limit: int, *, batches: int = 20, workers: int = 2,
               timeout: float = 240.0, trace: bool = False, extra: tuple[str, ...] = ()) -> JobOutcome:
    """``cgroup_loader_child.py``: one DataLoader (``arena``: ``stock``, ``pool``
    or ``ring``, default settings otherwise), ``workers`` workers, ``batches``
    batches of ``batch_mib`` MiB (8 float32 tensors), in a cgroup of ``limit``."""
    argv = [str(CHILD), arena, str(batch_mib), "--batches", str(batches), "--workers", str(workers)]
    argv += (["--trace"] if trace else []) + list(extra)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_ARENA"}  # the job's own arena= decides
    return run_in_memory_cgroup(argv, limit, timeout=timeout, env=env)


def _cell(job: JobOutcome) -> str:
    if job.outcome == "killed":
        return f"killed:{job.killed_role}"
    if job.outcome == "error":
        return f"error:{(job.error or '').split(':')[0]}"
    fallbacks = job.event.get("fallbacks")
    return f"ok(fb {fallbacks})" if fallbacks else job.outcome.replace("completed", "ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limits", nargs="+", default=["1GiB", "2GiB"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 96, 128, 160, 256], help="batch MiB")
    parser.add_argument("--arenas", nargs="+", default=["stock", "pool", "ring"])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--trace", action="store_true", help="the arena's memory after every batch")
    parser.add_argument("--child", action="append", default=[],
                        help="one more argument for the job, e.g. --child=--inline-restore (repeatable)")
    parser.add_argument("--json", help="write every job's outcome here")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for limit_text in args.limits:
        limit = parse_bytes(limit_text, "limit")
        for size in args.sizes:
            for arena in args.arenas:
                for rep in range(args.repeat):
                    job = loader_job(arena, size, limit, batches=args.batches, trace=args.trace, extra=tuple(args.child))
                    row = {"limit": limit, "batch_mib": size, "arena": arena, "rep": rep, "cell": _cell(job),
                           **dataclasses.asdict(job), "batches_read": job.batches}
                    row["end"], row["start"] = job.event, job.start
                    rows.append(row)
                    print(f"{format_bytes(limit):>9} {size:4d} MiB {arena:5s} #{rep}: {job.summary()}", flush=True)
                    if job.victims:
                        print(f"{'':25}victims: {job.victims}", flush=True)
                    if job.left_behind:
                        print(f"{'':25}LEFT BEHIND: {job.left_behind}", flush=True)
                    if args.json:
                        Path(args.json).write_text(json.dumps(rows, indent=1))
    print()
    for limit_text in args.limits:
        limit = parse_bytes(limit_text, "limit")
        print(f"limit {format_bytes(limit)}: " + " | ".join(f"{a:^28}" for a in args.arenas))
        for size in args.sizes:
            cells = []
            for arena in args.arenas:
                mine = [r for r in rows if r["limit"] == limit and r["batch_mib"] == size and r["arena"] == arena]
                cells.append(", ".join(f"{r['cell']} {r['peak'] / MiB:.0f}M" for r in mine))
            print(f"{size:6d} MiB    " + " | ".join(f"{c:^28}" for c in cells))


if __name__ == "__main__":
    main()
