"""One DataLoader job, run by ``memory_jobs.py`` inside a memory cgroup.

Usage: ``python cgroup_loader_child.py ARENA BATCH_MIB [--batches N] [--workers W] [--trace]``

``ArenaDataLoader(..., arena=ARENA)`` with default settings otherwise (ARENA
``stock`` is ``arena=None``: torch's own transport), ``W`` workers, batches of
8 float32 tensors of ``BATCH_MIB / 8`` MiB each; the loop reads every batch
(checks its first and last column, sums it) and drops it. Each stdout line
is one JSON event: ``start`` (pids, the arena's budget), ``batch`` (one per
batch read; with ``--trace`` the arena's memory then), then ``done`` or ``error`` (a Python exception: its type and
message). A process killed by a signal prints nothing more.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch
from torch.utils.data import Dataset

import torch_arena

MiB = 1 << 20
ITEMS_PER_BATCH = 8


class Items(Dataset):
    """Item ``i``: a float32 tensor of ``numel`` elements, all ``i``."""

    def __init__(self, n: int, numel: int) -> None:
        self.n, self.numel = n, numel

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((self.numel,), float(i), dtype=torch.float32)


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _arena_facts(loader: torch_arena.ArenaDataLoader) -> dict[str, object]:
    session = loader.__dict__["_torch_arena"].session
    if session is None:
        return {}
    return {"arena_describe": session.arena.describe(), "arena_budget": getattr(session.arena, "max_bytes", None)}


def _end_facts(loader: torch_arena.ArenaDataLoader, arena: str) -> dict[str, object]:
    if arena == "stock":
        return {}
    stats = loader.arena_stats
    facts: dict[str, object] = {
        "fallbacks": stats.fallbacks,
        "spilled": stats.spilled,
        "fallback_reason": stats.last_fallback_reason,
        "committed_high_water": stats.committed_high_water,
    }
    if arena == "ring":
        from torch_arena._arena.private import process_buffers

        facts["private_buffers"] = process_buffers().stats()
    return facts


def _trace(loader: torch_arena.ArenaDataLoader, arena: str) -> dict[str, object]:
    """The arena's bytes in use and committed, and this process's private
    buffers (diagnostics: reading them takes the arena's lock)."""
    if arena == "stock":
        return {}
    usage = loader.__dict__["_torch_arena"].session.arena.usage()
    facts: dict[str, object] = {"in_use": usage["bytes_in_use"], "committed": usage["committed_bytes"]}
    if arena == "ring":
        from torch_arena._arena.private import process_buffers

        facts.update(process_buffers().stats())
    return facts


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("arena", choices=["stock", "pool", "ring"])
    parser.add_argument("batch_mib", type=int)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--trace", action="store_true", help="the arena's memory in every batch event")
    parser.add_argument("--inline-restore", action="store_true",
                        help="experiment: no restore thread for the ring (restores run in next(), none ahead)")
    parser.add_argument("--no-private-cache", action="store_true",
                        help="experiment: the ring's private buffers are unmapped as soon as they are free")
    args = parser.parse_args()
    if args.inline_restore:
        import torch_arena._loader.iterators as iterators

        iterators.start_restore_thread = lambda iterator: None
    if args.no_private_cache:
        from torch_arena._arena import private

        def keep_nothing_free(self: private.PrivateBuffers) -> None:
            while self._free:
                self._free_bytes -= len(buf := self._free.pop())
                try:
                    buf.close()
                except BufferError:  # an export outlived its anchor
                    pass

        private.PrivateBuffers._trim = keep_nothing_free
    numel = args.batch_mib * MiB // ITEMS_PER_BATCH // 4
    dataset = Items(args.batches * ITEMS_PER_BATCH, numel)
    loader = torch_arena.ArenaDataLoader(
        dataset,
        batch_size=ITEMS_PER_BATCH,
        num_workers=args.workers,
        arena=None if args.arena == "stock" else args.arena,
    )
    read = 0
    warnings.simplefilter("ignore", torch_arena.ArenaFallbackWarning)  # counted in arena_stats
    try:
        iterator = iter(loader)
        emit("start", main=os.getpid(), workers=[w.pid for w in iterator._workers], **_arena_facts(loader))
        for batch in iterator:
            first = torch.arange(read * ITEMS_PER_BATCH, (read + 1) * ITEMS_PER_BATCH, dtype=torch.float32)
            if batch.shape != (ITEMS_PER_BATCH, numel) or not (
                torch.equal(batch[:, 0], first) and torch.equal(batch[:, -1], first)
            ):
                raise AssertionError(f"batch {read} holds the wrong data")
            float(batch.sum())  # read every byte
            del batch
            read += 1
            emit("batch", n=read, **(_trace(loader, args.arena) if args.trace else {}))
    except Exception as exc:  # noqa: BLE001 - reported, then a failing exit
        emit("error", type=type(exc).__name__, message=str(exc), batches=read, **_end_facts(loader, args.arena))
        return 1
    emit("done", batches=read, **_end_facts(loader, args.arena))
    return 0


if __name__ == "__main__":
    sys.exit(main())
