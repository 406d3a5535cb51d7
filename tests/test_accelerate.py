"""torch_arena.accelerate with real HF Accelerate, one process (no mocks).

Each case prepares a stock DataLoader with a stock Accelerator and the same
loader as an ArenaDataLoader with torch_arena.accelerate; the prepared arena
loader must yield exactly the stock batches, over two epochs, with every
batch through its arena. The two-rank checks are in test_torchrun.py.
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


@pytest.mark.parametrize("case", sorted(CASES))
def test_prepared_arena_loader_yields_stock_batches_through_its_arena(case: str) -> None:
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
        prepared = taa.prepare(accelerator(**config), ArenaDataLoader(**loader_kwargs(dataset, **extra), arena_budget=BUDGET))
    assert type(prepared) is type(stock)
    base = prepared.base_dataloader
    assert isinstance(base, ArenaDataLoader) and type(base).__name__ == (
        "ArenaStatefulDataLoader" if config.get("use_stateful_dataloader") else "ArenaDataLoader"
    )
    assert (base.arena, base.arena_budget) == ("pool", BUDGET)
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
    assert type(skipped) is type(stock) and isinstance(skipped.base_dataloader, ArenaDataLoader)
    assert skipped.base_dataloader is not prepared.base_dataloader  # its own loader, its own arena
    assert [ids(b) for b in skipped] == expected == [list(range(i, i + 4)) for i in range(12, 40, 4)]
    assert skipped.arena_stats.batches >= len(expected) and skipped.arena_stats.fallbacks == 0
    if how == "method":  # an attached accelerator tracks it, and frees it
        acc.free_memory()
    assert skipped.arena_stats.batches == (0 if how == "method" else len(expected))
    skipped.release_arena()


def test_stock_prepare_warns_once_and_names_the_fix() -> None:
    acc = accelerator()
    loader = ArenaDataLoader(**loader_kwargs("map"), arena_budget=BUDGET)
    with pytest.warns(taa.ArenaDroppedWarning, match=r"torch_arena\.accelerate\.prepare\(accelerator") as record:
        prepared = acc.prepare(loader)
    assert len(record) == 1 and record[0].filename == __file__  # points at the user's line
    assert type(prepared.base_dataloader) is DataLoader  # what Accelerate does: no arena
    with warnings.catch_warnings():
        warnings.simplefilter("error", taa.ArenaDroppedWarning)
        acc.prepare(loader)  # warned once per loader
        acc.prepare(ArenaDataLoader(**loader_kwargs("map", num_workers=0)))  # no arena to lose
        acc.prepare(ArenaDataLoader(**loader_kwargs("map"), arena=None))
    assert loader.arena_stats.batches == 0


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
    assert type(copy) is DataLoaderShard and type(copy.base_dataloader) is ArenaDataLoader
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
    assert type(resumed.base_dataloader).__name__ == "ArenaStatefulDataLoader"
    assert resumed.arena_stats.batches >= len(got[1]) and resumed.arena_stats.fallbacks == 0
    resumed.release_arena()


def test_attach_gives_plain_loaders_an_arena_and_checks_its_input() -> None:
    acc = taa.attach(accelerator(), arena="ring", arena_budget=BUDGET)
    prepared = acc.prepare(DataLoader(**loader_kwargs("map")))
    base = prepared.base_dataloader
    assert type(base) is ArenaDataLoader and (base.arena, base.arena_budget) == ("ring", BUDGET)
    assert [ids(b) for b in prepared] == [list(range(i, i + 4)) for i in range(0, 40, 4)]
    assert prepared.arena_stats.batches >= 10
    taa.attach(acc, arena="none")  # plain loaders stay plain from now on
    assert type(acc.prepare(DataLoader(**loader_kwargs("map"))).base_dataloader) is DataLoader
    with pytest.raises(ValueError, match="arena_budget"):
        taa.attach(acc, arena="pool", arena_budget=-1)
    with pytest.raises(ValueError, match="instance"):
        taa.attach(acc, arena=object())
    acc.end_training()
    assert prepared.arena_stats.batches == 0


def test_rebuilt_loader_has_every_argument_of_accelerates() -> None:
    """Breaks if Accelerate starts building its loaders with arguments the
    arena copy does not carry over (compared on the public attributes)."""
    acc = taa.attach(accelerator(use_stateful_dataloader=True))
    stock = accelerator(use_stateful_dataloader=True).prepare(
        DataLoader(**loader_kwargs("map", shuffle=True, seed=1, pin_memory=False, timeout=30, prefetch_factor=3))
    )
    prepared = acc.prepare(
        ArenaDataLoader(**loader_kwargs("map", shuffle=True, seed=1, timeout=30, prefetch_factor=3), arena_budget=BUDGET)
    )
    ours, theirs = prepared.base_dataloader, stock.base_dataloader
    for name in ("num_workers", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
                 "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order", "batch_size",
                 "drop_last", "snapshot_every_n_steps", "_dataset_kind"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert type(ours.batch_sampler) is type(theirs.batch_sampler)
    assert type(ours.sampler) is type(theirs.sampler)
    assert set(vars(theirs)) <= set(vars(ours))
    stock.base_dataloader._iterator._shutdown_workers()
    prepared.release_arena()
