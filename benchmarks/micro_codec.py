"""Micro-benchmark: torch_arena offload + restore against pickle, in units of one memcpy.

For 1 / 8 / 32 MiB payloads (bytes, numpy array, torch tensor) this times, per
item and in one process:

* ``memcpy``: one ``np.copyto`` of the payload's bytes into a pre-faulted buffer,
  the floor any transport that copies the data once has to pay;
* ``pickle``: ``pickle.loads(pickle.dumps(obj, protocol=5))``;
* ``pool`` / ``ring``: ``ta.restore(ta.offload(obj, writer), reader)`` on a
  SharedMemorySegmentPool / SharedMemoryRingBuffer;
* ``restore`` alone, in microseconds.

Every figure is the median over the repetitions, and the first three are shown
as a ratio to the memcpy measured in the same run. Targets (reported, not
asserted): pool offload+restore <= 1.3x one memcpy, pool restore <= 50 us.

    python benchmarks/micro_codec.py            # full
    python benchmarks/micro_codec.py --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import gc
import pickle
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import torch_arena as ta

MiB = 1 << 20
POOL_TARGET = 1.3
RESTORE_TARGET_US = 50.0


def make_payload(kind: str, nbytes: int) -> tuple[Any, np.ndarray]:
    """The payload object and a flat uint8 view of its bytes (memcpy source)."""
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, nbytes, dtype=np.uint8)
    if kind == "bytes":
        obj: Any = raw.tobytes()
        return obj, np.frombuffer(obj, dtype=np.uint8)
    if kind == "numpy":
        obj = raw.view(np.float32).reshape(-1, 1024)
        return obj, obj.reshape(-1).view(np.uint8)
    if kind == "tensor":
        obj = torch.from_numpy(raw.copy()).view(torch.float32).reshape(-1, 1024)
        return obj, obj.numpy().reshape(-1).view(np.uint8)
    raise ValueError(kind)


def median_ns(fn: Callable[[], Any], reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples)


def time_memcpy(src: np.ndarray, reps: int) -> float:
    dst = np.empty_like(src)
    dst.fill(1)  # pre-fault every page
    return median_ns(lambda: np.copyto(dst, src), reps)


def time_pickle(obj: Any, reps: int) -> float:
    return median_ns(lambda: pickle.loads(pickle.dumps(obj, protocol=5)), reps)


def time_arena(arena: Any, obj: Any, reps: int, warmup: int = 2) -> tuple[float, float]:
    """Median (offload+restore, restore alone) in ns; every restored item is dropped at once."""
    w, r = arena.open_writer(), arena.open_reader()
    total, restore_only = [], []
    gc.collect()  # once: a collection inside the loop would flush the caches before every sample
    for k in range(warmup + reps):
        t0 = time.perf_counter_ns()
        env = ta.offload(obj, w)
        t1 = time.perf_counter_ns()
        out = ta.restore(env, r)
        t2 = time.perf_counter_ns()
        del out  # the pool segment goes back here, outside the timed region
        if k >= warmup:
            total.append(t2 - t0)
            restore_only.append(t2 - t1)
    return statistics.median(total), statistics.median(restore_only)


def run(sizes_mib: list[int], kinds: list[str], quick: bool) -> list[dict[str, Any]]:
    rows = []
    for size_mib in sizes_mib:
        nbytes = size_mib * MiB
        reps = max(3, (8 if quick else 40) // size_mib) if size_mib > 1 else (10 if quick else 60)
        pool = ta.SharedMemorySegmentPool(nbytes + MiB, 4, acquire_timeout=10.0)
        ring = ta.SharedMemoryRingBuffer(2 * (nbytes + MiB))
        try:
            for kind in kinds:
                obj, raw = make_payload(kind, nbytes)
                memcpy = time_memcpy(raw, reps)
                pick = time_pickle(obj, reps)
                pool_total, pool_restore = time_arena(pool, obj, reps)
                ring_total, ring_restore = time_arena(ring, obj, reps)
                rows.append(
                    dict(
                        payload=kind,
                        size=f"{size_mib} MiB",
                        memcpy_ms=memcpy / 1e6,
                        pickle_x=pick / memcpy,
                        pool_x=pool_total / memcpy,
                        ring_x=ring_total / memcpy,
                        pool_restore_us=pool_restore / 1e3,
                        ring_restore_us=ring_restore / 1e3,
                    )
                )
                del obj, raw
        finally:
            pool.close()
            ring.close()
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'payload':<8} {'size':>7} {'memcpy':>9} {'pickle':>8} {'pool':>8} {'ring':>8} "
        f"{'pool restore':>13} {'ring restore':>13}"
    )
    print(header)
    print(f"{'':<8} {'':>7} {'(ms)':>9} {'(x cp)':>8} {'(x cp)':>8} {'(x cp)':>8} {'(us)':>13} {'(us)':>13}")
    print("-" * len(header))
    for row in rows:
        flag = "" if row["pool_x"] <= POOL_TARGET and row["pool_restore_us"] <= RESTORE_TARGET_US else "  *"
        print(
            f"{row['payload']:<8} {row['size']:>7} {row['memcpy_ms']:>9.3f} {row['pickle_x']:>8.2f} "
            f"{row['pool_x']:>8.2f} {row['ring_x']:>8.2f} {row['pool_restore_us']:>13.1f} "
            f"{row['ring_restore_us']:>13.1f}{flag}"
        )
    print("-" * len(header))
    print(
        f"targets: pool offload+restore <= {POOL_TARGET}x one memcpy, pool restore <= "
        f"{RESTORE_TARGET_US:.0f} us  (* = row misses a target)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32], help="payload sizes in MiB")
    parser.add_argument(
        "--kinds", nargs="+", default=["bytes", "numpy", "tensor"], choices=["bytes", "numpy", "tensor"]
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch_arena {ta.__version__}, numpy {np.__version__}, torch {torch.__version__}")
    print_table(run(args.sizes, args.kinds, args.quick))


if __name__ == "__main__":
    main()
