"""ArenaStatefulDataLoader against torchdata's StatefulDataLoader (real torchdata, no mocks).

Every resume check runs the same script twice, once with the stock
StatefulDataLoader and once with the arena one: take ``k`` batches, take
``state_dict()``, load it into a brand-new loader, read the rest of the epoch
and one more. The arena run must yield exactly the stock run's batches, and
its batches must have come through the arena.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings

import pytest
import torch

torchdata = pytest.importorskip("torchdata.stateful_dataloader")
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

from integration_helpers import Images, Stream, in_arena_memory  # noqa: E402
from torch_arena import ArenaDataLoader  # noqa: E402
from torch_arena.torchdata import ArenaStatefulDataLoader  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")

BUDGET = 16 << 20


class StatefulStream(Stream):
    """A Stream that keeps its position in ``state_dict()`` (torchdata saves it per worker)."""

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos = state["pos"]


def ids(batch) -> list[int]:
    return batch[0].tolist()


def resume_run(cls, dataset, k: int, **kwargs):
    """Batches before the checkpoint, after it (rest of the epoch), the next epoch; and the resumed loader."""
    def make():
        return cls(dataset(), batch_size=4, num_workers=2, **kwargs)

    loader = make()
    iterator = iter(loader)
    head = [ids(next(iterator)) for _ in range(k)]
    state = loader.state_dict()
    del iterator
    if isinstance(loader, ArenaDataLoader):
        loader.release_arena()
    resumed = make()
    resumed.load_state_dict(state)
    tail = [ids(b) for b in resumed]
    after = [ids(b) for b in resumed]
    return head, tail, after, resumed, state


def arena_kwargs(**extra):
    return {"arena_budget": BUDGET, "arena_overflow": "raise", "arena_timeout": 5.0, **extra}


CASES = {
    "map-shuffled": dict(dataset=Images, shuffle=True, generator_seed=3),
    "map-snapshot-every-5": dict(dataset=Images, snapshot_every_n_steps=5),
    "map-persistent": dict(dataset=Images, shuffle=True, generator_seed=5, persistent_workers=True, snapshot_every_n_steps=3),
    "iterable-stateful": dict(dataset=StatefulStream, snapshot_every_n_steps=4),
    "iterable-stateful-persistent": dict(dataset=StatefulStream, persistent_workers=True),
    "iterable-fast-forward": dict(dataset=Stream, snapshot_every_n_steps=3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_yields_exactly_what_stateful_dataloader_yields(case: str) -> None:
    spec = dict(CASES[case])
    dataset, seed = spec.pop("dataset"), spec.pop("generator_seed", None)

    def run(cls, **extra):
        gen = {} if seed is None else {"generator": torch.Generator().manual_seed(seed)}
        return resume_run(cls, dataset, 7, **spec, **gen, **extra)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdata's naive fast-forward notice
        expected = run(StatefulDataLoader)
        got = run(ArenaStatefulDataLoader, **arena_kwargs())
    assert got[:3] == expected[:3]
    assert len(got[1]) > 0 and len(got[2]) > 0
    resumed = got[3]
    stats = resumed.arena_stats
    assert stats.fallbacks == 0
    # Everything read after the resume, discarded fast-forward batches included, came through the arena.
    assert stats.batches >= len(got[1]) + len(got[2])
    resumed.release_arena()


def test_state_moves_between_stock_and_arena_loaders() -> None:
    """A state taken from the arena loader resumes a stock one, and the other way round."""
    def make(cls, **extra):
        return cls(Images(), batch_size=4, num_workers=2, shuffle=True,
                   generator=torch.Generator().manual_seed(11), snapshot_every_n_steps=2, **extra)

    reference = [ids(b) for b in make(StatefulDataLoader)]
    for first, second in ((ArenaStatefulDataLoader, StatefulDataLoader), (StatefulDataLoader, ArenaStatefulDataLoader)):
        loader = make(first, **(arena_kwargs() if first is ArenaStatefulDataLoader else {}))
        iterator = iter(loader)
        head = [ids(next(iterator)) for _ in range(5)]
        state = loader.state_dict()
        del iterator, loader
        resumed = make(second, **(arena_kwargs() if second is ArenaStatefulDataLoader else {}))
        resumed.load_state_dict(state)
        assert head + [ids(b) for b in resumed] == reference


def test_fast_forward_gives_arena_space_back_at_once() -> None:
    """Resuming 14 batches past the last snapshot fetches and discards them; a
    pool of 6 segments (2 workers × prefetch 2 + 2) only gets through that,
    with arena_overflow='raise', if every discarded batch frees its segment."""
    def make(cls, **extra):
        return cls(Images(), batch_size=4, num_workers=2, snapshot_every_n_steps=100, **extra)

    stock = make(StatefulDataLoader)
    iterator = iter(stock)
    for _ in range(14):
        next(iterator)
    state = stock.state_dict()
    assert state["_steps_since_snapshot"] == 14
    del iterator, stock

    resumed = make(ArenaStatefulDataLoader, **arena_kwargs(arena_timeout=3.0))
    resumed.load_state_dict(state)
    tail = [ids(b) for b in resumed]
    assert tail == [list(range(i, i + 4)) for i in range(56, 64, 4)]
    stats = resumed.arena_stats
    assert stats.batches == 14 + 2 and stats.fallbacks == 0
    assert stats.high_water_units <= 6
    resumed.release_arena()


def test_batches_are_views_into_the_arena_and_state_before_iteration() -> None:
    loader = ArenaStatefulDataLoader(Images(16), batch_size=4, num_workers=2, arena_budget=BUDGET)
    initial = loader.state_dict()  # starts the iterator early, as torchdata does
    assert initial["_snapshot"]["_snapshot_step"] == 0
    batches = list(loader)
    assert [ids(b) for b in batches] == [list(range(i, i + 4)) for i in range(0, 16, 4)]
    assert all(in_arena_memory(b[1]) for b in batches)
    assert loader.arena_stats.batches == 4
    del batches
    loader.release_arena()


def test_zero_workers_and_no_arena_are_stock() -> None:
    for kwargs in (dict(num_workers=0), dict(num_workers=2, arena=None)):
        loader = ArenaStatefulDataLoader(Images(16), batch_size=4, **kwargs)
        assert not loader.uses_arena
        iterator = iter(loader)
        next(iterator)
        state = loader.state_dict()
        resumed = ArenaStatefulDataLoader(Images(16), batch_size=4, **kwargs)
        resumed.load_state_dict(state)
        assert [ids(b) for b in resumed] == [list(range(i, i + 4)) for i in range(4, 16, 4)]
        assert resumed.arena_stats.batches == 0


def test_pickles_without_its_arena_and_iterates_after_release() -> None:
    loader = ArenaStatefulDataLoader(Images(16), batch_size=4, num_workers=2, arena_budget=BUDGET,
                                     snapshot_every_n_steps=2)
    loader.state_dict()  # an iterator (and an arena) now exist
    clone = pickle.loads(pickle.dumps(loader))
    assert isinstance(clone, ArenaStatefulDataLoader) and clone.snapshot_every_n_steps == 2
    assert clone.arena_stats.batches == 0
    assert [ids(b) for b in clone] == [ids(b) for b in loader]
    assert clone.arena_stats.batches == 4
    loader.release_arena()
    assert [ids(b) for b in loader] == [list(range(i, i + 4)) for i in range(0, 16, 4)]  # a fresh arena
    loader.release_arena()
    clone.release_arena()


def test_bad_arena_settings_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="arena_overflow"):
        ArenaStatefulDataLoader(Images(), arena_overflow="drop")


@pytest.mark.parametrize("module, extra", [("torchdata", "torchdata"), ("accelerate", "accelerate")])
def test_missing_package_names_the_extra(module: str, extra: str) -> None:
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "import torch_arena\n"
        "assert 'accelerate' not in sys.modules or sys.modules['accelerate'] is None\n"
        f"try:\n    import torch_arena.{module}\nexcept ImportError as exc:\n    print(exc)\n"
        "else:\n    raise SystemExit('imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"pip install 'torch-arena[{extra}]'" in out.stdout


def test_importing_torch_arena_imports_neither_integration() -> None:
    code = "import sys, torch_arena, torch_arena.lightning; print(sorted({'accelerate', 'torchdata'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_stateful_resume_example(tmp_path) -> None:
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(root / "examples" / "stateful_resume.py"), "--stop-at", "7"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "same as uninterrupted: True" in proc.stdout and "0 by torch's path" in proc.stdout
