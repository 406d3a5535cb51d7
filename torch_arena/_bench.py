"""The A/B transport benchmark: torch's DataLoader transport against the arenas.

One *configuration* is a payload kind, a batch size in bytes and a transport:

* ``stock``: :class:`~torch_arena.ArenaDataLoader` with ``arena=None``, which is
  exactly torch's own transport (tensors through fresh shared-memory segments,
  everything else pickled through the worker pipe);
* ``ring`` / ``pool``: the same loader with ``arena="ring"`` / ``"pool"``, the
  arena sized for the loader's in-flight batches;
* ``spdl-pool``: SPDL's own segment pool, through
  ``spdl.pipeline.run_pipeline_in_subprocess(..., arena=SharedMemorySegmentPool)``
  on the same dataset (a peer, not a DataLoader);
* ``dataset-only``: the stock loader fetching every batch exactly as the
  others do, with a collate function that drops it and returns ``0``: the cost
  of *making* the payload, subtracted from the workers' CPU to get the cost of
  *moving* it.

Every configuration runs in a fresh interpreter (``_child``) started by
:func:`run_config`; the parent samples the memory of that process tree
meanwhile, so the sampler's own CPU is not charged to the configuration.
In the child:

* ``memcpy``: the median time of ``np.copyto`` of one batch's bytes into a
  pre-faulted buffer, alone and with every worker's core copying at once: the
  physical reference costs are reported against;
* one warm-up window, then ``windows`` timed windows of ``per_window`` batches
  (more if a window would be shorter than ``min_window_s``) in one long epoch
  (2 workers, ``prefetch_factor=2``); the main loop only drops each batch (or
  runs a simulated training step: ``touch``, ``step_reps``);
* throughput: batches per second of each window, mean and a 95 % confidence
  interval (Student's t over windows);
* main-process CPU: ``getrusage(RUSAGE_SELF)`` over the timed windows, all
  threads (queue feeder threads included);
* worker CPU: user + system time of every descendant process (the DataLoader
  workers, SPDL's producer) at the start and the end of the timed windows,
  while they are alive, from the kernel's per-process CPU clock (what psutil
  reads from ``/proc/<pid>/stat``, at nanosecond resolution; psutil where the
  clock cannot be read). Cross-check: after the workers are joined,
  ``RUSAGE_CHILDREN`` over their whole life divided by the live reading of
  their whole life (``worker_cpu_check``, ~1.0).

In the parent:

* peak memory (:func:`tree_memory_kib`): PSS without shared-memory files,
  plus each shared-memory file mapped or held open by the tree, once;
  sampled every ``pss_interval`` seconds while the loader runs;
* noise: CPU that other processes used meanwhile, in % of the machine; a
  noisy configuration can run again (:func:`run_matrix`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import math
import mmap
import os
import resource
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Config",
    "Result",
    "check_targets",
    "format_table",
    "main",
    "plot",
    "run_config",
    "run_matrix",
    "write_csv",
]

MiB = 1 << 20
ITEM_KINDS = ("bytes", "numpy", "torch", "packets")
#: Batches of 8 tensor samples stacked by default_collate.
COLLATED_KIND = "torch-x8"
KINDS = (*ITEM_KINDS, COLLATED_KIND)
TRANSPORTS = ("stock", "ring", "pool")
SPDL = "spdl-pool"
DATASET_ONLY = "dataset-only"
ALL_TRANSPORTS = (*TRANSPORTS, SPDL, DATASET_ONLY)
SIZES_MIB = (2, 8, 32)
WORKERS = 2
PREFETCH = 2
#: Slack per arena unit beyond the payload (alignment, the odd small binary).
_UNIT_SLACK = 64 << 10
#: Length of the (virtual) datasets: iteration stops after the timed windows.
_ENDLESS = 1 << 40
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


# -- payloads ------------------------------------------------------------------


def samples_per_batch(kind: str) -> int:
    """8 for a collated kind (``torch-x8``), else 1 (``batch_size=None``)."""
    return int(kind.rpartition("-x")[2]) if "-x" in kind else 1


def base_kind(kind: str) -> str:
    """The sample's kind (``torch`` for ``torch-x8``)."""
    return kind.partition("-x")[0]


def _bmp(nbytes: int) -> bytes:
    """An uncompressed 24-bit BMP of about ``nbytes`` (random pixels)."""
    width = 1024
    row = width * 3
    height = max(1, nbytes // row)
    pixels = np.random.default_rng(0).bytes(row * height)
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54) + struct.pack(
        "<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0
    )
    return header + pixels


def make_payload(kind: str, nbytes: int) -> Any:
    """One payload of ``kind`` holding about ``nbytes`` of random data.

    ``packets`` are real ``spdl.io`` ImagePackets demuxed from a BMP (one
    packet of the whole file).
    """
    if kind == "packets":
        import spdl.io

        return spdl.io.demux_image(_bmp(nbytes))
    raw = np.random.default_rng(0).bytes(nbytes)
    if kind == "bytes":
        return raw
    array = np.frombuffer(raw, dtype=np.float32).copy()
    if kind == "numpy":
        return array
    if kind == "torch":
        import torch

        return torch.from_numpy(array)
    raise ValueError(f"unknown payload kind {kind!r}")


def wire_bytes(payload: Any) -> int:
    """Bytes one payload puts through a transport."""
    if isinstance(payload, (bytes, bytearray)):
        return len(payload)
    if isinstance(payload, np.ndarray):
        return payload.nbytes
    if hasattr(payload, "element_size"):
        return payload.numel() * payload.element_size()
    return len(payload.__getstate__())


def packets_skip_reason() -> str | None:
    """Why ``packets`` cannot run here, or None."""
    try:
        import spdl.io  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - e.g. FFmpeg libraries missing
        return f"spdl.io does not import ({type(exc).__name__}: {exc})"
    return None


def spdl_skip_reason() -> str | None:
    """Why the SPDL peer cannot run here, or None."""
    try:
        from spdl.pipeline import SharedMemorySegmentPool, run_pipeline_in_subprocess  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"spdl.pipeline does not import ({type(exc).__name__}: {exc})"
    return None


class PayloadDataset:
    """A map-style dataset of ``length`` payloads of one kind.

    bytes, numpy arrays and packets: the same object every time (made once per
    process), so the transfer is measured, not its creation. This is fair to
    torch's path: a numpy array becomes a new tensor in ``default_convert`` /
    ``default_collate`` for every batch, so nothing is cached between sends.
    torch tensors: a fresh copy per item (:func:`fresh_copy`), because torch
    moves a tensor's storage into shared memory in place on its first send and
    reuses it afterwards; reusing one tensor would hide the cost.
    """

    def __init__(self, kind: str, nbytes: int, length: int, sleep_ms: float = 0.0) -> None:
        self.kind, self.nbytes, self.length, self.sleep_ms = kind, nbytes, length, sleep_ms
        self._cache: tuple[int, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}

    def __len__(self) -> int:
        return self.length

    def _source(self) -> Any:
        if self._cache is None or self._cache[0] != os.getpid():
            self._cache = (os.getpid(), make_payload(self.kind, self.nbytes))
        return self._cache[1]

    def __getitem__(self, index: int) -> Any:
        if self.sleep_ms:
            time.sleep(self.sleep_ms / 1e3)
        source = self._source()
        return fresh_copy(source) if self.kind == "torch" else source


def fresh_copy(source: Any) -> Any:
    """A copy of tensor ``source`` in freshly mapped memory, unmapped when it dies.

    What a decoder's output costs (new pages, faulted in by the copy), without
    glibc's heap: ``clone()`` of 2-8 MiB tensors in a DataLoader worker grows
    the worker's heap by hundreds of MB that are never returned (measured: 564
    MB of ``[heap]`` per worker making 4 MiB samples), which would swamp the
    peak-memory figures of every transport.
    """
    import torch

    flat = np.frombuffer(mmap.mmap(-1, max(1, source.nbytes)), dtype=np.uint8)
    fresh = torch.from_numpy(flat).view(source.dtype).view(source.shape)
    fresh.copy_(source)
    return fresh


# -- configuration and result ----------------------------------------------------


@dataclasses.dataclass
class Config:
    """One benchmark configuration (runs in its own process)."""

    kind: str
    size_mib: float
    transport: str
    per_window: int
    windows: int = 5
    workers: int = WORKERS
    step_reps: int = 0
    """Simulated training step: matmul repetitions per batch (0: none)."""
    step_ms: float = 0.0
    """What ``step_reps`` was calibrated to, for the report."""
    touch: bool = False
    """Read one byte of every page of the batch in the main loop (as a step
    that uses the batch would; mapping fresh memory costs page faults)."""
    slots: int = 0
    """Arena units (pool segments / ring batches); 0: the loader's default
    (``num_workers * prefetch_factor + 2``)."""
    min_window_s: float = 0.5
    """Shortest timed window: more batches per window when they come faster."""
    item_sleep_ms: float = 0.0
    """The dataset sleeps this long per item (to pace a run, e.g. the
    dataset-only floor at another run's batch rate)."""

    @property
    def batch_bytes(self) -> int:
        return int(self.size_mib * MiB)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.size_mib:g} MiB {self.transport}"


@dataclasses.dataclass
class Result:
    """What one configuration measured. Per-batch figures are in milliseconds."""

    kind: str
    size_mib: float
    transport: str
    batch_bytes: int = 0
    batches: int = 0
    items_per_s: float = 0.0
    mb_per_s: float = 0.0
    mb_per_s_lo: float = 0.0
    mb_per_s_hi: float = 0.0
    main_cpu_ms: float = 0.0
    worker_cpu_ms: float = 0.0
    worker_cpu_check: float = 0.0
    dataset_ms: float = float("nan")
    worker_xfer_ms: float = float("nan")
    memcpy_ms: float = 0.0
    memcpy_gbps: float = 0.0
    memcpy_shared_ms: float = 0.0
    """One memcpy of the batch while every worker's core copies at once."""
    xfer_memcpy_ratio: float = float("nan")
    peak_pss_mb: float = 0.0
    arena_batches: int = 0
    fallbacks: int = 0
    arena_high_water: int = 0
    """Most arena units in use at once."""
    wait_ms: float = 0.0
    step_cpu_ms: float = 0.0
    """CPU of the simulated step's matmuls (main thread)."""
    touch_ms: float = 0.0
    """CPU of reading one byte per page of the batch (main thread)."""
    step_ms: float = 0.0
    wall_s: float = 0.0
    noise_pct: float = float("nan")
    """CPU other processes used meanwhile, % of the machine (see :func:`run_config`)."""
    skipped: str = ""

    @property
    def key(self) -> tuple[str, float]:
        return (self.kind, self.size_mib)


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


def matmul_step(reps: int) -> None:
    """The simulated training step: ``reps`` single-threaded 128x128 matmuls."""
    import torch

    a = _STEP_OPERANDS.get("a")
    if a is None:
        a = _STEP_OPERANDS["a"] = torch.randn(128, 128)
    for _ in range(reps):
        torch.mm(a, a)


_STEP_OPERANDS: dict[str, Any] = {}


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


def calibrate_step(step_ms: float) -> int:
    """Matmul repetitions that take about ``step_ms`` of one core."""
    import torch

    torch.set_num_threads(1)
    matmul_step(50)
    per = []
    for _ in range(5):
        t0 = time.thread_time()
        matmul_step(200)
        per.append((time.thread_time() - t0) / 200)
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
    from ._dataloader import ArenaDataLoader
    from ._session import arena_slots

    samples = samples_per_batch(cfg.kind)
    dataset = PayloadDataset(base_kind(cfg.kind), cfg.batch_bytes // samples, _ENDLESS, cfg.item_sleep_ms)
    arena: Any = None if cfg.transport in ("stock", DATASET_ONLY) else cfg.transport
    unit = -(-(cfg.batch_bytes + _UNIT_SLACK) // 4096) * 4096
    budget = None
    if arena is not None and cfg.slots:
        # An arena instance with exactly ``slots`` units of one batch each.
        from ._pool import SharedMemorySegmentPool
        from ._ring import SharedMemoryRingBuffer

        arena = (
            SharedMemorySegmentPool(unit, cfg.slots, acquire_timeout=60.0)
            if arena == "pool"
            else SharedMemoryRingBuffer(unit * cfg.slots, acquire_timeout=60.0)
        )
    elif arena is not None:
        budget = arena_slots(cfg.workers, PREFETCH, False) * unit  # one batch per slot
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


def t95(n: int) -> float:
    """Two-sided 95 % Student's t quantile for ``n`` samples."""
    return _T95.get(n - 1, 1.96) if n > 1 else 0.0


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
    return out


def _child(cfg_json: str) -> int:
    """Entry point of a configuration's process: one JSON line on stdout."""
    cfg = Config(**json.loads(cfg_json))
    out = measure(cfg)
    sys.stdout.write("\nRESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


# -- orchestration (parent process) --------------------------------------------------


_SHM_PREFIXES = ("/dev/shm/", "/memfd:")


def _private_pss_kib(pid: int) -> int:
    """PSS of ``pid`` without its shared-memory-file pages (counted per file)."""
    pss = shmem = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Pss_Shmem:"):
                    shmem = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return pss - shmem


def _shm_files_kib(pid: int, files: dict[int, int]) -> None:
    """Add the allocated KiB of every shared-memory file ``pid`` maps or holds open."""
    paths = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            paths.append(f"/proc/{pid}/fd/{fd}")
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith(_SHM_PREFIXES) and int(parts[4]) not in files:
                    paths.append(f"/proc/{pid}/map_files/{parts[0]}")
    except (OSError, ValueError):
        return
    for path in paths:
        try:
            if not os.readlink(path).startswith(_SHM_PREFIXES):
                continue
            st = os.stat(path)
        except OSError:
            continue
        files[st.st_ino] = st.st_blocks // 2


def tree_memory_kib(pids: Sequence[int]) -> int:
    """Memory of a process tree, each page once: PSS without shared-memory files,
    plus every shared-memory file mapped or held open by any of the processes,
    once. (torch's segments in flight between a worker and the main process are
    held by descriptors and mapped by nobody: PSS alone misses them.)"""
    files: dict[int, int] = {}
    private = 0
    for pid in pids:
        private += _private_pss_kib(pid)
        _shm_files_kib(pid, files)
    return private + sum(files.values())


class _PssSampler:
    """Samples the summed PSS of a process tree from another process."""

    def __init__(self, pid: int, interval: float) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.wait(self.interval):
            try:
                pids = [self.pid] + [p.pid for p in root.children(recursive=True)]
            except psutil.Error:
                return
            self.samples.append((time.time(), tree_memory_kib(pids)))

    def peak_mb(self, began: float, ended: float) -> float:
        self._stop.set()
        self._thread.join()
        inside = [kib for t, kib in self.samples if began <= t <= ended]
        return max(inside) * 1024 / 1e6 if inside else float("nan")  # too short to sample


def _machine_busy() -> float:
    """CPU seconds all cores of the machine spent busy (``/proc/stat``), steal included."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return float("nan")
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_config(cfg: Config, *, pss_interval: float = 0.1, timeout: float = 600.0) -> Result:
    """Run ``cfg`` in a fresh interpreter and summarize what it measured.

    ``noise_pct`` of the result: CPU that processes outside this benchmark used
    while it ran (busy time from ``/proc/stat`` minus this process and the
    configuration's process tree), as a percentage of all cores.
    """
    busy0, self0, tree0 = _machine_busy(), _cpu_self(), _cpu_children()
    cmd = [
        sys.executable,
        "-c",
        "import sys; from torch_arena._bench import _child; sys.exit(_child(sys.argv[1]))",
        json.dumps(dataclasses.asdict(cfg)),
    ]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    sampler = _PssSampler(proc.pid, pss_interval)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        sampler.peak_mb(0, 0)
        return Result(cfg.kind, cfg.size_mib, cfg.transport, skipped=f"timed out after {timeout:.0f} s")
    except BaseException:  # e.g. Ctrl-C: take the configuration's processes along
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sampler.peak_mb(0, 0)
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        return Result(cfg.kind, cfg.size_mib, cfg.transport, skipped=f"failed (rc {proc.returncode}): {tail}")
    raw = json.loads(line[len("RESULT ") :])
    peak = sampler.peak_mb(raw["began"], raw["ended"])
    wall = time.monotonic() - started
    result = summarize(cfg, raw, peak, wall)
    foreign = (_machine_busy() - busy0) - (_cpu_self() - self0) - (_cpu_children() - tree0)
    result.noise_pct = max(0.0, 100 * foreign / (wall * (os.cpu_count() or 1)))
    return result


def summarize(cfg: Config, raw: dict[str, Any], peak_pss_mb: float, wall_s: float) -> Result:
    """Per-batch figures from one child's raw measurements."""
    rates = raw["rates"]
    n = len(rates)
    mean = statistics.mean(rates)
    half = t95(n) * statistics.stdev(rates) / math.sqrt(n) if n > 1 else 0.0
    batches = n * raw["per_window"]
    mb = raw["batch_bytes"] / 1e6
    memcpy = raw["memcpy"]
    total_live = raw["worker_total_live"]
    return Result(
        kind=cfg.kind,
        size_mib=cfg.size_mib,
        transport=cfg.transport,
        batch_bytes=raw["batch_bytes"],
        batches=batches,
        items_per_s=mean,
        mb_per_s=mean * mb,
        mb_per_s_lo=(mean - half) * mb,
        mb_per_s_hi=(mean + half) * mb,
        main_cpu_ms=raw["main_cpu"] / batches * 1e3,
        worker_cpu_ms=raw["worker_cpu"] / batches * 1e3,
        worker_cpu_check=raw["worker_total_rusage"] / total_live if total_live else float("nan"),
        memcpy_ms=memcpy * 1e3,
        memcpy_gbps=raw["batch_bytes"] / memcpy / 1e9,
        memcpy_shared_ms=raw["memcpy_shared"] * 1e3,
        peak_pss_mb=peak_pss_mb,
        arena_batches=raw.get("arena_batches", 0),
        fallbacks=raw.get("fallbacks", 0),
        arena_high_water=raw.get("high_water", 0),
        wait_ms=raw["wait"] / batches * 1e3,
        step_cpu_ms=raw["step_cpu"] / batches * 1e3,
        touch_ms=raw["touch_cpu"] / batches * 1e3,
        step_ms=cfg.step_ms,
        wall_s=wall_s,
    )


def attach_dataset_cost(results: list[Result]) -> None:
    """Fill ``dataset_ms``, ``worker_xfer_ms`` and the memcpy ratio from the
    ``dataset-only`` row of the same kind and size (0 if there is none)."""
    cost = {r.key: r.worker_cpu_ms for r in results if r.transport == DATASET_ONLY and not r.skipped}
    for r in results:
        if r.skipped or r.transport == DATASET_ONLY:
            continue
        if r.key in cost:
            r.dataset_ms = cost[r.key]
            r.worker_xfer_ms = r.worker_cpu_ms - r.dataset_ms
            r.xfer_memcpy_ratio = r.worker_xfer_ms / r.memcpy_ms if r.memcpy_ms else float("nan")


def default_per_window(size_mib: float, window_mib: float, minimum: int = 8) -> int:
    """Batches per timed window: about ``window_mib`` of payload."""
    return max(minimum, round(window_mib / size_mib))


def build_matrix(
    kinds: Sequence[str],
    sizes: Sequence[float],
    transports: Sequence[str],
    *,
    window_mib: float,
    windows: int,
    **fields: Any,
) -> tuple[list[Config], list[str]]:
    """The configurations to run, and notes on what was left out and why.

    ``fields`` are further :class:`Config` fields, the same for every configuration.
    """
    notes = []
    if "packets" in kinds and (why := packets_skip_reason()):
        kinds = [k for k in kinds if k != "packets"]
        notes.append(f"packets skipped: {why}")
    if SPDL in transports and (why := spdl_skip_reason()):
        transports = [t for t in transports if t != SPDL]
        notes.append(f"{SPDL} skipped: {why}")
    configs = []
    for kind in kinds:
        for size in sizes:
            for transport in transports:
                if transport == SPDL and samples_per_batch(kind) > 1:
                    continue  # SPDL's peer row is for per-item payloads
                per_window = default_per_window(size, window_mib)
                configs.append(Config(kind, size, transport, per_window, windows, **fields))
    if SPDL in transports and any(samples_per_batch(k) > 1 for k in kinds):
        notes.append(f"{SPDL} is run for per-item payloads only (no collated rows)")
    return configs, notes


def run_matrix(
    configs: Sequence[Config],
    *,
    pss_interval: float = 0.1,
    progress: Callable[[str], None] | None = print,
    max_noise: float = float("inf"),
    retries: int = 0,
    previous: Sequence[Result] = (),
) -> list[Result]:
    """Run every configuration, each in its own process, one after another.

    A configuration during which other processes used more than ``max_noise``
    percent of the machine runs again, up to ``retries`` times; the quietest
    run is kept. A quiet enough result in ``previous`` (an earlier run read
    back with :func:`read_csv`) is kept instead of running its configuration.
    """
    kept = {(*r.key, r.transport): r for r in previous if not r.skipped and r.noise_pct <= max_noise}
    results = []
    for i, cfg in enumerate(configs, 1):
        old = kept.get((cfg.kind, cfg.size_mib, cfg.transport))
        if old is not None:
            results.append(old)
            if progress is not None:
                progress(f"[{i}/{len(configs)}] {cfg.label}: kept from the earlier run (noise {old.noise_pct:.0f}%)")
            continue
        runs = [run_config(cfg, pss_interval=pss_interval)]
        while not runs[-1].skipped and runs[-1].noise_pct > max_noise and len(runs) <= retries:
            if progress is not None:
                busy = runs[-1].noise_pct
                progress(f"[{i}/{len(configs)}] {cfg.label}: noisy ({busy:.0f}% of the machine busy elsewhere), again")
            runs.append(run_config(cfg, pss_interval=pss_interval))
        r = min(runs, key=lambda r: (bool(r.skipped), r.noise_pct))
        results.append(r)
        if progress is not None:
            if r.skipped:
                progress(f"[{i}/{len(configs)}] {cfg.label}: {r.skipped}")
            else:
                progress(
                    f"[{i}/{len(configs)}] {cfg.label}: {r.mb_per_s:.0f} MB/s, main "
                    f"{r.main_cpu_ms:.2f} ms, workers {r.worker_cpu_ms:.1f} ms per batch, "
                    f"peak {r.peak_pss_mb:.0f} MB, noise {r.noise_pct:.0f}% ({r.wall_s:.1f} s)"
                )
    attach_dataset_cost(results)
    return results


# -- reporting ----------------------------------------------------------------------


def _fmt(value: float, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _speedups(results: Sequence[Result]) -> dict[tuple[str, float, str], float]:
    stock = {r.key: r.mb_per_s for r in results if r.transport == "stock" and not r.skipped}
    return {
        (*r.key, r.transport): r.mb_per_s / stock[r.key]
        for r in results
        if not r.skipped and r.key in stock and stock[r.key] and r.transport != DATASET_ONLY
    }


def format_table(results: Sequence[Result]) -> str:
    """The A/B table: one line per configuration."""
    speed = _speedups(results)
    head = (
        f"{'kind':<9}{'MiB':>4} {'transport':<13}{'MB/s':>7} {'95% CI':>13} {'x stock':>7} "
        f"{'main ms':>8} {'wrk ms':>7} {'data ms':>8} {'xfer ms':>8} {'x cp':>5} {'x cp2':>5} "
        f"{'peak MB':>8} {'fb':>3} {'noise':>5}"
    )
    lines = [head, "-" * len(head)]
    order = {t: i for i, t in enumerate(ALL_TRANSPORTS)}
    kinds = {k: i for i, k in enumerate(KINDS)}
    for r in sorted(results, key=lambda r: (kinds.get(r.kind, 99), r.size_mib, order.get(r.transport, 99))):
        if r.skipped:
            lines.append(f"{r.kind:<9}{r.size_mib:>4g} {r.transport:<13}{r.skipped}")
            continue
        ci = f"{r.mb_per_s_lo:.0f}-{r.mb_per_s_hi:.0f}"
        lines.append(
            f"{r.kind:<9}{r.size_mib:>4g} {r.transport:<13}{r.mb_per_s:>7.0f} {ci:>13} "
            f"{_fmt(speed.get((*r.key, r.transport), float('nan')), '.2f'):>7} "
            f"{r.main_cpu_ms:>8.2f} {r.worker_cpu_ms:>7.1f} {_fmt(r.dataset_ms, '.1f'):>8} "
            f"{_fmt(r.worker_xfer_ms, '.1f'):>8} {_fmt(r.xfer_memcpy_ratio, '.2f'):>5} "
            f"{_fmt(r.worker_xfer_ms / r.memcpy_shared_ms if r.memcpy_shared_ms else float('nan'), '.2f'):>5} "
            f"{_fmt(r.peak_pss_mb, '.0f'):>8} {r.fallbacks:>3} {_fmt(r.noise_pct, '.0f'):>4}%"
        )
    measured = [r for r in results if not r.skipped and r.memcpy_ms]
    if measured:
        alone = [r.memcpy_gbps for r in measured]
        shared = [r.batch_bytes / r.memcpy_shared_ms / 1e6 for r in measured]
        lines.append(
            f"memcpy (np.copyto into pre-faulted memory, measured in every config): median "
            f"{statistics.median(alone):.1f} GB/s alone (range {min(alone):.1f}-{max(alone):.1f}), "
            f"{statistics.median(shared):.1f} GB/s per core while {WORKERS} cores copy at once"
        )
    lines.append(
        "per batch: main = main-process CPU (all threads); wrk = CPU of all worker processes; "
        "data = wrk of the dataset-only run (making the payload); xfer = wrk - data; "
        "x cp = xfer / one memcpy of the batch; x cp2 = xfer / one memcpy while both cores "
        "copy; peak MB = peak memory of the process tree (PSS + shared-memory files, each "
        "page once); fb = arena fallbacks; noise = CPU used by other processes meanwhile, "
        "% of the machine"
    )
    return "\n".join(lines)


def _lookup(results: Sequence[Result]) -> dict[tuple[str, float, str], Result]:
    return {(*r.key, r.transport): r for r in results if not r.skipped}


def check_targets(results: Sequence[Result]) -> list[tuple[str, bool, str]]:
    """``(target, met, the numbers)`` for every target these results can judge."""
    by = _lookup(results)
    checks: list[tuple[str, bool, str]] = []
    top = max((r.size_mib for r in results), default=0)
    for kind, factor in (("numpy", 5.0), ("bytes", 5.0), ("torch", 2.0), (COLLATED_KIND, 2.0)):
        pool, stock = by.get((kind, top, "pool")), by.get((kind, top, "stock"))
        if pool and stock:
            ratio = pool.mb_per_s / stock.mb_per_s
            checks.append(
                (
                    f"pool >= {factor:g}x stock MB/s, {kind} {top:g} MiB",
                    ratio >= factor,
                    f"{pool.mb_per_s:.0f} vs {stock.mb_per_s:.0f} MB/s = {ratio:.2f}x",
                )
            )
    for (kind, size, transport), pool in sorted(by.items()):
        if transport != "pool":
            continue
        peer = by.get((kind, size, SPDL))
        if peer:
            ratio = pool.mb_per_s / peer.mb_per_s
            checks.append(
                (
                    f"pool >= 1.2x SPDL's pool, {kind} {size:g} MiB",
                    ratio >= 1.2,
                    f"{pool.mb_per_s:.0f} vs {peer.mb_per_s:.0f} MB/s = {ratio:.2f}x",
                )
            )
    for (kind, size, transport), pool in sorted(by.items()):
        if transport != "pool":
            continue
        checks.append(
            (
                f"pool main CPU <= 0.2 ms/batch, {kind} {size:g} MiB",
                pool.main_cpu_ms <= 0.2,
                f"{pool.main_cpu_ms:.3f} ms",
            )
        )
        if not math.isnan(pool.xfer_memcpy_ratio):
            checks.append(
                (
                    f"pool worker transfer CPU <= 1.3x memcpy, {kind} {size:g} MiB",
                    pool.xfer_memcpy_ratio <= 1.3,
                    (
                        f"{pool.worker_xfer_ms:.2f} ms = {pool.xfer_memcpy_ratio:.2f}x one memcpy "
                        f"({pool.memcpy_ms:.2f} ms)"
                    ),
                )
            )
        stock = by.get((kind, size, "stock"))
        if stock and not math.isnan(pool.peak_pss_mb) and not math.isnan(stock.peak_pss_mb):
            checks.append(
                (
                    f"pool peak memory <= stock's, {kind} {size:g} MiB",
                    pool.peak_pss_mb <= stock.peak_pss_mb,
                    f"{pool.peak_pss_mb:.0f} vs {stock.peak_pss_mb:.0f} MB",
                )
            )
    return checks


def format_targets(checks: Sequence[tuple[str, bool, str]]) -> str:
    if not checks:
        return "targets: none of the targets applies to these configurations"
    met = sum(ok for _, ok, _ in checks)
    lines = [f"targets: {met} of {len(checks)} met"]
    lines += [f"  {'met   ' if ok else 'MISSED'} {name}: {numbers}" for name, ok, numbers in checks]
    return "\n".join(lines)


def write_csv(results: Sequence[Result], path: str) -> None:
    """One row per configuration, one column per :class:`Result` field."""
    names = [f.name for f in dataclasses.fields(Result)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for r in results:
            writer.writerow(dataclasses.asdict(r))


def read_csv(path: str) -> list[Result]:
    """Results written by :func:`write_csv`."""
    types = {f.name: f.type for f in dataclasses.fields(Result)}
    convert = {"str": str, "int": int, "float": float}
    with open(path, newline="") as f:
        return [Result(**{k: convert[types[k]](v) for k, v in row.items()}) for row in csv.DictReader(f)]


_COLORS = {"stock": "#9e9e9e", "ring": "#f0a030", "pool": "#2a7ab9", SPDL: "#6a3d9a"}


def plot(results: Sequence[Result], path: str, title: str = "") -> None:
    """One row per payload kind; columns throughput / CPU per batch / peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if not r.skipped and r.transport in _COLORS]
    kinds = [k for k in KINDS if any(r.kind == k for r in shown)]
    if not kinds:
        return
    by = _lookup(shown)
    transports = [t for t in _COLORS if any(r.transport == t for r in shown)]
    fig, axes = plt.subplots(len(kinds), 3, figsize=(13, 2.7 * len(kinds) + 0.8), squeeze=False)
    width = 0.8 / len(transports)
    for row, kind in enumerate(kinds):
        sizes = sorted({r.size_mib for r in shown if r.kind == kind})
        for j, transport in enumerate(transports):
            xs, mbs, err, main, work, mem = [], [], [], [], [], []
            for i, size in enumerate(sizes):
                r = by.get((kind, size, transport))
                if r is None:
                    continue
                per_gb = 1e9 / r.batch_bytes / 1e3  # ms per batch -> s per GB moved
                xs.append(i + (j - (len(transports) - 1) / 2) * width)
                mbs.append(r.mb_per_s)
                err.append(max(0.0, r.mb_per_s - r.mb_per_s_lo))
                main.append(r.main_cpu_ms * per_gb)
                work.append(r.worker_cpu_ms * per_gb)
                mem.append(r.peak_pss_mb)
            color = _COLORS[transport]
            axes[row, 0].bar(xs, mbs, width, yerr=err, color=color, label=transport, capsize=2)
            axes[row, 1].bar(xs, work, width, color=color, alpha=0.55)
            axes[row, 1].bar(xs, main, width, bottom=work, color=color, hatch="///", edgecolor="k", lw=0)
            axes[row, 2].bar(xs, mem, width, color=color)
        for col, ylabel in enumerate(("MB/s (higher is better)", "CPU s per GB moved", "peak memory MB")):
            ax = axes[row, col]
            ax.set_xticks(range(len(sizes)), [f"{s:g} MiB" for s in sizes])
            ax.set_ylabel(ylabel)
            ax.grid(axis="y", alpha=0.3)
        axes[row, 0].set_title(kind, loc="left", fontweight="bold")
    axes[0, 0].legend(fontsize=8, loc="upper left")
    axes[0, 1].set_title("CPU: workers (light) + main process (hatched)", fontsize=9)
    axes[0, 2].set_title("peak memory of the process tree (PSS + shm files)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_line() -> str:
    """Cores, CPU model and library versions, for the report."""
    import platform

    import torch

    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, "
        f"torch {torch.__version__}, numpy {np.__version__}, {WORKERS} workers, start method fork"
    )


def report(
    results: Sequence[Result],
    out_dir: str,
    name: str,
    notes: Sequence[str] = (),
    table: Callable[[Sequence[Result]], str] = format_table,
    targets: bool = True,
) -> str:
    """Write ``<name>.csv``, ``<name>.png`` and ``<name>.txt`` under ``out_dir``;
    return the text (machine, table, targets, notes)."""
    os.makedirs(out_dir, exist_ok=True)
    parts = [machine_line(), table(results)]
    if targets:
        parts.append(format_targets(check_targets(results)))
    text = "\n".join([*parts, *notes])
    write_csv(results, os.path.join(out_dir, f"{name}.csv"))
    with open(os.path.join(out_dir, f"{name}.txt"), "w") as f:
        f.write(text + "\n")
    plot(results, os.path.join(out_dir, f"{name}.png"), title=machine_line())
    return text


#: What ``--quick`` runs unless told otherwise (also ``python -m torch_arena demo``).
QUICK: dict[str, Any] = {
    "kinds": ["bytes", "numpy", "torch", COLLATED_KIND],
    "sizes": [32.0],
    "window_mib": 256.0,
    "windows": 3,
}
#: The full matrix.
FULL: dict[str, Any] = {
    "kinds": list(KINDS),
    "sizes": [float(s) for s in SIZES_MIB],
    "window_mib": 512.0,
    "windows": 5,
}


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Command-line flags shared by the benchmark entry points."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--out", default="bench-out", help="output directory (default: bench-out/)")
    p.add_argument("--quick", action="store_true", help="a short matrix (32 MiB, shorter windows)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=None)
    p.add_argument("--sizes", nargs="+", type=float, default=None, help="batch sizes in MiB")
    p.add_argument("--transports", nargs="+", choices=ALL_TRANSPORTS, default=None)
    p.add_argument("--window-mib", type=float, default=None, help="payload per timed window")
    p.add_argument("--windows", type=int, default=None, help="timed windows per configuration")
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--slots", type=int, default=0, help="arena units (default: the loader's own)")
    p.add_argument("--item-sleep-ms", type=float, default=0.0, help="the dataset sleeps this long per item")
    p.add_argument("--pss-interval", type=float, default=0.1, help="seconds between memory samples")
    p.add_argument(
        "--max-noise",
        type=float,
        default=10.0,
        help="run a configuration again when other processes used more than this %% of the machine",
    )
    p.add_argument("--retries", type=int, default=2, help="how often a noisy configuration runs again")
    p.add_argument(
        "--resume",
        metavar="CSV",
        help="keep the quiet results of an earlier run's CSV; run only what is missing or noisy",
    )
    return p


def cli(
    argv: list[str] | None,
    *,
    prog: str,
    name: str,
    description: str,
    defaults: dict[str, Any] | None = None,
    table: Callable[[Sequence[Result]], str] = format_table,
    targets: bool = True,
    **fields: Any,
) -> tuple[list[Result], argparse.Namespace]:
    """Parse flags, run the matrix with a progress line per configuration, print
    and write the report (``<out>/<name>.csv/.png/.txt``). ``defaults`` replace
    :data:`FULL`'s entries; ``fields`` are passed to every :class:`Config`."""
    args = parser(prog, description).parse_args(argv)
    # A terminated run takes the running configuration's processes along
    # (run_config kills its process group on the way out).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    base = {**FULL, **(QUICK if args.quick else {}), **(defaults or {})}
    if args.quick:  # shorter windows whatever the matrix
        base.update(window_mib=QUICK["window_mib"], windows=QUICK["windows"])
    configs, notes = build_matrix(
        args.kinds or base["kinds"],
        args.sizes or base["sizes"],
        args.transports or base.get("transports", list(ALL_TRANSPORTS)),
        window_mib=args.window_mib or base["window_mib"],
        windows=args.windows or base["windows"],
        workers=args.workers,
        slots=args.slots,
        item_sleep_ms=args.item_sleep_ms,
        **fields,
    )
    print(f"{len(configs)} configurations, each in a fresh process; {machine_line()}", flush=True)
    results = run_matrix(
        configs,
        pss_interval=args.pss_interval,
        progress=lambda s: print(s, flush=True),
        max_noise=args.max_noise,
        retries=args.retries,
        previous=read_csv(args.resume) if args.resume else (),
    )
    print(report(results, args.out, name, notes, table, targets))
    print(f"wrote {os.path.join(args.out, name)}.csv, {name}.txt and the figure {os.path.join(args.out, name)}.png")
    return results, args


def main(argv: list[str] | None = None, *, prog: str = "python -m torch_arena bench") -> int:
    """The full A/B transport benchmark: table on stdout, CSV and PNG in ``--out``."""
    results, _ = cli(
        argv,
        prog=prog,
        name="transport",
        description="A/B transport benchmark: torch's DataLoader transport vs the ring and the pool",
    )
    return 0 if all(not r.skipped for r in results) else 1
