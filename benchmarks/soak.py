"""Soak test: many batches through the pool and the ring, every byte checked.

    python benchmarks/soak.py                 # 10,000 batches per arena
    python benchmarks/soak.py --batches 2000
    python benchmarks/soak.py --quick         # a few hundred, for CI

For each arena (a user-owned ``SharedMemorySegmentPool`` and
``SharedMemoryRingBuffer`` passed as ``arena=``), an ``ArenaDataLoader`` with
persistent workers runs epoch after epoch until the batch count is reached:

* batch sizes are random (4 KiB to ``--max-batch-kib`` of tensor plus random
  bytes blobs), epochs are reshuffled, and some epochs are abandoned midway;
* every sample carries a deterministic pattern derived from its index and a
  CRC32 the worker computed; the training side checks both for every batch,
  and again when it lets go of a batch it kept (so a segment overwritten while
  a view of it lived would be caught);
* the training side keeps random batches for a random number of steps and
  lets them go out of order;
* RSS and PSS (``/proc/<pid>/smaps_rollup``) of the whole process tree are
  taken after warm-up (the first epoch), eight times during the run and at
  the end. The RSS sum must stay flat (within 48 MiB): a leaked batch, view
  or mapping would grow it. PSS is reported, not judged: it also rises while
  the workers' copy-on-write pages inherited from the parent become private,
  and moves with other processes that map the same libraries.

Exit status 0 when every check passed; the summary says how many batches fell
back to torch's default transport.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import zlib

import numpy as np
import psutil
import torch
from torch.utils.data import Dataset, Sampler

import torch_arena as ta

COLS = 256  # float32 columns: one row is 1 KiB, one sample row-block 4 KiB per batch row
BATCH = 4
GROWTH_LIMIT = 48 << 20  # allowed growth of the tree's RSS between warm-up and the end


def pattern(index: int, n: int) -> np.ndarray:
    """The ``n`` uint32 words sample ``index`` carries (a multiplicative hash)."""
    words = np.arange(n, dtype=np.uint32)
    words *= np.uint32(2654435761)
    words += np.uint32((index * 40503 + 12345) & 0xFFFFFFFF)
    return words


class SoakData(Dataset):
    """Samples whose size depends on their batch group; content on their index."""

    def __init__(self, groups: int, max_rows: int, seed: int) -> None:
        rng = random.Random(seed)
        self.rows = [rng.randint(1, max_rows) for _ in range(groups)]
        self.blob = [rng.randint(0, 16384) for _ in range(groups * BATCH)]

    def __len__(self) -> int:
        return len(self.blob)

    def __getitem__(self, i: int) -> dict:
        x = pattern(i, self.rows[i // BATCH] * COLS)
        blob = pattern(i ^ 0x5A5A, (self.blob[i] + 3) // 4).tobytes()[: self.blob[i]]
        crc = zlib.crc32(blob, zlib.crc32(x))
        return {"idx": i, "x": torch.from_numpy(x.view(np.float32)), "blob": blob, "crc": crc}


class GroupBatches(Sampler):
    """Whole batch groups (equal shapes) in a new random order every epoch."""

    def __init__(self, groups: int, seed: int) -> None:
        self.groups, self.rng = groups, random.Random(seed)

    def __len__(self) -> int:
        return self.groups

    def __iter__(self):
        order = list(range(self.groups))
        self.rng.shuffle(order)
        for g in order:
            yield [g * BATCH + k for k in range(BATCH)]


def check(batch: dict, data: SoakData) -> None:
    """Verify every sample of ``batch`` (indices, shape, checksum, pattern)."""
    idx = batch["idx"].tolist()
    group = idx[0] // BATCH
    if idx != [group * BATCH + k for k in range(BATCH)]:
        raise AssertionError(f"batch holds samples {idx}, not one whole group")
    x = batch["x"]
    rows = data.rows[group]
    if tuple(x.shape) != (BATCH, rows * COLS):
        raise AssertionError(f"group {group}: shape {tuple(x.shape)}, expected {(BATCH, rows * COLS)}")
    words = x.numpy().view(np.uint32)
    for k, i in enumerate(idx):
        blob = bytes(batch["blob"][k])
        crc = zlib.crc32(blob, zlib.crc32(words[k]))
        if crc != int(batch["crc"][k]):
            raise AssertionError(f"sample {i}: checksum mismatch (data changed in transit or while held)")
        if words[k][0] != pattern(i, 1)[0] or len(blob) != data.blob[i]:
            raise AssertionError(f"sample {i}: carries another sample's data")


def tree_memory() -> tuple[int, int, int]:
    """(RSS sum, PSS sum, process count) of this process and all its children."""
    me = psutil.Process()
    rss = pss = count = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            rss += proc.memory_info().rss
            with open(f"/proc/{proc.pid}/smaps_rollup") as f:
                pss += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
            count += 1
        except (psutil.Error, OSError, StopIteration):
            continue
    return rss, pss, count


def mib(n: int) -> str:
    return f"{n / (1 << 20):8.1f} MiB"


def soak(kind: str, args: argparse.Namespace) -> dict:
    """Run one arena for ``args.batches`` batches; return its summary."""
    seed = args.seed + (0 if kind == "pool" else 1)
    rng = random.Random(seed)
    max_rows = args.max_batch_kib // (BATCH * COLS * 4 // 1024)
    data = SoakData(args.groups, max_rows, seed)
    unit = BATCH * (max_rows * COLS * 4 + 16384) + 64 * 1024  # tensor + blobs + alignment slack
    slots = args.workers * 2 + 2  # prefetch_factor 2 + the two batches the loop holds
    if kind == "pool":
        arena = ta.SharedMemorySegmentPool(unit, slots + args.max_held, acquire_timeout=10.0)
    else:
        arena = ta.SharedMemoryRingBuffer(unit * slots, acquire_timeout=10.0)
    loader = ta.ArenaDataLoader(
        data,
        batch_sampler=GroupBatches(args.groups, seed),
        num_workers=args.workers,
        persistent_workers=True,
        arena=arena,
        arena_timeout=10.0,
    )
    held: dict[int, list] = {}  # release step -> batches kept until then
    done = epochs = abandoned = rechecked = 0
    warm = None
    trace: list[tuple[int, int, int]] = []  # the tree's memory, eight times over the run
    next_trace = 0
    started = time.monotonic()
    while done < args.batches:
        epochs += 1
        stop_after = rng.randint(1, args.groups - 1) if rng.random() < 0.1 else None
        for n, batch in enumerate(loader):
            check(batch, data)
            done += 1
            if rng.random() < args.hold_probability and sum(map(len, held.values())) < args.max_held:
                held.setdefault(done + rng.randint(1, 40), []).append(batch)
            for step in [s for s in held if s <= done]:  # let go, out of order
                for kept in held.pop(step):
                    check(kept, data)
                    rechecked += 1
            del batch
            if warm is None and done >= args.warmup:
                warm = tree_memory()
                next_trace = done
            if warm is not None and done >= next_trace:
                trace.append(tree_memory())
                next_trace += max(1, (args.batches - args.warmup) // 8)
            if done >= args.batches:
                break
            if stop_after is not None and n + 1 >= stop_after:
                abandoned += 1  # persistent workers drop this epoch's in-flight batches
                break
    for kept in [b for batches in held.values() for b in batches]:
        check(kept, data)
        rechecked += 1
    held.clear()
    elapsed = time.monotonic() - started
    end = tree_memory()
    stats = loader.arena_stats
    loader.release_arena()  # stops the persistent workers
    arena.close()
    return {
        "kind": kind,
        "batches": done,
        "epochs": epochs,
        "abandoned": abandoned,
        "rechecked": rechecked,
        "arena_batches": stats.batches,
        "fallbacks": stats.fallbacks,
        "bytes": stats.bytes,
        "seconds": elapsed,
        "warm": warm or end,
        "end": end,
        "trace": trace + [end],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=10_000, help="batches per arena (default 10000)")
    parser.add_argument("--quick", action="store_true", help="a short run (300 batches per arena)")
    parser.add_argument("--arenas", default="pool,ring", help="comma-separated: pool, ring")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--groups", type=int, default=400, help="batches per full epoch")
    parser.add_argument("--max-batch-kib", type=int, default=1024, help="largest tensor per batch")
    parser.add_argument("--max-held", type=int, default=6, help="most batches kept at once")
    parser.add_argument("--hold-probability", type=float, default=0.15)
    parser.add_argument("--warmup", type=int, default=0, help="batches before the first memory reading")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.groups = min(args.batches, 300), min(args.groups, 120)
    # Warm-up: the first full epoch (at least a fifth of the run, at most half).
    args.warmup = args.warmup or max(1, min(args.batches // 2, max(args.groups, args.batches // 5)))
    print(
        f"soak: {args.batches} batches per arena, {args.workers} persistent workers, "
        f"{args.groups} batches per epoch, tensors up to {args.max_batch_kib} KiB per batch, "
        f"up to {args.max_held} kept; torch {torch.__version__}, pid {os.getpid()}",
        flush=True,
    )
    failed = False
    for kind in [k.strip() for k in args.arenas.split(",") if k.strip()]:
        try:
            r = soak(kind, args)
        except AssertionError as exc:
            print(f"{kind}: FAILED: {exc}", flush=True)
            failed = True
            continue
        (w_rss, w_pss, w_n), (e_rss, e_pss, e_n) = r["warm"], r["end"]
        growth = e_rss - w_rss
        flat = growth <= GROWTH_LIMIT
        failed |= not flat
        rss_trace = " ".join(f"{t[0] / (1 << 20):.0f}" for t in r["trace"])
        pss_trace = " ".join(f"{t[1] / (1 << 20):.0f}" for t in r["trace"])
        print(
            f"{kind}: {r['batches']} batches in {r['epochs']} epochs ({r['abandoned']} abandoned midway), "
            f"{r['seconds']:.1f} s, {r['bytes'] / r['seconds'] / 1e6:.0f} MB/s through the arena\n"
            f"  checksums: all {r['batches']} batches verified, {r['rechecked']} kept batches re-verified "
            f"when let go\n"
            f"  arena batches {r['arena_batches']}, fallbacks {r['fallbacks']}\n"
            f"  process tree ({w_n} processes) after warm-up: RSS {mib(w_rss)}  PSS {mib(w_pss)}\n"
            f"  process tree ({e_n} processes) at the end:    RSS {mib(e_rss)}  PSS {mib(e_pss)}\n"
            f"  RSS over the run (MiB): {rss_trace}\n"
            f"  PSS over the run (MiB): {pss_trace}\n"
            f"  RSS growth {mib(growth).strip()} (limit {mib(GROWTH_LIMIT).strip()}): "
            f"{'flat' if flat else 'GROWING'}",
            flush=True,
        )
    print("soak: FAILED" if failed else "soak: OK", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
