"""Accelerate with real HF Accelerate, one process (no mocks).

Each case prepares a stock DataLoader with a stock Accelerator and the same
loader as an ArenaDataLoader, with plain ``accelerator.prepare`` and with
torch_arena.accelerate; the loader Accelerate builds must yield exactly the
stock batches, over two epochs, with every batch through the arena. The
two-rank checks are in test_torchrun.py.
"""

from __future__ import annotations

import gc
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import DataLoaderConfiguration  # noqa: E402

import torch_arena.accelerate as taa  # noqa: E402
from integration_helpers import (  # noqa: E402
    Images,
    Stream,
    arena_files_open,
    arena_mappings,
    in_arena_memory,
    live_children,
    wait_no_children,
)
from torch_arena import ArenaDataLoader  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")

BUDGET = 16 << 20


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each test starts from none."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    gc.collect()


def accelerator(**config) -> Accelerator:
    return Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(**config))


def loader_kwargs(dataset: str, **extra):
    base = {"dataset": Images(40) if dataset == "map" else Stream(40), "batch_size": 4, "num_workers": 2, **extra}
    if "seed" in base:
        base["generator"] = torch.Generator().manual_seed(base.pop("seed"))
    return base


def ids(batch) -> list[int]:
    return batch[0].tolist()


def arena_settings(loader):
    """(arena, budget) of the loader inside a prepared one, or None without an arena."""
    state = getattr(loader, "_torch_arena", None)
    return None if state is None else (state.settings.arena, state.settings.budget)


def prepare_with(how: str, acc, loader):
    return acc.prepare(loader) if how == "plain" else taa.prepare(acc, loader)


CASES = {
    "shard": ("map", dict(), dict(shuffle=True, seed=1)),
    "shard-persistent": ("map", dict(), dict(shuffle=True, seed=2, persistent_workers=True)),
    "split-batches": ("map", dict(split_batches=True), dict(drop_last=True)),
    "uneven": ("map", dict(even_batches=False), dict()),
    "batch-sampler": ("map", dict(), dict(batch_sampler=BatchSampler(SequentialSampler(range(40)), 6, False))),
    "dispatch": ("map", dict(dispatch_batches=True), dict(shuffle=True, seed=3)),
    "iterable-dispatch": ("iterable", dict(), dict()),
    "iterable-shard": ("iterable", dict(dispatch_batches=False), dict()),
    "stateful": ("map", dict(use_stateful_dataloader=True), dict(shuffle=True, seed=4)),
    "stateful-global-rng": ("map", dict(use_stateful_dataloader=True), dict(shuffle=True)),
    "shard-global-rng": ("map", dict(), dict(shuffle=True)),
}


@pytest.mark.parametrize("how", ["plain", "helper"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_prepared_arena_loader_yields_stock_batches_through_its_arena(case: str, how: str) -> None:
    dataset, config, extra = CASES[case]
    if "batch_sampler" in extra:
        extra = dict(extra, batch_size=1)
    torch.manual_seed(7)  # for the cases that shuffle with torch's global generator
    stock = accelerator(**config).prepare(DataLoader(**loader_kwargs(dataset, **extra)))
    expected = [[ids(b) for b in stock] for _ in range(2)]
    after_stock = torch.get_rng_state()
    torch.manual_seed(7)

    with warnings.catch_warnings():
        warnings.simplefilter("error", taa.ArenaDroppedWarning)
        arena_loader = ArenaDataLoader(**loader_kwargs(dataset, **extra), arena_budget=BUDGET)
        prepared = prepare_with(how, accelerator(**config), arena_loader)
    assert type(prepared) is type(stock)
    base = prepared.base_dataloader
    assert type(base) is type(stock.base_dataloader)  # Accelerate's own loader...
    assert arena_settings(base) == ("pool", BUDGET)  # ...with the arena loader's settings
    got = []
    for _ in range(2):
        epoch = []
        for batch in prepared:
            epoch.append(ids(batch))
            if type(prepared) is DataLoaderShard:
                assert in_arena_memory(batch[1]), "a shard's batch is not a view into the arena"
        got.append(epoch)
    assert got == expected and len(got[0]) > 0
    assert torch.equal(torch.get_rng_state(), after_stock)  # the same random draws as stock
    stats = prepared.arena_stats  # reaches the arena loader inside
    assert stats.fallbacks == 0 and stats.batches >= sum(map(len, expected))
    prepared.release_arena()


@pytest.mark.parametrize("how", ["method", "function"])
@pytest.mark.parametrize("config", [dict(), dict(dispatch_batches=True)], ids=["shard", "dispatch"])
def test_skip_first_batches_keeps_the_arena(how: str, config: dict) -> None:
    stock_acc = accelerator(**config)
    stock = stock_acc.skip_first_batches(stock_acc.prepare(DataLoader(**loader_kwargs("map"))), 3)
    expected = [ids(b) for b in stock]

    acc = accelerator(**config)
    prepared = taa.prepare(acc, ArenaDataLoader(**loader_kwargs("map"), arena_budget=BUDGET))
    with warnings.catch_warnings():
        warnings.simplefilter("error", taa.ArenaDroppedWarning)
        skipped = acc.skip_first_batches(prepared, 3) if how == "method" else taa.skip_first_batches(prepared, 3)
    assert type(skipped) is type(stock) and arena_settings(skipped.base_dataloader) == ("pool", BUDGET)
    assert skipped.base_dataloader is not prepared.base_dataloader  # its own loader, its own arena
    assert [ids(b) for b in skipped] == expected == [list(range(i, i + 4)) for i in range(12, 40, 4)]
    assert skipped.arena_stats.batches >= len(expected) and skipped.arena_stats.fallbacks == 0
    if how == "method":  # an attached accelerator tracks it, and frees it
        acc.free_memory()
    assert skipped.arena_stats.batches == (0 if how == "method" else len(expected))
    skipped.release_arena()


def test_plain_prepare_keeps_the_arena_and_only_for_its_own_loader() -> None:
    acc = accelerator()
    loader = ArenaDataLoader(**loader_kwargs("map"), arena_budget=BUDGET)
    with warnings.catch_warnings():
        warnings.simplefilter("error", taa.ArenaDroppedWarning)
        prepared = acc.prepare(loader)
        stock_zero = acc.prepare(ArenaDataLoader(**loader_kwargs("map", num_workers=0)))
        stock_none = acc.prepare(ArenaDataLoader(**loader_kwargs("map"), arena=None))
    assert [ids(b) for b in prepared] == [list(range(i, i + 4)) for i in range(0, 40, 4)]
    assert prepared.arena_stats.batches >= 10 and loader.arena_stats.batches == 0
    assert arena_settings(stock_none.base_dataloader) is None  # arena=None: stock, nothing offered
    assert [ids(b) for b in stock_zero][:1] == [[0, 1, 2, 3]] and stock_zero.arena_stats.batches == 0
    # The offer lapses with the prepare call: a loader built afterwards over the
    # same dataset, in the same thread, stays plain.
    later = DataLoader(loader.dataset, batch_size=4, num_workers=2)
    assert arena_settings(later) is None
    prepared.release_arena()


def test_a_loader_prepared_twice_and_a_prepared_loader_prepared_again() -> None:
    acc = accelerator()
    loader = ArenaDataLoader(**loader_kwargs("map"), arena_budget=BUDGET)
    first = taa.prepare(acc, loader)
    second = taa.prepare(acc, loader)
    assert first is not second and first.base_dataloader is not second.base_dataloader
    assert taa.prepare(acc, first) is first  # Accelerate returns a prepared loader as it is
    assert acc.prepare(first) is first
    expected = [list(range(i, i + 4)) for i in range(0, 40, 4)]
    assert [ids(b) for b in first] == [ids(b) for b in second] == expected
    assert first.arena_stats.batches >= 10 and second.arena_stats.batches >= 10
    assert loader.arena_stats.batches == 0  # the original is never iterated by Accelerate
    assert len(taa.arena_loaders(acc)) == 2
    acc.free_memory()
    assert first.arena_stats.batches == 0 and second.arena_stats.batches == 0


@pytest.mark.parametrize("finish", ["free_memory", "clear", "end_training"])
def test_end_of_training_releases_arenas_workers_and_memory(finish: str) -> None:
    children, files, maps = live_children(), arena_files_open(), arena_mappings()
    acc = accelerator()
    model = torch.nn.Linear(2, 2)
    model, prepared = taa.prepare(acc, model, ArenaDataLoader(**loader_kwargs("map", persistent_workers=True)))
    for _ in range(2):
        for batch in prepared:
            pass
    del batch
    assert len(wait_no_children(children, seconds=0)) == 2  # the persistent workers
    assert arena_files_open() > files or arena_mappings() > maps
    getattr(acc, finish)()
    assert wait_no_children(children) == []
    gc.collect()
    assert arena_files_open() == files and arena_mappings() == maps
    assert prepared.arena_stats.batches == 0
    assert [ids(b) for b in prepared][:1] == [[0, 1, 2, 3]]  # usable again: a fresh arena
    prepared.release_arena()


def test_prepared_loader_pickles_and_its_copy_makes_its_own_arena() -> None:
    acc = accelerator()
    prepared = taa.prepare(acc, ArenaDataLoader(**loader_kwargs("map"), arena_budget=BUDGET))
    expected = [ids(b) for b in prepared]
    copy = pickle.loads(pickle.dumps(prepared))
    assert type(copy) is DataLoaderShard and arena_settings(copy.base_dataloader) == ("pool", BUDGET)
    assert copy.arena_stats.batches == 0  # no arena travelled
    assert [ids(b) for b in copy] == expected
    assert copy.arena_stats.batches >= len(expected) and copy.arena_stats.fallbacks == 0
    copy.release_arena()
    prepared.release_arena()


def test_stateful_save_state_and_resume_like_stock(tmp_path: Path) -> None:
    """accelerator.save_state() mid-epoch (it saves the loader's state_dict), a
    new accelerator's load_state(): the rest of the epoch as with stock loaders."""
    def run(make, prepare):
        acc = accelerator(use_stateful_dataloader=True)
        prepared = prepare(acc, make())
        head = []
        for step, batch in enumerate(prepared):
            head.append(ids(batch))
            if step == 3:
                break
        out = tmp_path / f"ckpt-{len(list(tmp_path.iterdir()))}"
        acc.save_state(str(out))
        if hasattr(prepared, "release_arena"):
            prepared.release_arena()
        acc2 = accelerator(use_stateful_dataloader=True)
        resumed = prepare(acc2, make())
        acc2.load_state(str(out))
        return head, [ids(b) for b in resumed], resumed

    def kwargs():
        return loader_kwargs("map", shuffle=True, seed=9)

    expected = run(lambda: DataLoader(**kwargs()), lambda acc, dl: acc.prepare(dl))
    got = run(lambda: ArenaDataLoader(**kwargs(), arena_budget=BUDGET), taa.prepare)
    assert got[:2] == expected[:2] and len(got[1]) == 6
    resumed = got[2]
    assert type(resumed.base_dataloader).__name__ == "StatefulDataLoader"
    assert arena_settings(resumed.base_dataloader) == ("pool", BUDGET)
    assert resumed.arena_stats.batches >= len(got[1]) and resumed.arena_stats.fallbacks == 0
    resumed.release_arena()


def test_attach_gives_plain_loaders_an_arena_and_checks_its_input() -> None:
    acc = taa.attach(accelerator(), arena="ring", arena_budget=BUDGET)
    prepared = acc.prepare(DataLoader(**loader_kwargs("map")))
    base = prepared.base_dataloader
    assert type(base) is DataLoader and arena_settings(base) == ("ring", BUDGET)
    assert [ids(b) for b in prepared] == [list(range(i, i + 4)) for i in range(0, 40, 4)]
    assert prepared.arena_stats.batches >= 10
    taa.attach(acc, arena="none")  # plain loaders stay plain from now on
    assert arena_settings(acc.prepare(DataLoader(**loader_kwargs("map"))).base_dataloader) is None
    with pytest.raises(ValueError, match="arena_budget"):
        taa.attach(acc, arena="pool", arena_budget=-1)
    with pytest.raises(ValueError, match="instance"):
        taa.attach(acc, arena=object())
    acc.end_training()
    assert prepared.arena_stats.batches == 0
