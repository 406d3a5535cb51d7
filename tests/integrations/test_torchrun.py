"""Two CPU ranks under torchrun (gloo), one launch: Accelerate as MULTI_CPU,
plain DDP with a DistributedSampler, and the two examples.

tests/torchrun_checks.py runs in each rank and reports; this test compares
the ranks with each other and with what stock loaders do.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from torch.utils.data.distributed import DistributedSampler

pytest.importorskip("accelerate")
from integration_helpers import live_children, run_tree, wait_no_children  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("torchrun")
    shm_before, children = set(os.listdir("/dev/shm")), live_children()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "torchrun_checks.py"), str(out)]
    proc = run_tree(cmd, cwd=out, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert wait_no_children(children) == [], "processes of the run are still alive"
    assert set(os.listdir("/dev/shm")) - shm_before == set(), "the run left /dev/shm entries"
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def flat(epoch: list[list[int]]) -> list[int]:
    return [i for batch in epoch for i in batch]


@pytest.mark.slow
def test_accelerate_multi_cpu_partitions_as_stock_through_the_arena(reports: list[dict]) -> None:
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world"] == 2 and r["distributed_type"] == "DistributedType.MULTI_CPU" for r in reports)
    for name in reports[0]["accelerate"]:
        runs = [r["accelerate"][name] for r in reports]
        for rank, run in enumerate(runs):
            stock, arena = run["stock"], run["arena"]
            assert arena["epochs"] == stock["epochs"] and arena["type"] == stock["type"], (name, rank)
            assert arena["fallbacks"] == 0 and arena["released"], (name, rank)
            assert arena["base"] == ("StatefulDataLoader" if name == "stateful" else "DataLoader")  # Accelerate's own
            # A dispatcher reads its loader on rank 0 only and broadcasts slices.
            if not (arena["type"] == "DataLoaderDispatcher" and rank == 1):
                assert arena["batches"] >= len(arena["epochs"][0]) > 0, (name, rank)
        if name == "shard-no-placement":
            assert all(run["arena"]["in_arena"] for run in runs), "batches are not views into the arena"
        seen = [flat(run["arena"]["epochs"][0]) for run in runs]
        if name in ("shard", "shard-no-placement", "split-batches", "stateful", "dispatch", "iterable"):
            assert sorted(seen[0] + seen[1]) == list(range(40)), name  # each sample once
            assert runs[0]["arena"]["epochs"][0] != runs[0]["arena"]["epochs"][1] or name == "iterable"
        elif name == "uneven":
            assert sorted(seen[0] + seen[1]) == list(range(42))  # no padding with even_batches=False
        elif name == "even-padded":
            assert len(seen[0]) == len(seen[1]) == 24 and set(seen[0] + seen[1]) == set(range(42))
        elif name == "skip":
            assert sorted(seen[0] + seen[1]) == list(range(16, 40))  # each rank skips its first 2 batches of 4


@pytest.mark.slow
def test_ddp_example_uses_distributed_sampler_and_set_epoch(reports: list[dict]) -> None:
    for rank, report in enumerate(reports):
        ddp = report["ddp_example"]
        assert (ddp["rank"], ddp["world"]) == (rank, 2)
        assert ddp["batches"] == 12 and ddp["fallbacks"] == 0  # 48 samples × 2 epochs / 8
        for epoch, seen in enumerate(ddp["seen"]):
            sampler = DistributedSampler(range(96), num_replicas=2, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            assert seen == list(sampler), (rank, epoch)
    for epoch in range(2):
        both = reports[0]["ddp_example"]["seen"][epoch] + reports[1]["ddp_example"]["seen"][epoch]
        assert sorted(both) == list(range(96))
    assert reports[0]["ddp_example"]["seen"][0] != reports[0]["ddp_example"]["seen"][1]


@pytest.mark.slow
def test_accelerate_example_under_torchrun(reports: list[dict]) -> None:
    runs = [r["accelerate_example"] for r in reports]
    assert all(run["distributed_type"] == "DistributedType.MULTI_CPU" for run in runs)
    assert all(run["batches"] == 6 and run["fallbacks"] == 0 and run["released"] for run in runs)
    assert sorted(runs[0]["seen"][0] + runs[1]["seen"][0]) == list(range(96))
