"""ArenaDataLoader over its life: iterators across forks, arenas rebuilt, settings honoured."""

from __future__ import annotations

import gc
import sys

import pytest
import torch
from torch.utils.data import Dataset

import torch_arena as ta


class Ones(Dataset):
    """``n`` items of 16 KiB each (above the default threshold)."""

    def __init__(self, n: int = 8) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((4096,), float(i))


def _collect_in_worker(worker_id: int) -> None:
    sys.unraisablehook = sys.__unraisablehook__  # print as a user's process would (not pytest's hook)
    gc.collect()  # whatever the fork copied as garbage is finalized here, in the worker


def test_iterator_alive_across_the_next_loaders_fork_is_not_shut_down_by_the_worker(capfd):
    """An iterator kept alive only by a reference cycle (say, an exception's
    traceback) when another loader forks: the worker's copy must not try to
    shut down workers that are not its children."""
    first = ta.ArenaDataLoader(Ones(), batch_size=2, num_workers=1)
    it = iter(first)
    assert next(it).shape == (2, 4096)
    cycle: list = [it]
    cycle.append(cycle)
    gc.disable()  # the cycle stays uncollected here, so the fork copies it as garbage
    try:
        del it, cycle
        second = ta.ArenaDataLoader(Ones(), batch_size=2, num_workers=1, worker_init_fn=_collect_in_worker)
        assert [b[0, 0].item() for b in second] == [0.0, 2.0, 4.0, 6.0]
    finally:
        gc.enable()
    gc.collect()  # here, in its own process, the first iterator does shut down
    err = capfd.readouterr().err
    assert "can only test a child process" not in err, err
    assert "Exception ignored" not in err, err
    first.release_arena()
    second.release_arena()
