"""The HF Trainer example: one added line puts the Trainer's loaders through an arena."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from integration_helpers import run_tree

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[2]


def run_example(tmp_path: Path, *args: str, variable: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_ARENA"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    if variable is not None:
        env["TORCH_ARENA"] = variable
    cmd = [sys.executable, str(ROOT / "examples" / "hf_trainer.py"), *args]
    proc = run_tree(cmd, cwd=tmp_path, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def trained(out: str) -> tuple[int, int, int]:
    match = re.search(r"trained (\d+) steps.*: (\d+) batches through the arena, (\d+) by torch's path", out)
    assert match, out
    steps, batches, fallbacks = map(int, match.groups())
    return steps, batches, fallbacks


@pytest.mark.parametrize("how", ["variable", "attach"])
def test_trainer_batches_go_through_the_arena(tmp_path: Path, how: str) -> None:
    if how == "variable":  # the script has no torch_arena line
        out = run_example(tmp_path, "--steps", "6", variable="pool")
    else:
        out = run_example(tmp_path, "--steps", "6", "--attach", "pool")
    steps, batches, fallbacks = trained(out)
    assert steps == 6 and batches >= 6 and fallbacks == 0


def test_trainer_without_either_is_stock(tmp_path: Path) -> None:
    assert trained(run_example(tmp_path, "--steps", "2"))[1] == 0
