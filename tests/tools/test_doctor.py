"""``python -m torch_arena doctor``: the facts it prints and its sizing arithmetic."""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import torch_arena as ta
from torch_arena._tools.doctor import ALIGNMENT_ROOM, recommend
from torch_arena._os.memory import PAGE_SIZE
from torch_arena._arena.factory import make_arena
from torch_arena._loader.session import arena_slots

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def doctor(*args: str, wrap: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the command in a fresh interpreter, as a user would."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [*(wrap or []), sys.executable, "-m", "torch_arena", "doctor", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=120, check=False)


@pytest.fixture(scope="module")
def report_json():
    proc = doctor("--batch-bytes", str(16 * MiB), "--num-workers", "4", "--prefetch-factor", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_plain_report_names_every_fact():
    proc = doctor()
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in (
        "memfd_create",
        "/dev/shm",
        "MemAvailable",
        "cgroup limit",
        "sharing strategy",
        "open files",
        "start method",
        f"torch / numpy     {torch.__version__} / {np.__version__}",
        f"torch_arena       {ta.__version__}",
        "recommendation for batches of 64.0 MiB, num_workers=2, prefetch_factor=2",
        "slots             6 = 2 workers x 2 prefetched + 2 held by the loop",
        "SharedMemorySegmentPool(segment_size=",
        "ArenaDataLoader(..., arena='pool')  # elastic pool, no size to give",
        "SharedMemoryRingBuffer(capacity=",
        "ArenaDataLoader(..., arena='ring')  # elastic too",
    ):
        assert needle in out, (needle, out)


def test_facts_match_this_machine(report_json):
    facts = report_json["facts"]
    assert facts["torch"] == torch.__version__
    assert facts["numpy"] == np.__version__
    assert facts["torch_arena"] == ta.__version__
    assert facts["sharing_strategy"] == torch.multiprocessing.get_sharing_strategy()
    assert (facts["nofile_soft"], facts["nofile_hard"]) == resource.getrlimit(resource.RLIMIT_NOFILE)
    assert facts["start_method"] == multiprocessing.get_all_start_methods()[0]  # the platform default
    assert facts["memfd"] is hasattr(os, "memfd_create")
    if os.path.isdir("/dev/shm"):
        stat = os.statvfs("/dev/shm")
        assert facts["dev_shm_size"] == stat.f_blocks * stat.f_frsize
        assert 0 <= facts["dev_shm_free"] <= facts["dev_shm_size"]
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert 0 < facts["mem_available"] <= total
    assert facts["arena_available"] > 0  # min(MemAvailable, cgroup headroom), read a moment apart
    if facts["cgroup_limit"] is None:
        assert facts["arena_available_source"] == "MemAvailable in /proc/meminfo"


def test_recommendation_arithmetic(report_json):
    rec = report_json["recommendation"]
    slots = arena_slots(4, 3, False)
    assert slots == rec["slots"] == rec["count"] == 4 * 3 + 2
    segment = rec["segment_size"]
    assert segment % PAGE_SIZE == 0
    assert 16 * MiB + ALIGNMENT_ROOM <= segment < 16 * MiB + ALIGNMENT_ROOM + PAGE_SIZE
    assert rec["ring_capacity"] == rec["arena_budget"] == segment * slots
    assert rec["stock_shm_bytes"] == 16 * MiB * slots
    assert report_json["fits"] is (rec["arena_budget"] <= report_json["facts"]["arena_available"])
    assert recommend(16 * MiB, 4, 3, pin_memory=True)["slots"] == slots + 1


def test_recommended_sizes_fit_the_batch_in_every_backend():
    """The fixed pool of the recommended segments and the fixed ring of the
    recommended capacity each take a batch of the stated size; the loader's
    pool and ring need no size, and the pool commits about what the report says."""
    batch_bytes = 300_000
    rec = recommend(batch_bytes, 2, 2)
    batch = {"x": torch.ones(batch_bytes // 2 // 4), "y": np.ones(batch_bytes // 2, dtype=np.uint8)}
    arenas = [
        ta.SharedMemorySegmentPool(rec["segment_size"], rec["count"]),
        ta.SharedMemoryRingBuffer(rec["ring_capacity"]),
        make_arena("pool", None, 0.0),
        make_arena("ring", None, 0.0),
    ]
    assert isinstance(arenas[3], ta.SharedMemoryElasticRing)
    assert isinstance(arenas[2], ta.SharedMemoryElasticPool)
    # half the memory available, read a moment apart on a machine others use
    assert abs(arenas[2].max_bytes - rec["pool_default_cap"]) <= rec["pool_default_cap"] // 4
    try:
        for arena in arenas:
            writer, reader = arena.open_writer(), arena.open_reader()
            kept = [ta.restore(ta.offload(batch, writer), reader) for _ in range(rec["slots"])]
            assert all(torch.equal(k["x"], batch["x"]) for k in kept)
        usage = arenas[2].usage()  # the loader's pool
        assert usage["committed_bytes"] <= rec["pool_committed_bound"]
        assert usage["bytes_high_water"] <= rec["pool_peak_bytes"] + rec["slots"] * PAGE_SIZE
    finally:
        for arena in arenas:
            arena.close()


def test_arena_that_does_not_fit_fails_with_advice():
    proc = doctor("--batch-bytes", str(1 << 40), "--num-workers", "8")
    assert proc.returncode == 1, proc.stdout
    assert "does not fit in the" in proc.stdout
    assert "lower prefetch_factor or num_workers" in proc.stdout


@pytest.mark.parametrize("bad", [["--num-workers", "0"], ["--batch-bytes", "-5"], ["--prefetch-factor", "x"]])
def test_bad_arguments(bad):
    proc = doctor(*bad)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr


def test_warns_that_stock_torch_fails_on_a_small_dev_shm():
    """Under a 64 MiB /dev/shm, 16 MiB batches: the doctor says torch's own
    transport would not fit (and that the arena does not use /dev/shm)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    wrap = ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$0" "$@"']
    proc = doctor("--batch-bytes", str(16 * MiB), wrap=wrap)
    if proc.returncode != 0 and "unshare" in proc.stderr:
        pytest.skip(f"unshare --mount is not permitted here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert "/dev/shm          64.0 MiB" in proc.stdout
    assert "the stock DataLoader fails here ('No space left on device'" in proc.stdout


def test_doctor_reports_the_switch_and_its_start_up_hook(monkeypatch):
    monkeypatch.setenv("TORCH_ARENA", "ring,budget=2GiB")
    proc = doctor("--json")
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)["facts"]
    assert facts["switch_variable"] == "ring,budget=2GiB" and facts["switch_on"]
    assert facts["switch_resolved"].startswith("ring, budget 2.0 GiB, overflow fallback")
    assert facts["startup_hook"] and facts["startup_hook"][0].endswith("torch_arena-startup.pth")
    text = doctor().stdout
    assert "TORCH_ARENA       'ring,budget=2GiB' -> ring, budget 2.0 GiB" in text
    monkeypatch.delenv("TORCH_ARENA")
    assert "TORCH_ARENA       unset" in doctor().stdout
