"""ArenaDataLoader over its life: iterators across forks, arenas rebuilt, settings honoured."""

from __future__ import annotations

import gc
import sys
import threading
import warnings

import pytest
import torch
from torch.utils.data import Dataset

import torch_arena as ta
from test_dataloader import SMALL_BUDGET, Samples


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


_restored_in: list[str] = []


class ThreadProbe:
    """Records the thread that unpickles it: the thread that restores its batch."""

    def __reduce__(self):
        return (_probe_restored, ())


def _probe_restored() -> ThreadProbe:
    _restored_in.append(threading.current_thread().name)
    return ThreadProbe()


def _probe_collate(items: list) -> dict:
    batch = torch.utils.data.default_collate(items)
    batch["probe"] = ThreadProbe()
    return batch


def test_pin_memory_restores_in_the_thread_that_reads_the_queue():
    """With an accelerator torch's pin-memory thread reads the worker queue, so
    it restores; without one torch turns pinning off (with a warning) and the
    main thread does."""
    _restored_in.clear()
    loader = ta.ArenaDataLoader(
        Samples(), batch_size=4, num_workers=2, pin_memory=True, collate_fn=_probe_collate, arena_budget=SMALL_BUDGET
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        it = iter(loader)
        labels = [int(x) for b in it for x in b["label"]]
    assert labels == list(range(24))
    assert loader.arena_stats.batches == 6
    if it._pin_memory:
        expected = it._pin_memory_thread.name
    else:
        expected = threading.main_thread().name
        assert any("pin_memory" in str(w.message) for w in record)
    assert _restored_in == [expected] * 6
