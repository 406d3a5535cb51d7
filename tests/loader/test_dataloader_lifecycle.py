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


# -- arenas rebuilt, settings honoured, statistics -------------------------------------------


def test_loader_rebuilds_its_arena_when_settings_change():
    loader = ta.ArenaDataLoader(Ones(), batch_size=2, num_workers=1, arena_budget=4 << 20)
    try:
        assert len(list(loader)) == 4
        first = loader._torch_arena.session.arena
        assert len(list(loader)) == 4
        assert loader._torch_arena.session.arena is first  # same settings: kept across iterators
        loader.arena_budget = 8 << 20
        assert len(list(loader)) == 4
        assert loader._torch_arena.session.arena is not first and first.closed  # the old one was freed
        assert loader._torch_arena.session.arena.capacity > first.capacity
        loader.arena = "ring"
        assert len(list(loader)) == 4
        assert isinstance(loader._torch_arena.session.arena, ta.SharedMemoryElasticRing)  # the self-sizing ring
    finally:
        loader.release_arena()


def test_loader_with_a_user_arena_that_was_closed_uses_its_replacement_clearly():
    arena = ta.SharedMemorySegmentPool(256 << 10, 6)
    loader = ta.ArenaDataLoader(Ones(), batch_size=2, num_workers=1, arena=arena)
    assert len(list(loader)) == 4 and loader.arena_stats.batches == 4
    arena.close()
    with pytest.raises(ValueError, match="is closed in this process"):
        list(loader)  # a closed user arena is not silently replaced
    replacement = ta.SharedMemorySegmentPool(256 << 10, 6)
    loader.arena = replacement
    assert len(list(loader)) == 4 and loader._torch_arena.session.arena is replacement
    loader.release_arena()
    assert not replacement.closed  # the user's arena stays the user's to close
    replacement.close()


def test_arena_threshold_reaches_the_workers():
    """Items of 16 KiB: with the default threshold they cross through the arena;
    with a threshold above them they travel inline (no payload bytes counted)."""
    for threshold, moved in ((4096, True), (1 << 20, False)):
        loader = ta.ArenaDataLoader(Ones(), batch_size=2, num_workers=1, arena_threshold=threshold)
        try:
            assert len(list(loader)) == 4
            stats = loader.arena_stats
            assert stats.batches == 4
            assert (stats.bytes == 4 * 2 * 4096 * 4) if moved else (stats.bytes == 0), stats
        finally:
            loader.release_arena()


def test_stats_count_waits_fallbacks_and_high_water():
    """A pool of 2 one-batch segments and a loop that keeps every batch: the
    workers wait (wait_seconds), then fall back (last_fallback_reason); the
    high-water marks are the pool's."""
    arena = ta.SharedMemorySegmentPool(64 << 10, 2)
    loader = ta.ArenaDataLoader(Ones(), batch_size=2, num_workers=1, arena=arena, arena_timeout=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ta.ArenaFallbackWarning)
        kept = list(loader)
    stats = loader.arena_stats
    assert len(kept) == 4 and stats.batches + stats.fallbacks == 4 and stats.fallbacks >= 1
    assert stats.wait_seconds >= 0.15, stats  # at least one worker waited out the 0.2 s timeout
    assert "no free segment" in stats.last_fallback_reason and "keep fewer" in stats.last_fallback_reason
    assert stats.high_water_units == 2
    assert stats.high_water_bytes == 2 * 2 * 4096 * 4  # two batches of 2 × 16 KiB, at once
    del kept
    loader.release_arena()
    arena.close()


def test_session_for_an_arena_not_open_here_says_what_to_do():
    from torch_arena._loader.session import session_for

    with pytest.raises(RuntimeError, match="not open in this process.*read by the process that created"):
        session_for(0x1234)
