"""What one unit costs on each backend: one process, and through the loader.

One process: ``restore(offload(array, writer), reader)`` of a 64 KiB array,
dropped at once, ``--units`` times, on each of the four backends in turn;
CPU time per unit (``time.process_time``, every thread of the process). The
backends take turns round after round, so a noisy moment hits them all, and
the report gives each backend's median and the elastic/fixed ratios pair by
pair (the same round).

Through the loader (``--loader``): an ``ArenaDataLoader`` with 2 workers
moving 64 KiB batches, fixed pool (a ``SharedMemorySegmentPool`` sized for the
loader) against the elastic pool (``arena="pool"``), and torch's stock
transport for reference; main-process CPU per batch (``getrusage``, all
threads) over the batches after a warm-up.

    python benchmarks/unit_cost.py                 # one process, 5 rounds
    python benchmarks/unit_cost.py --loader        # and through the loader
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import torch_arena as ta

UNIT = 64 << 10
BACKENDS: dict[str, Callable[[], Any]] = {
    "fixed pool": lambda: ta.SharedMemorySegmentPool(1 << 20, 8),
    "elastic pool": lambda: ta.SharedMemoryElasticPool(256 << 20),
    "fixed ring": lambda: ta.SharedMemoryRingBuffer(8 << 20),
    "elastic ring": lambda: ta.SharedMemoryElasticRing(256 << 20),
}


def per_unit_us(arena: Any, units: int) -> float:
    """CPU microseconds per offload + restore + drop of one 64 KiB array."""
    writer, reader = arena.open_writer(), arena.open_reader()
    item = np.ones(UNIT, np.uint8)
    for _ in range(100):  # warm: memory committed, table views made
        ta.restore(ta.offload(item, writer), reader)
    start = time.process_time()
    for _ in range(units):
        out = ta.restore(ta.offload(item, writer), reader)
        del out
    return (time.process_time() - start) / units * 1e6


class _Items(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return np.full(UNIT, i % 251, np.uint8)


def loader_ms(arena: Any, batches: int) -> float:
    """Main-process CPU milliseconds per 64 KiB batch through an ArenaDataLoader."""
    loader = ta.ArenaDataLoader(_Items(batches + 200), batch_size=None, num_workers=2, arena=arena)
    iterator = iter(loader)
    for _ in range(200):
        next(iterator)
    before = resource.getrusage(resource.RUSAGE_SELF)
    count = 0
    for batch in iterator:
        count += 1
        del batch
    after = resource.getrusage(resource.RUSAGE_SELF)
    if hasattr(loader, "release_arena"):
        loader.release_arena()
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return cpu / count * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--units", type=int, default=3000)
    parser.add_argument("--loader", action="store_true", help="also measure through the loader")
    parser.add_argument("--batches", type=int, default=3000)
    args = parser.parse_args()

    rows: dict[str, list[float]] = {name: [] for name in BACKENDS}
    for _ in range(args.rounds):
        for name, make in BACKENDS.items():
            arena = make()
            rows[name].append(per_unit_us(arena, args.units))
            arena.close()
    print(f"one process, {UNIT >> 10} KiB units, CPU per unit (median of {args.rounds} rounds):")
    for name, values in rows.items():
        print(f"  {name:13s} {statistics.median(values):7.1f} us   (rounds: {', '.join(f'{v:.0f}' for v in values)})")
    for elastic, fixed in (("elastic pool", "fixed pool"), ("elastic ring", "fixed ring")):
        ratios = [e / f for e, f in zip(rows[elastic], rows[fixed])]
        print(f"  {elastic} / {fixed}: median {statistics.median(ratios):.2f} (rounds: "
              f"{', '.join(f'{r:.2f}' for r in ratios)})")

    if args.loader:
        slots = 2 * 2 + 2
        makes = {
            "stock": lambda: None,
            "fixed pool": lambda: ta.SharedMemorySegmentPool(UNIT + (64 << 10), slots),
            "elastic pool": lambda: "pool",
        }
        loader_rows: dict[str, list[float]] = {name: [] for name in makes}
        for _ in range(args.rounds):
            for name, make in makes.items():
                loader_rows[name].append(loader_ms(make(), args.batches))
        print(f"through the loader, 2 workers, {UNIT >> 10} KiB batches, main-process CPU per batch:")
        for name, values in loader_rows.items():
            print(f"  {name:13s} {statistics.median(values):7.3f} ms   (rounds: {', '.join(f'{v:.3f}' for v in values)})")
        ratios = [e / f for e, f in zip(loader_rows["elastic pool"], loader_rows["fixed pool"])]
        print(f"  elastic pool / fixed pool: median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
