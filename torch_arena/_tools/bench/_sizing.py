"""The sizing benchmark's measurements, run in a fresh child process each
(:func:`~torch_arena._tools.bench._run.run_child`).

Three transports: ``stock`` (``arena=None``, torch's own), ``fixed`` (0.1.0's
default pool: ``SharedMemorySegmentPool(64 MiB, 6)``, one segment per batch the
loader keeps in flight or held) and ``elastic`` (today's default,
``arena="pool"``: :class:`~torch_arena.SharedMemoryElasticPool`). 2 workers,
``prefetch_factor=2``, fork.

* :func:`measure_size`: one batch size (or ``var``: padded sequences of a
  random length per batch): main-process CPU and wall time from building the
  loader (and the fixed pool, which 0.1.0 made at ``iter()``) to the first
  batch, then the steady state (:func:`~torch_arena._tools.bench._measure._timed_windows`),
  fallbacks, committed memory against bytes in flight + held;
* :func:`measure_epoch`: one short epoch, start-up included (``startup``), or
  a loop that keeps every batch (``keep``, ``list(loader)``);
* :func:`measure_epochs`: committed memory after each of several epochs of
  different batch sizes on one loader (``shrink``, ``var``).
"""

from __future__ import annotations

import gc
import time
from typing import Any

import numpy as np

from ._config import _ENDLESS, MiB, PREFETCH, WORKERS, Config
from ._measure import _cpu_of, _cpu_self, _timed_windows, memcpy_seconds
from ._payloads import PayloadDataset

TRANSPORTS = ("stock", "fixed", "elastic")
#: ``arena="ring"`` with default settings (the elastic ring, copy-out): on request (``--transports``).
RING = "ring"
#: The stock loader sending ``0`` for every batch: the floor a transport cannot beat.
FLOOR = "floor"
#: 0.1.0's default pool: ``arena_budget // slots`` = 64 MiB per slot, 6 slots.
FIXED_SEGMENT, FIXED_COUNT = 64 << 20, 6
#: Batch sizes of the sizing matrix (MiB; ``var``: padded sequences).
SIZES: tuple[float | str, ...] = (1 / 16, 1.0, 32.0, 160.0, 600.0, "var")
VAR = "var"
#: Padded sequences: 16 sequences of 256 float32 features per step; the
#: batch's longest sequence is log-uniform in [VAR_MIN_LEN, VAR_MAX_LEN] steps
#: (2 to 256 MiB per batch), the others uniform in [half of it, all of it].
VAR_BATCH, VAR_FEATURES, VAR_MIN_LEN, VAR_MAX_LEN = 16, 256, 128, 16384


class ArrayDataset:
    """``length`` items of one float32 array of ``nbytes``, made in the process
    that builds the loader (forked workers share it; nothing is made per item).
    ``resize`` changes the size for the next epoch."""

    def __init__(self, nbytes: int, length: int) -> None:
        self.length = length
        self.resize(nbytes)

    def resize(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.array = np.ones(max(1, nbytes // 4), dtype=np.float32)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> np.ndarray:
        return self.array


class PaddedSequenceDataset:
    """Each item is a whole batch of padded sequences (``batch_size=None``):
    ``{"x": float32 [VAR_BATCH, T, VAR_FEATURES], "lengths": int64 [VAR_BATCH]}``,
    zeros past each length, ``T`` random per batch (seeded by the index)."""

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length, self.seed = length, seed
        self.source = np.random.default_rng(seed).standard_normal((VAR_MAX_LEN, VAR_FEATURES), dtype=np.float32)

    def __len__(self) -> int:
        return self.length

    @staticmethod
    def lengths(index: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng((seed, index))
        top = int(np.exp(rng.uniform(np.log(VAR_MIN_LEN), np.log(VAR_MAX_LEN))))
        lengths = rng.integers(top // 2, top + 1, VAR_BATCH)
        lengths[0] = top
        return lengths

    @classmethod
    def batch_bytes(cls, index: int, seed: int = 0) -> int:
        return VAR_BATCH * int(cls.lengths(index, seed).max()) * VAR_FEATURES * 4

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        lengths = self.lengths(index, self.seed)
        x = torch.zeros(VAR_BATCH, int(lengths.max()), VAR_FEATURES)
        src = torch.from_numpy(self.source)
        for row, n in enumerate(lengths):
            x[row, :n] = src[:n]
        return {"x": x, "lengths": torch.from_numpy(lengths)}


def make_arena(transport: str) -> Any:
    """The ``arena=`` argument of ``transport``."""
    if transport == "stock":
        return None
    if transport == "fixed":
        from torch_arena._arena.segment_pool import SharedMemorySegmentPool

        return SharedMemorySegmentPool(FIXED_SEGMENT, FIXED_COUNT)
    if transport == "elastic":
        return "pool"
    if transport == RING:
        return "ring"
    raise ValueError(f"unknown transport {transport!r}")


def make_loader(dataset: Any, transport: str, batch_size: int | None = None) -> tuple[Any, Any]:
    """``(loader, arena)``: 2 workers, the transport's arena, defaults otherwise.
    ``floor``: the stock loader whose collate function drops every batch (sends
    ``0``): start-up, making the batches and shut-down, nothing moved."""
    from torch_arena._loader.dataloader import ArenaDataLoader
    from ._measure import _drop_batch

    arena = make_arena("stock" if transport == FLOOR else transport)
    loader = ArenaDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=WORKERS,
        prefetch_factor=PREFETCH,
        arena=arena,
        collate_fn=_drop_batch if transport == FLOOR else None,
    )
    return loader, arena


def close_loader(loader: Any, arena: Any) -> None:
    """Stop the workers, free the loader's arena and a user-made one."""
    loader.release_arena()
    if not isinstance(arena, (str, type(None))):
        arena.close()


def record_waits(loader: Any) -> list[float]:
    """Per-batch producer waits (seconds) as the session receives batches; call
    after ``iter()``. (``arena_stats.wait_seconds`` only holds their sum.)"""
    session = loader._torch_arena.session
    waits: list[float] = []
    if session is None:
        return waits
    receive, fallback = session.receive, session.receive_fallback

    def on_receive(envelope: bytes, nbytes: int, wait_seconds: float) -> Any:
        waits.append(wait_seconds)
        return receive(envelope, nbytes, wait_seconds)

    def on_fallback(batch: Any, reason: str, wait_seconds: float) -> Any:
        waits.append(wait_seconds)
        return fallback(batch, reason, wait_seconds)

    session.receive, session.receive_fallback = on_receive, on_fallback
    return waits


def arena_figures(loader: Any, transport: str) -> dict[str, Any]:
    """Fallbacks and memory figures of a loader's arena (zeros for stock)."""
    stats = loader.arena_stats
    out = {
        "arena_batches": stats.batches,
        "fallbacks": stats.fallbacks,
        "wait_s": stats.wait_seconds,
        "bytes_high_water": stats.high_water_bytes,
        "units_high_water": stats.high_water_units,
        "committed_now": stats.committed_bytes,
        "committed_high_water": stats.committed_high_water,
        "fallback_reason": stats.last_fallback_reason[:300],
    }
    session = loader._torch_arena.session
    if transport in ("elastic", RING) and session is not None:
        out["committed_kernel"] = session.arena.usage()["committed_bytes"]  # st_blocks, now
    if transport == RING:  # the copies live in this process's recycled private buffers
        from torch_arena._arena.private import process_buffers

        private = process_buffers().stats()
        out.update(
            private_kept=private["busy_bytes"] + private["free_bytes"],
            private_fresh=private["fresh"],
            private_reused=private["reused"],
        )
    return out


def _size_dataset(size: float | str) -> tuple[Any, int]:
    if size == VAR:
        return PaddedSequenceDataset(_ENDLESS), 0
    nbytes = int(float(size) * MiB)
    return ArrayDataset(nbytes, _ENDLESS), nbytes


def per_window_for(size: float | str) -> int:
    """Batches per timed window: about 512 MiB, 2 to 1000 batches."""
    mib = 52.0 if size == VAR else float(size)  # var: about the mean batch
    return int(min(1000, max(2, round(512 / mib))))


def measure_size(p: dict[str, Any]) -> dict[str, Any]:
    """One (size, transport) of the sizing matrix; ``p``: ``size``, ``transport``,
    ``windows``, ``per_window``."""
    import psutil  # noqa: F401 - imported before any timing

    size, transport = p["size"], p["transport"]
    dataset, nbytes = _size_dataset(size)
    mean_bytes = nbytes or int(np.mean([PaddedSequenceDataset.batch_bytes(i) for i in range(256)]))
    reps = 3 if mean_bytes > (64 << 20) else 7
    memcpy = memcpy_seconds(mean_bytes, reps=reps)
    memcpy_shared = memcpy_seconds(mean_bytes, reps=reps, concurrent=WORKERS)
    gc.collect()
    cfg = Config("sizing", 0.0, transport, p["per_window"], p["windows"], min_window_s=p.get("min_window_s", 0.3))
    began = time.time()
    # From building the loader: 0.1.0's loader made (and fallocated) its fixed
    # pool at iter(); here the fixed pool is made by the benchmark, so it is timed.
    c0, t0 = _cpu_self(), time.perf_counter()
    loader, arena = make_loader(dataset, transport)
    try:
        it = iter(loader)
        first = next(it)
        first_wall, first_cpu = time.perf_counter() - t0, _cpu_self() - c0
        del first
        timed = _timed_windows(it, cfg, lambda: [w.pid for w in it._workers])
        stats = arena_figures(loader, transport)
    finally:
        close_loader(loader, arena)
    ended = time.time()
    batches = len(timed["rates"]) * timed["per_window"]
    if size == VAR:  # the timed batches' own sizes (sequential sampler)
        start = 1 + p["per_window"]
        mean_timed = float(np.mean([PaddedSequenceDataset.batch_bytes(i) for i in range(start, start + batches)]))
    else:
        mean_timed = float(nbytes)
    return {
        "size": size,
        "transport": transport,
        "batch_bytes": mean_timed,
        "batches": batches,
        "rates": timed["rates"],
        "main_cpu_ms": timed["main_cpu"] / batches * 1e3,
        "worker_cpu_ms": timed["worker_cpu"] / batches * 1e3,
        "memcpy_ms": memcpy * 1e3 * mean_timed / mean_bytes,
        "memcpy_shared_ms": memcpy_shared * 1e3 * mean_timed / mean_bytes,
        "first_wall_ms": first_wall * 1e3,
        "first_cpu_ms": first_cpu * 1e3,
        "began": began,
        "ended": ended,
        **stats,
    }


def _epoch_dataset(case: str) -> tuple[Any, int | None, int]:
    """``(dataset, batch_size, bytes per batch)`` of an epoch scenario."""
    if case == "numpy32":  # 48 unbatched 32 MiB numpy items
        return PayloadDataset("numpy", 32 * MiB, 48), None, 32 * MiB
    if case == "torch4x8":  # 192 fresh 4 MiB tensors, collated by 8
        return PayloadDataset("torch", 4 * MiB, 192), 8, 32 * MiB
    if case == "keep32":  # 24 unbatched 32 MiB items, all kept
        return ArrayDataset(32 * MiB, 24), None, 32 * MiB
    raise ValueError(f"unknown epoch case {case!r}")


def measure_epoch(p: dict[str, Any]) -> dict[str, Any]:
    """One epoch from building the loader to the epoch's end (worker start and
    shut-down included);
    ``p``: ``case`` (see :func:`_epoch_dataset`), ``transport``; ``keep``: hold
    every batch until the epoch ends (``list(loader)``)."""
    import psutil  # noqa: F401

    dataset, batch_size, nbytes = _epoch_dataset(p["case"])
    gc.collect()
    began = time.time()
    c0, t0 = _cpu_self(), time.perf_counter()  # from building the loader (and a fixed pool)
    loader, arena = make_loader(dataset, p["transport"], batch_size)
    try:
        it = iter(loader)
        waits = record_waits(loader)
        pids = [w.pid for w in it._workers]
        kept, gaps, n = [], [], 0
        tb = time.perf_counter()
        for batch in it:
            gaps.append(time.perf_counter() - tb)
            n += 1
            if p.get("keep"):
                kept.append(batch)
            del batch
            tb = time.perf_counter()
        wall, main_cpu = time.perf_counter() - t0, _cpu_self() - c0
        worker_cpu = _cpu_of(pids)  # joined by now: 0, see worker_cpu_rusage
        stats = arena_figures(loader, p["transport"])
        del kept
    finally:
        close_loader(loader, arena)
    ended = time.time()
    return {
        "case": p["case"],
        "transport": p["transport"],
        "keep": bool(p.get("keep")),
        "batches": n,
        "bytes": n * nbytes,
        "wall_s": wall,
        "mb_per_s": n * nbytes / wall / 1e6,
        "main_cpu_ms": main_cpu * 1e3,
        "worker_cpu_live_ms": worker_cpu * 1e3,
        "max_wait_s": max(waits, default=0.0),
        "max_gap_s": max(gaps, default=0.0),
        "began": began,
        "ended": ended,
        **stats,
    }


def measure_epochs(p: dict[str, Any]) -> dict[str, Any]:
    """Epochs of changing batch sizes on one loader (one arena); the arena's
    committed memory (the kernel's count) after each. ``p``: ``case`` =
    ``shrink`` (``big_batches`` × 128 MiB, then ``small_epochs`` × ``small_batches``
    × 1 MiB) or ``var`` (``epochs`` × ``batches`` padded-sequence batches), and
    ``transport``."""
    case, transport = p["case"], p["transport"]
    if case == "shrink":
        dataset: Any = ArrayDataset(128 * MiB, p["big_batches"])
        plan = [(128 * MiB, p["big_batches"])] + [(MiB, p["small_batches"])] * p["small_epochs"]
    else:
        dataset = PaddedSequenceDataset(p["epochs"] * p["batches"])
        plan = [(0, p["batches"])] * p["epochs"]
    loader, arena = make_loader(dataset, transport)
    began = time.time()
    epochs = []
    try:
        for k, (nbytes, batches) in enumerate(plan):
            if case == "shrink":
                dataset.resize(nbytes)
                dataset.length = batches
            else:  # the next slice of the padded-sequence stream
                dataset.seed = k
            t0 = time.perf_counter()
            n = sum(1 for _ in loader)
            stats = arena_figures(loader, transport)
            epochs.append(
                {
                    "epoch": k,
                    "batch_bytes": nbytes,
                    "batches": n,
                    "wall_s": time.perf_counter() - t0,
                    "committed_after": stats.get("committed_kernel", stats["committed_now"]),
                    "committed_high_water": stats["committed_high_water"],
                    "bytes_high_water": stats["bytes_high_water"],
                    "fallbacks": stats["fallbacks"],
                }
            )
    finally:
        close_loader(loader, arena)
    return {"case": case, "transport": transport, "epochs": epochs, "began": began, "ended": time.time()}
