"""ArenaDataLoader against the stock DataLoader: same batches, through the arena."""

from __future__ import annotations

import collections
import gc
import os
import pickle
import time
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, SequentialSampler
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

import torch_arena as ta

Pair = collections.namedtuple("Pair", "left right")
SMALL_BUDGET = 48 << 20


class Samples(Dataset):
    """Tensors, arrays, ints, strings and namedtuples, all derived from the index."""

    def __init__(self, n: int = 24) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return {
            "image": torch.full((3, 32, 32), float(i)),
            "mask": np.full((16, 16), i, dtype=np.int16),
            "label": i,
            "name": f"sample-{i}",
            "pair": Pair(torch.arange(1024) + i, np.float64(i) / 2),
            "bf16": torch.full((2048,), i, dtype=torch.bfloat16),
        }


class Stream(IterableDataset):
    def __init__(self, n: int = 20) -> None:
        self.n = n

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for i in range(wid, self.n, nw):
            yield {"x": torch.full((2048,), float(i)), "i": i}


class Failing(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        if i == 5:
            raise KeyError(f"no sample {i} here")
        return torch.full((4096,), float(i))


class Batch:
    """A user batch type produced by a custom collate_fn."""

    def __init__(self, data, labels):
        self.data, self.labels = data, labels


def custom_collate(items):
    return Batch(torch.stack([it["image"] for it in items]), [it["label"] for it in items])


def snapshot(obj):
    """Deep copy of a batch that owns its memory (so arena views can be freed)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, memoryview):
        return bytes(obj)
    if isinstance(obj, Batch):
        return Batch(snapshot(obj.data), list(obj.labels))
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(snapshot(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


def assert_same(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    elif isinstance(a, Batch):
        assert_same(a.data, b.data)
        assert a.labels == b.labels
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def collect(loader, epochs: int = 1):
    return [[snapshot(b) for b in loader] for _ in range(epochs)]


CASES = {
    "dict-samples": dict(dataset=Samples(), batch_size=4),
    "batch-none": dict(dataset=Samples(10), batch_size=None),
    "iterable": dict(dataset=Stream(), batch_size=3),
    "custom-collate": dict(dataset=Samples(), batch_size=5, collate_fn=custom_collate, drop_last=True),
    "batch-sampler": dict(dataset=Samples(), batch_sampler=BatchSampler(SequentialSampler(range(24)), 7, False)),
    "prefetch-timeout-init": dict(dataset=Samples(), batch_size=2, prefetch_factor=4, timeout=30, worker_init_fn=lambda wid: torch.manual_seed(wid)),
}


@pytest.mark.parametrize("arena", ["pool", "ring"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_batches_as_stock_and_through_the_arena(case, arena):
    kwargs = CASES[case]
    expected = collect(DataLoader(num_workers=2, **kwargs))
    loader = ta.ArenaDataLoader(num_workers=2, arena=arena, arena_budget=SMALL_BUDGET, **kwargs)
    got = collect(loader)
    assert len(got[0]) == len(expected[0]) > 0
    for a, b in zip(got[0], expected[0]):
        assert_same(a, b)
    stats = loader.arena_stats
    assert stats.batches == len(expected[0]) and stats.fallbacks == 0
    assert stats.bytes > 0


@pytest.mark.parametrize("arena", ["pool", "ring"])
def test_shuffle_with_generator_persistent_workers_and_epochs(arena):
    def make(cls, **extra):
        return cls(Samples(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7),
                   num_workers=2, persistent_workers=True, **extra)
    expected = collect(make(DataLoader), epochs=3)
    loader = make(ta.ArenaDataLoader, arena=arena, arena_budget=SMALL_BUDGET)
    got = collect(loader, epochs=3)
    for epoch_got, epoch_expected in zip(got, expected):
        for a, b in zip(epoch_got, epoch_expected):
            assert_same(a, b)
    assert loader.arena_stats.batches == 18 and loader.arena_stats.fallbacks == 0


def test_in_order_false_delivers_every_batch():
    loader = ta.ArenaDataLoader(Samples(), batch_size=3, num_workers=2, in_order=False, arena_budget=SMALL_BUDGET)
    labels = sorted(int(x) for b in loader for x in b["label"])
    assert labels == list(range(24))


def test_pool_batches_are_views_into_the_arena():
    pool = ta.SharedMemorySegmentPool(4 << 20, 8)
    loader = ta.ArenaDataLoader(Samples(), batch_size=4, num_workers=2, arena=pool)
    state = pool.file
    lo, hi = state.data_address, state.data_address + pool.count * (4 << 20)
    for batch in loader:
        ptr = batch["image"].untyped_storage().data_ptr()
        assert lo <= ptr < hi, "batch did not come through the pool"
    pool.close()


def test_arena_none_and_zero_workers_are_stock():
    stock = ta.ArenaDataLoader(Samples(), batch_size=4, num_workers=2, arena=None)
    it = iter(stock)
    assert type(it) is _MultiProcessingDataLoaderIter
    del it
    inline = ta.ArenaDataLoader(Samples(), batch_size=4, num_workers=0, arena="pool")
    expected = collect(DataLoader(Samples(), batch_size=4))
    for a, b in zip(collect(inline)[0], expected[0]):
        assert_same(a, b)
    assert stock.arena_stats.batches == 0 and inline.arena_stats.batches == 0
    assert not inline.uses_arena
    named = ta.ArenaDataLoader(Samples(), batch_size=4, num_workers=2, arena="none")
    assert named.arena is None and not named.uses_arena  # as on the Lightning flag


def test_iterator_is_torchs_and_stops_workers_when_dropped():
    loader = ta.ArenaDataLoader(Samples(), batch_size=4, num_workers=2, arena_budget=SMALL_BUDGET)
    it = iter(loader)
    assert isinstance(it, _MultiProcessingDataLoaderIter)
    next(it)
    workers = list(it._workers)
    gc.disable()
    try:
        del it
        deadline = time.monotonic() + 10
        while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(w.is_alive() for w in workers), "workers outlived their iterator"
    finally:
        gc.enable()


def test_kept_batch_survives_later_epochs():
    pool = ta.SharedMemorySegmentPool(1 << 20, 6, acquire_timeout=5)
    loader = ta.ArenaDataLoader(Samples(), batch_size=4, num_workers=2, arena=pool, persistent_workers=True)
    kept = next(iter(loader))["image"]
    reference = kept.clone()
    for _ in range(3):
        for _batch in loader:
            pass
    assert torch.equal(kept, reference)
    assert loader.arena_stats.fallbacks == 0
    del kept, _batch
    loader.release_arena()
    gc.collect()
    assert pool.segment_states().count("free") == pool.count
    pool.close()


@pytest.mark.parametrize("persistent", [False, True])
def test_early_break_releases_space(persistent):
    pool = ta.SharedMemorySegmentPool(1 << 20, 6, acquire_timeout=5)
    loader = ta.ArenaDataLoader(Samples(48), batch_size=2, num_workers=2, arena=pool, persistent_workers=persistent)
    for _ in range(4):
        for i, _batch in enumerate(loader):
            if i == 1:
                break
    del _batch
    labels = [int(x) for b in loader for x in b["label"]]
    assert labels == list(range(48))
    assert loader.arena_stats.fallbacks == 0
    loader.release_arena()
    gc.collect()
    deadline = time.monotonic() + 5
    while pool.segment_states().count("free") != pool.count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.segment_states().count("free") == pool.count
    pool.close()


def test_oversize_batch_falls_back_with_one_warning():
    loader = ta.ArenaDataLoader(Samples(), batch_size=8, num_workers=2, arena="pool", arena_budget="64KiB")
    expected = collect(DataLoader(Samples(), batch_size=8, num_workers=2))
    with pytest.warns(ta.ArenaFallbackWarning, match=r"does not fit a pool capped at 64\.0 KiB.*arena_budget >=") as record:
        got = collect(loader)
    assert len([w for w in record if issubclass(w.category, ta.ArenaFallbackWarning)]) == 1
    for a, b in zip(got[0], expected[0]):
        assert_same(a, b)
    assert loader.arena_stats.fallbacks == 3 and loader.arena_stats.batches == 0


def test_oversize_batch_raises_when_asked():
    loader = ta.ArenaDataLoader(Samples(), batch_size=8, num_workers=2, arena="ring",
                                arena_budget=128 << 10, arena_overflow="raise")
    with pytest.raises(BufferError, match=r"does not fit a ring capped at 128\.0 KiB.*arena_budget >="):
        next(iter(loader))


def test_held_batches_fall_back_after_the_timeout_not_hang():
    loader = ta.ArenaDataLoader(Samples(40), batch_size=2, num_workers=2, arena="pool",
                                arena_budget="256KiB", arena_timeout=0.2)
    with pytest.warns(ta.ArenaFallbackWarning, match=r"at its budget \(arena_budget=256\.0 KiB\).*keep fewer batches alive"):
        kept = [b for b in loader]  # every batch held: the pool reaches its cap
    assert len(kept) == 20
    assert [int(x) for b in kept for x in b["label"]] == list(range(40))
    assert loader.arena_stats.fallbacks > 0 and loader.arena_stats.batches > 0


def test_worker_exception_reaches_user_like_stock():
    def first_error(loader):
        with pytest.raises(KeyError) as info:
            list(loader)
        return str(info.value)

    stock = first_error(DataLoader(Failing(), batch_size=2, num_workers=2))
    arena = first_error(ta.ArenaDataLoader(Failing(), batch_size=2, num_workers=2, arena_budget=SMALL_BUDGET))
    assert "no sample 5 here" in arena
    assert arena.splitlines()[0] == stock.splitlines()[0]


def test_iteration_continues_after_a_worker_exception():
    loader = ta.ArenaDataLoader(Failing(), batch_size=2, num_workers=2, arena_budget=SMALL_BUDGET)
    it = iter(loader)
    seen = []
    for _ in range(4):
        try:
            seen.append(int(next(it)[0, 0]))
        except KeyError:
            seen.append("error")
    assert seen == [0, 2, "error", 6]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(arena="bogus"), "arena must be 'pool', 'ring', 'none' or None"),
        (dict(arena=42), "arena must be 'pool', 'ring', 'none' or None"),
        (dict(arena_budget=-1), "arena_budget must be a positive"),
        (dict(arena_overflow="drop"), "arena_overflow must be 'fallback' or 'raise'"),
        (dict(arena_timeout=-1.0), "arena_timeout must be"),
        (dict(arena_threshold=-5), "arena_threshold must be"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ta.ArenaDataLoader(Samples(), num_workers=2, **kwargs)


def test_torch_validation_and_attributes_are_unchanged():
    with pytest.raises(ValueError) as stock:
        DataLoader(Samples(), num_workers=2, multiprocessing_context="bogus")
    with pytest.raises(ValueError) as ours:
        ta.ArenaDataLoader(Samples(), num_workers=2, multiprocessing_context="bogus")
    assert str(ours.value) == str(stock.value)
    loader = ta.ArenaDataLoader(Samples(), batch_size=4, num_workers=2)
    for name in ("batch_size", "sampler", "drop_last", "dataset", "persistent_workers"):
        with pytest.raises(ValueError, match="attribute should not be set"):
            setattr(loader, name, getattr(loader, name))


def test_many_workers_only_warn_and_allocate_nothing():
    before = set(os.listdir("/proc/self/fd"))
    with pytest.warns(UserWarning, match="worker"):
        loader = ta.ArenaDataLoader(Samples(), num_workers=1000, arena="pool")
    assert set(os.listdir("/proc/self/fd")) == before
    assert loader._torch_arena.session is None


def test_loader_rebuilds_from_init_arguments_and_pickles():
    loader = ta.ArenaDataLoader(Samples(), batch_size=4, num_workers=2, arena="ring",
                                arena_budget=SMALL_BUDGET, arena_overflow="raise", arena_timeout=1.5)
    next(iter(loader))
    rebuilt = type(loader)(loader.dataset, batch_size=4, num_workers=2, sampler=loader.sampler,
                           arena=loader.arena, arena_budget=loader.arena_budget,
                           arena_overflow=loader.arena_overflow, arena_timeout=loader.arena_timeout)
    assert (rebuilt.arena, rebuilt.arena_budget, rebuilt.arena_overflow) == ("ring", SMALL_BUDGET, "raise")
    clone = pickle.loads(pickle.dumps(loader))
    assert clone._torch_arena.session is None and clone.arena == "ring"
    assert len(collect(clone)[0]) == 6


def test_several_loaders_at_once():
    a = ta.ArenaDataLoader(Samples(), batch_size=4, num_workers=2, arena="pool", arena_budget=SMALL_BUDGET)
    b = ta.ArenaDataLoader(Samples(), batch_size=4, num_workers=2, arena="ring", arena_budget=SMALL_BUDGET)
    for x, y in zip(a, b):
        assert_same(snapshot(x), snapshot(y))
    assert a.arena_stats.batches == b.arena_stats.batches == 6


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize("arena", ["pool", "ring"])
def test_start_methods(method, arena):
    expected = collect(DataLoader(Samples(), batch_size=4))
    loader = ta.ArenaDataLoader(Samples(), batch_size=4, num_workers=2, arena=arena,
                                arena_budget=SMALL_BUDGET, multiprocessing_context=method,
                                persistent_workers=True)
    got = collect(loader, epochs=2)
    for epoch in got:
        for a, b in zip(epoch, expected[0]):
            assert_same(a, b)
    assert loader.arena_stats.batches == 12 and loader.arena_stats.fallbacks == 0


def test_release_arena_stops_live_iterators_and_frees_the_arena():
    loader = ta.ArenaDataLoader(Samples(), batch_size=2, num_workers=2, arena_budget=SMALL_BUDGET)
    it = iter(loader)
    next(it)
    workers = list(it._workers)
    arena = loader._torch_arena.session.arena
    loader.release_arena()
    assert not any(w.is_alive() for w in workers)
    assert arena.closed and loader._torch_arena.session is None
    assert len(collect(loader)[0]) == 12  # a fresh arena next time


def test_session_inherited_through_fork_is_replaced_not_closed():
    loader = ta.ArenaDataLoader(Samples(), batch_size=4, num_workers=2, arena_budget=SMALL_BUDGET)
    next(iter(loader))
    inherited = loader._torch_arena.session
    inherited.pid = -1  # as if this process were a fork child of the loader's creator
    assert len(collect(loader)[0]) == 6
    assert loader._torch_arena.session is not inherited
    assert not inherited.arena.closed
    inherited.close()
