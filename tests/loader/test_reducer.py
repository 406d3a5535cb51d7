"""The ForkingPickler reducer: tensors and arrays through the arena, never a hang."""

from __future__ import annotations

import gc
import multiprocessing
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch

import torch_arena as ta
from torch_arena._loader.session import session_for


def roundtrip(obj):
    return ForkingPickler.loads(bytes(ForkingPickler.dumps(obj)))


def in_pool(pool, tensor) -> bool:
    lo = pool.file.data_address
    return lo <= tensor.untyped_storage().data_ptr() < lo + pool.count * pool.segment_size


def test_tensors_and_arrays_travel_through_the_pool():
    with ta.SharedMemorySegmentPool(1 << 20, 4) as pool, ta.arena_reducer(pool):
        weight = torch.nn.Parameter(torch.randn(256, 256))
        frame = torch.arange(65536, dtype=torch.bfloat16).view(256, 256)
        view = frame[10:20]
        out = roundtrip({"w": weight, "frame": frame, "view": view, "array": np.arange(10000.0)})
        assert type(out["w"]) is torch.nn.Parameter and out["w"].requires_grad
        assert torch.equal(out["w"].detach(), weight.detach())
        assert out["frame"].dtype == torch.bfloat16 and torch.equal(out["frame"], frame)
        assert torch.equal(out["view"], view)
        assert np.array_equal(out["array"], np.arange(10000.0))
        assert in_pool(pool, out["w"]) and in_pool(pool, out["frame"])
        assert pool.usage()["units_in_use"] > 0
        del out
        gc.collect()
        assert pool.usage()["units_in_use"] == 0


def test_ring_gives_private_copies():
    with ta.SharedMemoryRingBuffer(4 << 20) as ring, ta.arena_reducer(ring):
        source = torch.randn(512, 512)
        out = roundtrip(source)
        assert torch.equal(out, source)
        assert ring.usage()["units_in_use"] == 0  # copied out and freed at once
        assert ring.usage()["units_high_water"] == 1


def test_small_payloads_and_bytes_keep_torchs_path():
    with ta.SharedMemorySegmentPool(1 << 20, 2) as pool, ta.arena_reducer(pool, threshold=4096):
        small = roundtrip(torch.ones(8))
        assert torch.equal(small, torch.ones(8))
        assert roundtrip(b"x" * 100000) == b"x" * 100000  # bytes cannot be intercepted
        assert pool.usage()["units_high_water"] == 0


def test_full_arena_falls_back_instead_of_blocking_or_raising():
    with ta.SharedMemorySegmentPool(1 << 20, 1, acquire_timeout=60) as pool, ta.arena_reducer(pool):
        first = roundtrip(torch.zeros(100000))  # holds the only segment
        second = roundtrip(torch.ones(100000))  # no room: torch's path, no wait
        huge = roundtrip(torch.ones(1 << 20))  # larger than a segment
        assert in_pool(pool, first) and not in_pool(pool, second) and not in_pool(pool, huge)
        assert float(second.sum()) == 100000 and float(huge.sum()) == 1 << 20


def test_uninstall_restores_torchs_reducers():
    before = dict(ForkingPickler._extra_reducers)
    with ta.SharedMemorySegmentPool(1 << 20, 2) as pool:
        ta.install_reducer(pool)
        assert ForkingPickler._extra_reducers[torch.UntypedStorage] is not before[torch.UntypedStorage]
        ta.uninstall_reducer(pool)
    assert ForkingPickler._extra_reducers == before
    with pytest.raises(ValueError, match="no matching arena_reducer"):
        ta.uninstall_reducer()
    with pytest.raises(ValueError, match="needs a torch_arena arena"):
        ta.install_reducer("pool")


def test_closed_arena_falls_back():
    pool = ta.SharedMemorySegmentPool(1 << 20, 2)
    with ta.arena_reducer(pool):
        pool.close()
        out = roundtrip(torch.ones(100000))
        assert float(out.sum()) == 100000


def _producer(arena, queue, done):
    torch.set_num_threads(1)
    with ta.arena_reducer(arena):
        for i in range(6):
            queue.put((i, torch.full((256, 1024), float(i)), np.full(50000, i, np.int32)))
        done.wait(30)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("kind", ["pool", "ring"])
def test_queue_between_processes(method, kind):
    ctx = multiprocessing.get_context(method)
    if kind == "pool":
        arena = ta.SharedMemorySegmentPool(2 << 20, 16)
    else:
        arena = ta.SharedMemoryRingBuffer(16 << 20, acquire_timeout=5)
    queue, done = ctx.Queue(), ctx.Event()
    with arena, ta.arena_reducer(arena):
        producer = ctx.Process(target=_producer, args=(arena, queue, done))
        producer.start()
        try:
            items = [queue.get(timeout=60) for _ in range(6)]
        finally:
            done.set()
            producer.join(30)
        for i, tensor, array in items:
            assert bool(tensor.eq(i).all()) and bool((array == i).all())
        # Every tensor and array came through the arena (the arena has room
        # for all of them at once, so none had to fall back to torch's path).
        assert session_for(arena.token).stats.batches == 12


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4096"])
def test_install_rejects_a_bad_threshold(bad):
    with ta.SharedMemorySegmentPool(1 << 20, 2) as pool:
        with pytest.raises(ValueError, match="threshold must be an int >= 0"):
            ta.install_reducer(pool, threshold=bad)
        with pytest.raises(ValueError, match="needs a torch_arena arena instance"):
            ta.install_reducer(object())
        with pytest.raises(ValueError, match="no matching arena_reducer is installed"):
            ta.uninstall_reducer(pool)


def test_stacked_installs_send_through_the_latest_and_uninstall_out_of_order():
    original = ForkingPickler._extra_reducers.get(torch.UntypedStorage)
    with ta.SharedMemorySegmentPool(1 << 20, 4) as first, ta.SharedMemorySegmentPool(1 << 20, 4) as second:
        ta.install_reducer(first)
        ta.install_reducer(second)
        try:
            out = roundtrip(torch.ones(4096))
            assert in_pool(second, out) and not in_pool(first, out)  # the latest sends
            del out
            ta.uninstall_reducer(first)  # out of order: the other one stays active
            out = roundtrip(torch.ones(4096))
            assert in_pool(second, out)
            del out
        finally:
            ta.uninstall_reducer()
        gc.collect()
        assert ForkingPickler._extra_reducers.get(torch.UntypedStorage) is original
        out = roundtrip(torch.ones(4096))  # torch's own path again
        assert not in_pool(first, out) and not in_pool(second, out)
