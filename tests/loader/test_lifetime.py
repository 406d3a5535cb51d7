"""An arena's memory goes back to the system once nothing in the process uses it."""

from __future__ import annotations

import gc
import os

import numpy as np
import torch

import torch_arena as ta
from torch_arena._arena.leases import flush as flush_leases


def arena_files_held() -> int:
    """Descriptors and mappings of torch_arena memory files in this process,
    once garbage is collected and the lease reaper has released what died
    (earlier tests' arenas may still be on their way out)."""
    gc.collect()
    flush_leases()
    gc.collect()
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds += "memfd:torch_arena" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    with open("/proc/self/maps") as maps:
        mapped = sum("memfd:torch_arena" in line for line in maps)
    return fds + mapped


class Items(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((1000, 100), float(i))


def test_closed_arenas_release_their_memory():
    before = arena_files_held()
    for _ in range(2):
        pool = ta.SharedMemorySegmentPool(1 << 20, 4)
        ring = ta.SharedMemoryRingBuffer(1 << 20)
        kept = [ta.restore(ta.offload(np.ones(100000), a.open_writer()), a.open_reader()) for a in (pool, ring)]
        pool.close()
        ring.close()
        assert arena_files_held() > before  # the kept pool view still maps its arena
        del pool, ring, kept
        gc.collect()
    assert arena_files_held() == before


def test_released_loader_arenas_release_their_memory():
    before = arena_files_held()
    for arena in ("pool", "ring"):
        loader = ta.ArenaDataLoader(Items(), batch_size=2, num_workers=2, arena=arena, arena_budget=8 << 20)
        assert sum(1 for _ in loader) == 4
        loader.release_arena()
        del loader
        gc.collect()
    assert arena_files_held() == before
