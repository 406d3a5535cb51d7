"""Several producer processes, every start method, and producers that die mid-unit."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time

import numpy as np
import pytest
import torch

import torch_arena as ta
from conftest import crc

pytestmark = pytest.mark.slow

N_ITEMS = 10
START_METHODS = ["fork", "spawn", "forkserver"]


def make_item(producer: int, i: int) -> dict:
    rng = np.random.default_rng(producer * 1000 + i)
    return {
        "producer": producer,
        "i": i,
        "array": rng.standard_normal(int(rng.integers(1000, 20_000))),
        "tensor": torch.from_numpy(rng.integers(0, 255, int(rng.integers(5000, 60_000)), dtype=np.uint8)),
        "raw": rng.bytes(int(rng.integers(5000, 60_000))),
        "nested": [{"k": rng.integers(0, 100, 2000, dtype=np.int32)}],
    }


def checksums(item: dict) -> dict:
    return {
        "array": crc(item["array"]),
        "tensor": crc(item["tensor"]),
        "raw": crc(item["raw"]),
        "nested": crc(item["nested"][0]["k"]),
    }


def producer_main(producer: int, pool, ring, out_q, arenas_q) -> None:
    """Write N_ITEMS into the pool and into the ring; arenas come as args or via a queue."""
    if pool is None:
        pool, ring = arenas_q.get(timeout=60)
    pool_w, ring_w = pool.open_writer(), ring.open_writer()
    for i in range(N_ITEMS):
        item = make_item(producer, i)
        sums = checksums(item)
        out_q.put(("pool", producer, i, ta.offload(item, pool_w), sums))
        out_q.put(("ring", producer, i, ta.offload(item, ring_w), sums))
    out_q.put(("done", producer, os.getpid(), None, None))


def _reap(procs) -> None:
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():  # pragma: no cover - only on failure
            p.kill()
            p.join()


@pytest.mark.parametrize("method", START_METHODS)
def test_two_producers_share_one_pool_and_one_ring(method):
    # The arenas are made in the parent, before (and independently of) the start
    # method the children use; up to Python 3.13 the default context is fork here.
    if sys.version_info < (3, 14):
        assert mp.get_context().get_start_method() == "fork"
    pool = ta.SharedMemorySegmentPool(512 * 1024, 4, acquire_timeout=60.0)
    ring = ta.SharedMemoryRingBuffer(2 << 20, acquire_timeout=60.0)
    ctx = mp.get_context(method)
    out_q, arenas_q = ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=producer_main, args=(0, pool, ring, out_q, None)),  # arenas as Process args
        ctx.Process(target=producer_main, args=(1, None, None, out_q, arenas_q)),  # arenas through a Queue
    ]
    try:
        for p in procs:
            p.start()
        arenas_q.put((pool, ring))
        pool_r, ring_r = pool.open_reader(), ring.open_reader()
        seen = {("pool", 0): [], ("pool", 1): [], ("ring", 0): [], ("ring", 1): []}
        done = {}
        while len(done) < 2:
            backend, producer, i, env, sums = out_q.get(timeout=120)
            if backend == "done":
                done[producer] = i
                continue
            out = ta.restore(env, pool_r if backend == "pool" else ring_r)
            assert out["producer"] == producer and out["i"] == i
            assert checksums(out) == sums, f"{backend} item {producer}/{i} arrived corrupted"
            assert out["array"].dtype == np.float64 and out["tensor"].dtype == torch.uint8
            seen[backend, producer].append(i)
            del out
        for key, order in seen.items():
            assert order == list(range(N_ITEMS)), key
    finally:
        _reap(procs)
    assert [p.exitcode for p in procs] == [0, 0]
    assert set(done.values()) == {p.pid for p in procs}
    assert pool.segment_states() == ["free"] * 4
    assert pool.usage()["units_in_use"] == 0
    assert ring.usage()["units_in_use"] == 0 and ring.usage()["bytes_in_use"] == 0
    pool.close()
    ring.close()


def die_mid_unit(pool, ring, ready, lock_pool: bool) -> None:
    """Commit two pool units, open a third and a ring unit, then wait to be killed."""
    w = pool.open_writer()
    for i in range(2):
        ta.offload({"i": i, "a": np.full(10_000, i, np.int64)}, w)
    w.begin_unit()
    w.allocate(30_000)[1][:] = 0xAA
    rw = ring.open_writer()
    rw.begin_unit()
    rw.allocate(50_000)[1][:] = 0xBB
    if lock_pool:
        pool.file.lock.acquire()  # and die holding the arena lock
    ready.set()
    time.sleep(600)


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("lock_pool", [False, True], ids=["unlocked", "holding-lock"])
def test_sigkilled_producer_mid_unit_frees_its_space(method, lock_pool):
    pool = ta.SharedMemorySegmentPool(128 * 1024, 3, acquire_timeout=30.0)
    ring = ta.SharedMemoryRingBuffer(64 * 1024)
    ctx = mp.get_context(method)
    ready = ctx.Event()
    child = ctx.Process(target=die_mid_unit, args=(pool, ring, ready, lock_pool))
    child.start()
    try:
        assert ready.wait(60), "child never got going"
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    finally:
        if child.is_alive():  # pragma: no cover
            child.kill()
            child.join()
    assert child.exitcode == -signal.SIGKILL
    assert sorted(pool.segment_states()) == ["being written", "committed", "committed"]
    assert ring.usage()["units_in_use"] == 1

    # the pool is full: the next acquire reclaims the dead writer's segment
    w, r = pool.open_writer(), pool.open_reader()
    start = time.monotonic()
    out = ta.restore(ta.offload(np.full(20_000, 7, np.uint8), w), r)
    assert time.monotonic() - start < 10.0  # reclaimed at once, not after the 30 s timeout
    assert np.all(out == 7)
    del out
    # its committed units will never be read: reclaim() returns them
    assert pool.reclaim([child.pid]) == 2
    assert pool.segment_states() == ["free"] * 3

    # the ring has 14 KiB free: a 40 KB unit fits only once the dead unit is gone
    rw, rr = ring.open_writer(), ring.open_reader()
    out = ta.restore(ta.offload(np.full(40_000, 5, np.uint8), rw), rr)
    assert np.all(out == 5)
    assert ring.usage()["units_in_use"] == 0
    pool.close()
    ring.close()


def test_no_children_left_behind():
    deadline = time.monotonic() + 10
    while mp.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mp.active_children()
