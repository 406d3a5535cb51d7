"""A short run of benchmarks/soak.py: every byte checked, memory flat, no fallback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.faults]

REPO = Path(__file__).resolve().parents[2]


def _session_members(sid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                if int(fields[3]) == sid and fields[0] not in (b"Z", b"X"):
                    found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def test_soak_quick():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--batches", "400", "--groups", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(REPO),
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the soak hung:\n{out[-4000:]}")
    deadline = time.monotonic() + 5
    while _session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftover = _session_members(proc.pid)
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert out.rstrip().endswith("soak: OK"), out
    assert not leftover, f"processes left behind: {leftover}"
    for kind in ("pool", "ring"):
        assert re.search(rf"^{kind}: 400 batches in \d+ epochs", out, re.MULTILINE), out
    assert out.count("checksums: all 400 batches verified") == 2, out
    assert out.count("fallbacks 0") == 2, out
    assert out.count(": flat") == 2, out
