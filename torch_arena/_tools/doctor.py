"""``python -m torch_arena doctor``: the platform facts that matter, and arena sizes.

Prints what decides whether the DataLoader's transport works on this machine
(memfd support, the size of ``/dev/shm``, the memory available and the memory
cgroup limit, torch's sharing strategy, the open-file limit, the start method,
versions, the ``TORCH_ARENA`` switch and its start-up hook), what the loader's elastic pool will commit for a batch size,
``num_workers`` and ``prefetch_factor``, and sizes for the fixed pool and the
ring, which need them. ``--json`` prints the same as one JSON object. The exit
status is 1 when the recommended arena does not fit in the memory available
or memfd cannot be used, else 0.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from torch_arena import __version__
from torch_arena._os.memory import PAGE_SIZE, create_memory_file
from torch_arena._os.limits import available_memory, memory_limits, tightest_limit
from torch_arena._os.sizes import format_bytes
from torch_arena._arena.elastic import default_max_bytes
from torch_arena._loader.session import HELD_BATCHES, arena_slots

__all__ = ["collect_facts", "main", "recommend"]

#: Room added to a batch for the 64-byte alignment of each of its tensors
#: (enough for 1,024 tensors) before rounding up to a page.
ALIGNMENT_ROOM = 64 << 10


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _cgroup_limit() -> dict[str, Any]:
    """The memory cgroup limit that binds first, where it is, and every level read.

    ``cgroup_limit`` is the limit with the least headroom over the process's
    cgroup and its ancestors (None: all unlimited, or no memory cgroup);
    ``cgroup_path`` and ``cgroup_file`` say where it is set (the process's own
    cgroup when none is), ``cgroup_limits`` lists every limit file read.
    """
    limits = memory_limits()
    tightest = tightest_limit(limits)
    if tightest is not None:
        source = tightest.describe()
    elif limits:
        first = limits[0]
        above = len({lim.cgroup for lim in limits if lim.version == first.version}) - 1
        source = (f"none (cgroup v{first.version} {first.name} is unlimited at {first.cgroup}"
                  + (f" and its {above} ancestors)" if above else ")"))
    else:
        source = "no memory cgroup found"
    shown = tightest or (limits[0] if limits else None)
    return {
        "cgroup_limit": tightest.limit if tightest else None,
        "cgroup_source": source,
        "cgroup_path": shown.cgroup if shown else None,
        "cgroup_file": shown.file if shown else None,
        "cgroup_limits": [dict(asdict(lim), headroom=lim.headroom) for lim in limits],
    }


def _memfd_status() -> tuple[bool, str]:
    """Whether an anonymous memory file can be created and reserved here."""
    if not hasattr(os, "memfd_create"):
        return False, "os.memfd_create is missing: the fallback (shm_open, then unlinked) is used"
    try:
        os.close(create_memory_file(PAGE_SIZE, "the doctor's test file"))
    except (OSError, MemoryError) as exc:
        return False, f"memfd_create failed: {exc}"
    return True, "yes (a one-page file was created and reserved)"


def _switch_facts() -> dict[str, Any]:
    """``TORCH_ARENA``: its value, what it resolves to, and whether the start-up
    hook that reads it is installed here."""
    from torch_arena._startup import OFF, VARIABLE, parse
    from torch_arena._tools.hook import installed

    raw = os.environ.get(VARIABLE)
    resolved, error = None, None
    if raw is not None:
        try:
            settings = parse(raw)
            resolved = ("off (torch's own transport)" if not settings.enabled else
                        f"{settings.arena}, budget {_bytes(settings.budget) if settings.budget else 'default'}, "
                        f"overflow {settings.overflow}, timeout {settings.timeout:g} s, threshold {settings.threshold}")
        except ValueError as exc:
            error = str(exc)
    return {
        "switch_variable": raw,
        "switch_on": raw is not None and raw.strip().lower() not in OFF and error is None,
        "switch_resolved": resolved,
        "switch_error": error,
        "startup_hook": [str(p) for p in installed()],
        "switch_report": os.environ.get("TORCH_ARENA_REPORT", ""),
    }


def _switch_lines(f: dict[str, Any]) -> list[str]:
    raw = f["switch_variable"]
    value = "unset: only ArenaDataLoader and the integrations' loaders use arenas" if raw is None else (
        f"{raw!r} -> {f['switch_resolved'] or 'invalid (see warnings)'}")
    hook = ", ".join(f["startup_hook"]) or "not installed (python -m torch_arena hook install)"
    return ["switch", f"  TORCH_ARENA       {value}", f"  start-up hook     {hook}"]


def collect_facts() -> dict[str, Any]:
    """Everything the report shows about this machine, as plain values."""
    memfd_ok, memfd_note = _memfd_status()
    try:
        stat = os.statvfs("/dev/shm")
        shm_size, shm_free = stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize
    except OSError:
        shm_size = shm_free = None
    available, available_source = available_memory()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "torch_arena": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "memfd": memfd_ok,
        "memfd_note": memfd_note,
        "dev_shm_size": shm_size,
        "dev_shm_free": shm_free,
        "mem_available": _meminfo("MemAvailable"),
        **_cgroup_limit(),
        "arena_available": available,
        "arena_available_source": available_source,
        "sharing_strategy": torch.multiprocessing.get_sharing_strategy(),
        "nofile_soft": soft,
        "nofile_hard": hard,
        "start_method": multiprocessing.get_start_method(),
        "cpu_count": os.cpu_count(),
        **_switch_facts(),
    }


def recommend(batch_bytes: int, num_workers: int, prefetch_factor: int, pin_memory: bool = False) -> dict[str, int]:
    """Arena sizes for batches of at most ``batch_bytes``.

    One slot per batch that can be in flight or held (``arena_slots``). The
    loader's default, the elastic pool, needs no size: the figures say what it
    will commit at peak (``pool_peak_bytes``, at most ``pool_committed_bound``)
    against its default cap. For a fixed :class:`SharedMemorySegmentPool` a
    segment is the batch plus :data:`ALIGNMENT_ROOM`, rounded up to a page, one
    per slot; a fixed :class:`SharedMemoryRingBuffer` of ``ring_capacity``
    (``arena_budget``) is one such segment per slot.
    """
    slots = arena_slots(num_workers, prefetch_factor, pin_memory)
    segment = -(-(batch_bytes + ALIGNMENT_ROOM) // PAGE_SIZE) * PAGE_SIZE
    total = segment * slots
    # The loader's elastic pool commits about what is in flight and held, plus
    # the warm memory it keeps above that (at most a quarter and 16 MiB).
    peak = -(-batch_bytes // PAGE_SIZE) * PAGE_SIZE * slots
    return {"slots": slots, "segment_size": segment, "count": slots, "ring_capacity": total,
            "arena_budget": total, "stock_shm_bytes": batch_bytes * slots,
            "pool_peak_bytes": peak, "pool_committed_bound": peak * 5 // 4 + (16 << 20),
            "pool_default_cap": default_max_bytes()}


def _bytes(n: int | None) -> str:
    return "unknown" if n is None else format_bytes(n)


def _cgroup_lines(f: dict[str, Any]) -> list[str]:
    """The cgroup part of the report: the limit that binds first, its file, and
    each limit file read (the process's cgroup first, then its ancestors)."""
    if f["cgroup_limit"] is None:
        return [f"  cgroup limit      {f['cgroup_source']}"]
    levels = "; ".join(
        f"{lim['cgroup']} {lim['file'].rsplit('/', 1)[-1]} {_bytes(lim['limit']) if lim['limit'] else 'unlimited'}"
        for lim in f["cgroup_limits"]
    )
    return [f"  cgroup limit      {_bytes(f['cgroup_limit'])}: {f['cgroup_source']}",
            f"  cgroup file       {f['cgroup_file']}",
            f"  cgroup levels     {levels}"]


def _report(facts: dict[str, Any], rec: dict[str, int], args: argparse.Namespace) -> list[str]:
    """The human-readable report, one line per entry."""
    f, budget = facts, rec["arena_budget"]
    shm = f"{_bytes(f['dev_shm_size'])}, {_bytes(f['dev_shm_free'])} free" if f["dev_shm_size"] else "missing"
    lines = [
        "torch_arena doctor",
        "platform",
        f"  python            {f['python']} on {f['platform']}, {f['cpu_count']} CPUs",
        f"  torch / numpy     {f['torch']} / {f['numpy']}",
        f"  torch_arena       {f['torch_arena']}",
        "memory",
        f"  memfd_create      {f['memfd_note']}",
        f"  /dev/shm          {shm} (torch's default transport uses it; the arena does not)",
        f"  MemAvailable      {_bytes(f['mem_available'])}",
        *_cgroup_lines(f),
        f"  arenas may take   {_bytes(f['arena_available'])} ({f['arena_available_source']})",
        "multiprocessing",
        f"  start method      {f['start_method']}",
        f"  sharing strategy  {f['sharing_strategy']} (torch.multiprocessing.get_sharing_strategy())",
        f"  open files        {f['nofile_soft']} (hard limit {f['nofile_hard']})",
        *_switch_lines(f),
        f"recommendation for batches of {format_bytes(args.batch_bytes)}, num_workers={args.num_workers}, "
        f"prefetch_factor={args.prefetch_factor}" + (", pin_memory=True" if args.pin_memory else ""),
        f"  slots             {rec['slots']} = {args.num_workers} workers x {args.prefetch_factor} prefetched"
        f" + {HELD_BATCHES} held by the loop" + (" + 1 pinning" if args.pin_memory else ""),
        (f"  loader (default)  ArenaDataLoader(..., arena='pool')  # elastic pool, no size to give: "
         f"about {format_bytes(rec['pool_peak_bytes'])} committed at peak (at most "
         f"{format_bytes(rec['pool_committed_bound'])}), capped at {format_bytes(rec['pool_default_cap'])}"),
        (f"  fixed pool        SharedMemorySegmentPool(segment_size={rec['segment_size']}, count={rec['count']})"
         f"  # {format_bytes(rec['segment_size'])} each, all reserved up front"),
        "  loader ring       ArenaDataLoader(..., arena='ring')  # elastic too, private copies; no size",
        f"  fixed ring        SharedMemoryRingBuffer(capacity={rec['ring_capacity']})  # {format_bytes(budget)}",
    ]
    warnings = []
    available = f["arena_available"]
    if available is not None and budget > available:
        warnings.append(f"the arena ({format_bytes(budget)}) does not fit in the {format_bytes(available)} "
                        "available: lower prefetch_factor or num_workers, or make batches smaller")
    elif available is not None:
        lines.append(f"  memory            {budget / available:.1%} of the {format_bytes(available)} available")
    if f["dev_shm_free"] is not None and rec["stock_shm_bytes"] > f["dev_shm_free"]:
        warnings.append(f"torch's default transport would need about {format_bytes(rec['stock_shm_bytes'])} "
                        f"of /dev/shm but {format_bytes(f['dev_shm_free'])} is free: the stock DataLoader fails "
                        "here ('No space left on device', then a hang); the arena does not need /dev/shm")
    if not f["memfd"]:
        warnings.append(f["memfd_note"])
    if f["sharing_strategy"] == "file_descriptor" and f["nofile_soft"] < 4096:
        warnings.append(f"open-file limit {f['nofile_soft']} is low for torch's file_descriptor strategy "
                        "(one descriptor per tensor in flight); an arena needs 4 per process")
    if rec["pool_committed_bound"] > rec["pool_default_cap"]:
        warnings.append(f"the batches in flight need up to {format_bytes(rec['pool_committed_bound'])}, more "
                        f"than the elastic pool's default cap of {format_bytes(rec['pool_default_cap'])}: "
                        f"pass arena_budget={rec['pool_committed_bound']} (workers wait for space at the cap)")
    if f["switch_error"]:
        warnings.append(f"{f['switch_error']}: every Python process of this environment exits at start-up")
    elif f["switch_on"] and not f["startup_hook"]:
        warnings.append("TORCH_ARENA is set but the start-up hook is not installed, so it has no effect: "
                        "run `python -m torch_arena hook install`")
    lines += (["warnings"] + [f"  - {w}" for w in warnings]) if warnings else ["no warnings"]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m torch_arena doctor``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m torch_arena doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-bytes", type=int, default=64 << 20, help="largest batch (default 64 MiB)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader num_workers (default 2)")
    parser.add_argument("--prefetch-factor", type=int, default=2, help="DataLoader prefetch_factor (default 2)")
    parser.add_argument("--pin-memory", action="store_true", help="the loader uses pin_memory=True")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = parser.parse_args(argv)
    for name in ("batch_bytes", "num_workers", "prefetch_factor"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    facts = collect_facts()
    rec = recommend(args.batch_bytes, args.num_workers, args.prefetch_factor, args.pin_memory)
    fits = facts["arena_available"] is None or rec["arena_budget"] <= facts["arena_available"]
    if args.json:
        print(json.dumps({"facts": facts, "recommendation": rec, "fits": fits}, indent=2))
    else:
        print("\n".join(_report(facts, rec, args)))
    return 0 if fits and facts["memfd"] else 1
