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


def run_example(tmp_path: Path, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(ROOT / "examples" / "hf_trainer.py"), *args]
    proc = run_tree(cmd, cwd=tmp_path, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_trainer_batches_go_through_the_arena(tmp_path: Path) -> None:
    out = run_example(tmp_path, "--steps", "6")
    match = re.search(r"trained (\d+) steps.*: (\d+) batches through the arena, (\d+) by torch's path", out)
    assert match, out
    steps, batches, fallbacks = map(int, match.groups())
    assert steps == 6 and batches >= 6 and fallbacks == 0


def test_trainer_without_the_line_is_stock(tmp_path: Path) -> None:
    out = run_example(tmp_path, "--steps", "2", "--arena", "none")
    assert "0 batches through the arena" in out, out
