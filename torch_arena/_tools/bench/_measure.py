"""Measuring one configuration, in the fresh child process it runs in."""

from __future__ import annotations

import functools
import gc
import multiprocessing
import math
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from ._config import _ENDLESS, _UNIT_SLACK, DATASET_ONLY, PREFETCH, RING_FIXED, SPDL, Config
from ._payloads import (
    PayloadDataset,
    base_kind,
    make_payload,
    samples_per_batch,
    wire_bytes,
)

# -- measuring (child process) -----------------------------------------------------


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _process_cpu_clock(pid: int) -> float:
    """CPU seconds of process ``pid`` (all its threads, living and dead) from the
    kernel's per-process CPU clock: the figure psutil reads from
    ``/proc/<pid>/stat``, in nanoseconds instead of 10 ms ticks."""
    return time.clock_gettime(((~pid) << 3) | 2)  # Linux MAKE_PROCESS_CPUCLOCK(pid, SCHED)


def _cpu_of(pids: Iterable[int]) -> float:
    """Summed CPU seconds (user + system) of living processes ``pids``."""
    import psutil  # imported by measure() before any timing starts

    total = 0.0
    for pid in pids:
        try:
            total += _process_cpu_clock(pid)
            continue
        except OSError:
            pass  # not Linux, or the process is gone
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _descendants() -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


def _copy_pair(nbytes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    src = np.frombuffer(np.random.default_rng(seed).bytes(nbytes), dtype=np.uint8)
    dst = np.empty_like(src)
    dst.fill(1)  # pre-fault every page
    return src, dst


def memcpy_seconds(nbytes: int, reps: int = 7, concurrent: int = 1) -> float:
    """Median seconds of one ``np.copyto`` of ``nbytes`` into pre-faulted memory,
    with ``concurrent`` threads copying at once (numpy releases the GIL)."""
    pairs = [_copy_pair(nbytes, seed) for seed in range(concurrent)]
    barrier = threading.Barrier(concurrent)
    medians = [0.0] * concurrent

    def run(k: int) -> None:
        src, dst = pairs[k]
        times = []
        for _ in range(reps + 1):
            barrier.wait()
            t0 = time.perf_counter()
            np.copyto(dst, src)
            times.append(time.perf_counter() - t0)
        medians[k] = statistics.median(times[1:])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(concurrent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statistics.mean(medians)


def matmul_step(reps: int, n: int = 128) -> None:
    """The simulated training step: ``reps`` single-threaded ``n`` x ``n`` matmuls."""
    import torch

    a = _STEP_OPERANDS.get(n)
    if a is None:
        a = _STEP_OPERANDS[n] = torch.randn(n, n)
    for _ in range(reps):
        torch.mm(a, a)


_STEP_OPERANDS: dict[int, Any] = {}


def touch_pages(obj: Any) -> int:
    """Read one byte of every 4 KiB page of the batch's arrays, tensors and bytes."""
    if isinstance(obj, (list, tuple)):
        return sum(touch_pages(o) for o in obj)
    if isinstance(obj, dict):
        return sum(touch_pages(o) for o in obj.values())
    if hasattr(obj, "numpy") and hasattr(obj, "element_size"):
        obj = obj.numpy()
    if isinstance(obj, np.ndarray):
        flat = obj.reshape(-1).view(np.uint8)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        flat = np.frombuffer(obj, dtype=np.uint8)
    else:
        return 0
    return int(flat[::4096].sum())


def calibrate_step(step_ms: float, n: int = 128) -> int:
    """Repetitions of :func:`matmul_step` (``n`` x ``n``) that take about ``step_ms`` of one core."""
    import torch

    torch.set_num_threads(1)
    reps = max(2, round(200 * (128 / n) ** 3))  # about the same time whatever the size
    matmul_step(max(1, reps // 4), n)
    per = []
    for _ in range(5):
        t0 = time.thread_time()
        matmul_step(reps, n)
        per.append((time.thread_time() - t0) / reps)
    return max(1, round(step_ms / 1e3 / statistics.median(per)))


def _timed_windows(it: Iterator[Any], cfg: Config, worker_pids: Callable[[], list[int]]) -> dict[str, Any]:
    """Warm-up window, then the timed windows; CPU of main and workers over them.

    A window holds ``cfg.per_window`` batches, or more if that would take less
    than ``cfg.min_window_s`` at the warm-up window's rate.
    """
    t0 = time.perf_counter()
    for _ in range(cfg.per_window):
        batch = next(it)
        del batch
    warm_rate = cfg.per_window / (time.perf_counter() - t0)
    per_window = max(cfg.per_window, math.ceil(warm_rate * cfg.min_window_s))
    pids = worker_pids()
    workers0 = _cpu_of(pids)  # before reading our own CPU: psutil's work is not charged
    cpu0 = _cpu_self()
    rates, wait, step_cpu, touch_cpu = [], 0.0, 0.0, 0.0
    for _ in range(cfg.windows):
        t0 = time.perf_counter()
        for _ in range(per_window):
            tw = time.perf_counter()
            batch = next(it)
            wait += time.perf_counter() - tw
            if cfg.touch:
                ts = time.thread_time()
                touch_pages(batch)
                touch_cpu += time.thread_time() - ts
            if cfg.step_reps:
                ts = time.thread_time()
                matmul_step(cfg.step_reps)
                step_cpu += time.thread_time() - ts
            del batch
        rates.append(per_window / (time.perf_counter() - t0))
    cpu1 = _cpu_self()
    workers1 = _cpu_of(pids)
    return {
        "rates": rates,
        "per_window": per_window,
        "main_cpu": cpu1 - cpu0,
        "worker_cpu": workers1 - workers0,
        "wait": wait,
        "step_cpu": step_cpu,
        "touch_cpu": touch_cpu,
        "pids": pids,
    }


def _drop_batch(batch: Any) -> int:
    """The dataset-only run's collate function: the batch is made, then dropped."""
    return 0


def _run_loader(cfg: Config) -> dict[str, Any]:
    from torch_arena._loader.dataloader import ArenaDataLoader
    from torch_arena._loader.session import arena_slots

    samples = samples_per_batch(cfg.kind)
    dataset = PayloadDataset(base_kind(cfg.kind), cfg.batch_bytes // samples, _ENDLESS, cfg.item_sleep_ms)
    arena: Any = None if cfg.transport in ("stock", DATASET_ONLY) else cfg.transport
    unit = -(-(cfg.batch_bytes + _UNIT_SLACK) // 4096) * 4096
    budget = None
    slots = cfg.slots or arena_slots(cfg.workers, PREFETCH, False)
    if arena is not None and (cfg.slots or arena == RING_FIXED):
        # An arena instance with exactly ``slots`` units of one batch each
        # (``ring-fixed``: SPDL's fixed ring, one batch per unit the loader keeps).
        from torch_arena._arena.segment_pool import SharedMemorySegmentPool
        from torch_arena._arena.ring_buffer import SharedMemoryRingBuffer

        arena = (
            SharedMemorySegmentPool(unit, slots, acquire_timeout=60.0)
            if arena == "pool"
            else SharedMemoryRingBuffer(unit * slots, acquire_timeout=60.0)
        )
    elif arena is not None:
        budget = slots * unit  # one batch per slot
    loader = ArenaDataLoader(
        dataset,
        batch_size=None if samples == 1 else samples,
        # dataset-only: the worker fetches the whole batch exactly as the other
        # runs do (all its samples alive at once), then sends 0 instead of it.
        collate_fn=_drop_batch if cfg.transport == DATASET_ONLY else None,
        num_workers=cfg.workers,
        prefetch_factor=PREFETCH,
        arena=arena,
        arena_budget=budget,
    )
    it = iter(loader)
    try:
        out = _timed_windows(it, cfg, lambda: [w.pid for w in it._workers])
        out["worker_total_live"] = _cpu_of(out["pids"])
        children0 = _cpu_children()
        it._shutdown_workers()  # joins them: RUSAGE_CHILDREN now holds their whole life
        out["worker_total_rusage"] = _cpu_children() - children0
        stats = loader.arena_stats
    finally:
        it._shutdown_workers()  # no-op after the first call
        loader.release_arena()
        if not isinstance(arena, (str, type(None))):
            arena.close()
    out.update(arena_batches=stats.batches, fallbacks=stats.fallbacks, high_water=stats.high_water_units)
    from torch_arena._arena.private import process_buffers

    private = process_buffers().stats()  # copy-out restores: buffers mapped anew vs recycled
    out.update(private_fresh=private["fresh"], private_reused=private["reused"])
    return out


def _run_spdl(cfg: Config) -> dict[str, Any]:
    from spdl.pipeline import (
        PipelineBuilder,
        SharedMemorySegmentPool,
        run_pipeline_in_subprocess,
    )

    dataset = PayloadDataset(cfg.kind, cfg.batch_bytes, _ENDLESS, sleep_ms=cfg.item_sleep_ms)
    buffer_size = PREFETCH * cfg.workers
    pool = SharedMemorySegmentPool(segment_size=cfg.batch_bytes + (1 << 20), count=buffer_size + 4)
    config = (
        PipelineBuilder()
        .add_source(range(_ENDLESS))
        .pipe(dataset.__getitem__, concurrency=cfg.workers)
        .add_sink(buffer_size=buffer_size)
        .get_config()
    )
    before = set(_descendants())  # after the pool: its resource tracker is no producer
    children0 = _cpu_children()
    src = run_pipeline_in_subprocess(config, num_threads=cfg.workers, arena=pool, buffer_size=buffer_size)
    it = iter(src)
    try:
        out = _timed_windows(it, cfg, lambda: [p for p in _descendants() if p not in before])
        out["worker_total_live"] = _cpu_of(out["pids"])
    finally:
        del it, src
        gc.collect()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in out["pids"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    out["worker_total_rusage"] = _cpu_children() - children0
    return out


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@functools.lru_cache(maxsize=None)
def t95(n: int) -> float:
    """Two-sided 95 % Student's t quantile for ``n`` samples (``n - 1`` degrees of
    freedom), for any ``n``: the density integrated (Simpson) and inverted by bisection."""
    if n < 2:
        return 0.0
    df = n - 1
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def area(x: float, steps: int = 2000) -> float:  # P(0 <= T <= x)
        h = x / steps
        total = 0.0
        for i in range(steps + 1):
            weight = 1 if i in (0, steps) else 4 if i % 2 else 2
            total += weight * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2)
        return scale * total * h / 3

    lo, hi = 0.0, 64.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if area(mid) < 0.475 else (lo, mid)
    return (lo + hi) / 2


def measure(cfg: Config) -> dict[str, Any]:
    """Run one configuration in this process; a JSON-able dict of raw figures."""
    import psutil  # noqa: F401 - imported here, not inside a timed window

    if cfg.step_reps:
        import torch

        torch.set_num_threads(1)
    samples = samples_per_batch(cfg.kind)
    sample = make_payload(base_kind(cfg.kind), cfg.batch_bytes // samples)
    batch_bytes = wire_bytes(sample) * samples
    del sample
    memcpy = memcpy_seconds(batch_bytes)
    memcpy_shared = memcpy_seconds(batch_bytes, concurrent=min(cfg.workers, os.cpu_count() or 1))
    gc.collect()
    began = time.time()
    run = _run_spdl if cfg.transport == SPDL else _run_loader
    out = run(cfg)
    ended = time.time()
    out.pop("pids")
    out.update(batch_bytes=batch_bytes, memcpy=memcpy, memcpy_shared=memcpy_shared, began=began, ended=ended)
    out["start_method"] = "threads" if cfg.transport == SPDL else multiprocessing.get_start_method()
    return out
