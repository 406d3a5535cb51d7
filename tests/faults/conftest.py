"""Run fault scenarios in child processes and watch them from outside.

Every scenario (``_scenarios.py``) runs under ``_harness.py``, which is the
leader of a fresh session, so a crash or a hang is observed, never suffered:
the harness enforces a hard timeout, then reports leftover processes of the
session (orphaned workers) and new ``/dev/shm`` entries. Where ``unshare
--mount`` is permitted the harness runs in a private mount namespace with a
64 MiB tmpfs on ``/dev/shm`` (Docker's default size).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
HARNESS = HERE / "_harness.py"
SCENARIOS = HERE / "_scenarios.py"
SHM_SIZE = "64m"


@functools.cache
def private_shm_reason() -> str | None:
    """None if a private 64 MiB /dev/shm can be mounted, else why not."""
    if shutil.which("unshare") is None:
        return "the unshare command is not installed"
    try:
        probe = subprocess.run(
            ["unshare", "--mount", "sh", "-c", f"mount -t tmpfs -o size={SHM_SIZE} tmpfs /dev/shm"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare --mount failed: {exc}"
    if probe.returncode != 0:
        return f"unshare --mount is not permitted here: {probe.stderr.strip() or probe.returncode}"
    return None


@dataclasses.dataclass
class Report:
    """What the harness saw, plus the scenario's ``@@RESULT`` fields."""

    rc: int
    timed_out: bool
    elapsed: float
    settle_seconds: float
    orphans: list[str]
    shm_new: list[str]
    shm_mount: str
    shm_size: int
    signals_sent: list[int]
    stdout: str
    stderr: str
    result: dict[str, Any]
    private_shm: bool = True

    def describe(self) -> str:
        return (
            f"rc={self.rc} timed_out={self.timed_out} elapsed={self.elapsed:.1f}s "
            f"orphans={self.orphans} shm_new={self.shm_new}\n--- stdout ---\n{self.stdout[-4000:]}"
            f"\n--- stderr ---\n{self.stderr[-6000:]}"
        )

    def assert_clean(self, settle_within: float = 3.0) -> None:
        """Nothing left behind: no process of the run survives, no /dev/shm entry."""
        assert not self.orphans, f"orphaned processes left behind: {self.orphans}\n{self.describe()}"
        # Without a private /dev/shm, other programs' files come and go there too.
        if self.private_shm:
            assert not self.shm_new, f"left in /dev/shm: {self.shm_new}\n{self.describe()}"
        assert self.settle_seconds <= settle_within, (
            f"child processes took {self.settle_seconds:.1f}s to go\n{self.describe()}"
        )

    def assert_ok(self) -> None:
        assert self.rc == 0 and not self.timed_out, self.describe()
        assert self.result, f"the scenario reported nothing\n{self.describe()}"


def run_scenario(
    name: str,
    *args: str,
    timeout: float = 60.0,
    settle: float = 8.0,
    private_shm: bool = True,
) -> Report:
    """Run one scenario under the harness; never hangs longer than ``timeout`` + slack."""
    harness = [
        sys.executable,
        str(HARNESS),
        "--timeout",
        str(timeout),
        "--settle",
        str(settle),
        "--",
        sys.executable,
        str(SCENARIOS),
        name,
        *args,
    ]
    private = private_shm and private_shm_reason() is None
    if private_shm and not private and os.environ.get("TORCH_ARENA_REQUIRE_ALL") == "1":
        # make test: the leak check below must see a private /dev/shm, not pass blind
        pytest.fail(f"{name} needs a private 64 MiB /dev/shm for its leak check: {private_shm_reason()}")
    if private:
        cmd = [
            "unshare",
            "--mount",
            "sh",
            "-c",
            f'mount -t tmpfs -o size={SHM_SIZE} tmpfs /dev/shm && exec "$0" "$@"',
            *harness,
        ]
    else:
        cmd = harness
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO), env=env, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout + settle + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the fault harness itself hung running {name} {args}\n{out[-3000:]}\n{err[-3000:]}")
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"the fault harness failed (rc {proc.returncode}) running {name}\n{out[-3000:]}\n{err[-3000:]}")
    raw = json.loads(lines[-1])
    fields: dict[str, Any] = {}
    for line in raw["stdout"].splitlines():
        if line.startswith("@@RESULT "):
            fields.update(json.loads(line[len("@@RESULT ") :]))
    return Report(result=fields, private_shm=private, **raw)


@pytest.fixture
def scenario():
    """``scenario(name, *args, timeout=..., settle=...) -> Report``."""
    return run_scenario


@pytest.fixture
def private_shm():
    """Skip unless a private 64 MiB /dev/shm can be mounted with unshare."""
    reason = private_shm_reason()
    if reason is not None:
        pytest.skip(f"needs a private 64 MiB /dev/shm: {reason}")
