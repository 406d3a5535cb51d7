"""``python -m torch_arena demo`` and ``bench --resume``, run as a user would."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("psutil")
pytest.importorskip("matplotlib")

SMALL = ["--kinds", "numpy", "--sizes", "1", "--windows", "2", "--window-mib", "8", "--workers", "1", "--max-noise", "1000"]


def torch_arena(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch_arena", *args], cwd=cwd, capture_output=True, text=True, timeout=240, check=False
    )


def transports(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return [row["transport"] for row in csv.DictReader(f)]


@pytest.mark.slow
def test_demo_then_bench_resume_keeps_what_ran(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    demo = torch_arena("demo", *SMALL, "--transports", "pool", "--out", str(out), cwd=repo)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "numpy 1 MiB pool" in demo.stdout and "1 worker, start method" in demo.stdout
    report = demo.stdout[demo.stdout.index("[1/1]"):].split("\n", 1)[1]
    assert report.startswith("\nIn short (") and "targets" not in demo.stdout  # a blank line after the progress
    assert transports(out / "demo.csv") == ["pool"]
    assert (out / "demo.png").stat().st_size > 0

    bench = torch_arena(
        "bench", *SMALL, "--transports", "stock", "pool", "--resume", str(out / "demo.csv"), "--out", str(out),
        "--targets", cwd=repo,
    )
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert "pool: " in bench.stdout and "targets: " in bench.stdout  # asked for
    assert "numpy 1 MiB pool: kept from the earlier run" in bench.stdout
    assert "numpy 1 MiB stock: kept" not in bench.stdout  # missing there: it ran
    assert sorted(transports(out / "transport.csv")) == ["pool", "stock"]
