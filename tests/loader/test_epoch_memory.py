"""Memory an elastic arena committed for earlier epochs goes back, whatever the epoch length."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torch_arena as ta

MiB = 1 << 20


class Sized(torch.utils.data.Dataset):
    """``n`` items of ``nbytes`` each (``nbytes`` set before each epoch: the
    workers are forked per epoch and see the value of the moment)."""

    def __init__(self, n: int) -> None:
        self.n, self.nbytes = n, MiB

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return np.full(self.nbytes, i % 251, np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("arena", ["pool", "ring"])
def test_memory_of_a_big_epoch_goes_back_within_two_short_epochs(arena):
    """6 batches of 128 MiB, then epochs of 6 batches of 1 MiB (default
    settings): at most 64 MiB committed after the second short epoch."""
    data = Sized(6)
    loader = ta.ArenaDataLoader(data, batch_size=None, num_workers=2, arena=arena)
    data.nbytes = 128 * MiB
    assert sum(1 for _ in loader) == 6
    big = loader.arena_stats.committed_high_water
    assert big >= 2 * 128 * MiB  # the big epoch really committed its batches
    data.nbytes = MiB
    committed = []
    for _ in range(3):
        for batch in loader:
            assert int(batch[0]) == int(batch[-1])
        del batch
        committed.append(loader.arena_stats.committed_bytes)
    assert committed[1] <= 64 * MiB and committed[2] <= 64 * MiB, (big, committed)
    loader.release_arena()


@pytest.mark.slow
def test_memory_goes_back_within_a_long_epoch():
    """In one long epoch, memory committed for big batches goes back within a
    bounded number of batches once they stop (two working-set windows)."""
    class Shrinking(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 70

        def __getitem__(self, i: int) -> np.ndarray:
            return np.full((64 if i < 6 else 1) * MiB, i % 251, np.uint8)

    loader = ta.ArenaDataLoader(Shrinking(), batch_size=None, num_workers=2, arena="pool")
    committed = []
    for i, batch in enumerate(loader):
        committed.append(loader.arena_stats.committed_bytes)
    del batch
    assert max(committed[:8]) >= 2 * 64 * MiB
    assert max(committed[6 + 2 * 16 + 8 :]) <= 64 * MiB, committed
    loader.release_arena()
