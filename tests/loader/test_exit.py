"""Interpreter exit is quiet: no 'Exception ignored', no leak warnings, nothing left."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys, torch, numpy as np, torch_arena as ta
    from torch.utils.data import Dataset

    class Items(Dataset):
        def __len__(self):
            return 16
        def __getitem__(self, i):
            return torch.full((64, 1024), float(i))

    if __name__ == "__main__":
        pool = ta.SharedMemorySegmentPool(1 << 20, 4)
        ring = ta.SharedMemoryRingBuffer(1 << 20)
        kept = [ta.restore(ta.offload(np.ones(100000), a.open_writer()), a.open_reader()) for a in (pool, ring)]
        loader = ta.ArenaDataLoader(Items(), batch_size=4, num_workers=2, persistent_workers=True,
                                    arena=sys.argv[1], arena_budget=8 << 20,
                                    multiprocessing_context=sys.argv[3])
        it = iter(loader)
        batch = next(it)  # a live view and a live iterator at exit
        if sys.argv[2] == "close":
            pool.close()
            ring.close()
        print("ok", flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "arena, close, method",
    [("pool", "keep", "fork"), ("ring", "close", "fork"), ("pool", "close", "spawn"), ("ring", "keep", "spawn")],
)
def test_exit_with_live_views_and_iterators_is_silent(tmp_path, arena, close, method):
    script = tmp_path / "exit_script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONWARNINGS="always")
    result = subprocess.run(
        [sys.executable, str(script), arena, close, method],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert result.stderr == "", result.stderr
