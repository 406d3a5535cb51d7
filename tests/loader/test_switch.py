"""The switch: TORCH_ARENA in the environment, or torch_arena.enable() in code.

Each test that sets the variable runs a real child interpreter: the start-up
hook (torch_arena-startup.pth in site-packages) is what reads it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import torch_arena as ta
from torch_arena._startup import parse
from torch_arena._tools.hook import installed

REPO = Path(__file__).resolve().parents[2]


class Items(Dataset):
    def __init__(self, n: int = 16) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((64, 64), float(i))


def ids(loader) -> list[int]:
    return [int(b[0, 0, 0]) for b in loader]


# -- the value ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("pool", ("pool", None, "fallback", 2.0, 4096)),
        (" Ring ", ("ring", None, "fallback", 2.0, 4096)),
        ("pool,budget=4GiB,timeout=5,overflow=raise,threshold=0", ("pool", 4 << 30, "raise", 5.0, 0)),
        ("ring, budget = 512MB", ("ring", 512 * 10**6, "fallback", 2.0, 4096)),
        ("none", (None, None, "fallback", 2.0, 4096)),
        ("off", (None, None, "fallback", 2.0, 4096)),
    ],
)
def test_the_value_names_an_arena_and_its_settings(text, expected):
    s = parse(text)
    assert (s.arena, s.budget, s.overflow, s.timeout, s.threshold) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("poool", r"TORCH_ARENA='poool': 'poool' is not an arena: use pool, ring or none"),
        ("pool,budget", r"'budget' is not a setting: after the arena come budget=..., overflow=..."),
        ("pool,size=4GiB", r"'size=4GiB' is not a setting"),
        ("pool,budget=4XB", r"arena_budget must be a positive number of bytes.*'4GiB'"),
        ("pool,overflow=drop", r"arena_overflow must be 'fallback' or 'raise'"),
        ("pool,timeout=soon", r"timeout must be a float, got 'soon'"),
        ("pool,threshold=-1", r"arena_threshold must be an int >= 0"),
    ],
)
def test_a_bad_value_says_what_was_wrong_and_what_is_accepted(text, message):
    with pytest.raises(ValueError, match=message):
        parse(text)


# -- torch_arena.enable() in this process --------------------------------------------------


def test_enable_puts_plain_loaders_on_the_arena_and_disable_stops_new_ones():
    stock = ids(DataLoader(Items(), batch_size=4, num_workers=2))
    with ta.enable("pool", arena_budget="64MiB") as settings:
        assert settings == ta.enabled() and settings.budget == 64 << 20
        loader = DataLoader(Items(), batch_size=4, num_workers=2)
        assert ids(loader) == stock
        assert loader.arena_stats.batches == 4 and loader.arena_stats.fallbacks == 0
        single = DataLoader(Items(), batch_size=4, num_workers=0)  # no workers: nothing to carry
        assert ids(single) == stock and single.arena_stats.batches == 0
        own = ta.ArenaDataLoader(Items(), batch_size=4, num_workers=2, arena=None)  # its own choice: stock
        assert ids(own) == stock and own.arena_stats.batches == 0
    assert ta.enabled() is None  # the block put the switch back
    later = DataLoader(Items(), batch_size=4, num_workers=2)
    assert ids(later) == stock and later.arena_stats.batches == 0
    assert ids(loader) == stock and loader.arena_stats.batches == 8  # it keeps what it adopted
    loader.release_arena()
    assert loader.arena_stats.batches == 0


def test_enable_checks_its_arguments():
    with pytest.raises(ValueError, match="torch_arena.enable: arena must be 'pool', 'ring'"):
        ta.enable("poool")
    with pytest.raises(ValueError, match="an arena instance cannot be shared here"):
        ta.enable(ta.SharedMemoryElasticPool("64MiB"))
    assert ta.enabled() is None


def test_enable_without_a_with_block_stays_on_until_disabled():
    ta.enable("ring")
    try:
        loader = DataLoader(Items(), batch_size=4, num_workers=2)
        assert ids(loader) == [0, 4, 8, 12] and loader.arena_stats.batches == 4
        loader.release_arena()
    finally:
        ta.disable()
    assert ta.enabled() is None


# -- TORCH_ARENA in a child interpreter ---------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Items(Dataset):
        def __len__(self):
            return 16
        def __getitem__(self, i):
            return torch.full((64, 64), float(i))

    method = sys.argv[1] if len(sys.argv) > 1 else None

    def an_epoch_in_a_function():  # its loader is gone before the exit
        loader = DataLoader(Items(), batch_size=8, num_workers=2, multiprocessing_context=method)
        return [int(b[0, 0, 0]) for b in loader]

    if __name__ == "__main__":
        # A loader without workers first (torch's own tests build many): it stays
        # torch's, whichever loaders come after it.
        single = [int(b[0, 0, 0]) for b in DataLoader(Items(), batch_size=4)]
        dropped = an_epoch_in_a_function()
        loader = DataLoader(Items(), batch_size=4, num_workers=2, multiprocessing_context=method)
        got = [int(b[0, 0, 0]) for b in loader]
        stats = getattr(loader, "arena_stats", None)
        with open("/proc/self/maps") as f:
            mapped = "/memfd:torch_arena" in f.read()
        assert single == got and dropped == [0, 8], (single, got, dropped)
        single = [int(b[0, 0, 0]) for b in DataLoader(Items(), batch_size=4)]
        assert single == got, single
        print(json.dumps({"ids": got, "batches": stats.batches if stats else None, "mapped": mapped,
                          "imported": "torch_arena" in sys.modules}))
    """
)


def run_child(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_ARENA")}
    full_env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **env)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=full_env,
                          cwd=tmp_path, timeout=180)


def test_the_start_up_hook_is_installed_here():
    assert installed(), "torch_arena-startup.pth is missing: run `python -m torch_arena hook install`"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_the_variable_puts_an_unchanged_script_on_the_arena(tmp_path, method):
    proc = run_child(tmp_path, {"TORCH_ARENA": "pool"}, method)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out == {"ids": [0, 4, 8, 12], "batches": 4, "mapped": True, "imported": True}


@pytest.mark.slow
@pytest.mark.parametrize("value", [None, "", "none", "0"])
def test_unset_or_none_imports_nothing_and_changes_nothing(tmp_path, value):
    proc = run_child(tmp_path, {} if value is None else {"TORCH_ARENA": value})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == {"ids": [0, 4, 8, 12], "batches": None, "mapped": False, "imported": False}


@pytest.mark.slow
def test_a_bad_value_stops_the_interpreter_at_start_up(tmp_path):
    proc = run_child(tmp_path, {"TORCH_ARENA": "pool,budget=lots"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert "TORCH_ARENA='pool,budget=lots'" in proc.stderr and "'4GiB'" in proc.stderr
    assert "Unset TORCH_ARENA to run without torch_arena" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_the_report_prints_one_line_per_loader_at_exit(tmp_path):
    proc = run_child(tmp_path, {"TORCH_ARENA": "ring,budget=64MiB", "TORCH_ARENA_REPORT": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("torch_arena [pid")]
    assert len(lines) == 2, proc.stderr  # the loader dropped inside a function is reported too
    assert "DataLoader over Items (ring): 2 batches through the arena, 0 fallbacks, 256.0 KiB moved" in lines[0]
    assert "DataLoader over Items (ring): 4 batches through the arena, 0 fallbacks, 256.0 KiB moved" in lines[1]
    assert all("committed peak 0 B" not in line for line in lines), lines
