"""Copy-out restores: private, recycled memory (the fixed ring and the elastic ring)."""

from __future__ import annotations

import multiprocessing as mp
import random

import numpy as np
import pytest
import torch

import torch_arena as ta
from conftest import collect, crc, inside_arena
from torch_arena._arena.private import PrivateBuffers, process_buffers, size_class

MiB = 1 << 20


def mapping_of(address: int) -> str:
    """The /proc/self/maps line of the mapping that holds ``address``."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return line
    raise AssertionError(f"{address:#x} is not mapped")


def copy_arenas():
    return [ta.SharedMemoryRingBuffer(64 * MiB, acquire_timeout=5.0), ta.SharedMemoryElasticRing("256MiB")]


@pytest.mark.parametrize("which", [0, 1], ids=["fixed-ring", "elastic-ring"])
def test_restored_batches_are_private_and_survive_later_batches(which):
    arena = copy_arenas()[which]
    w, r = arena.open_writer(), arena.open_reader()
    kept = []
    for i in range(12):
        item = {"x": np.full(2 * MiB, i, np.uint8), "t": torch.full((MiB // 4,), float(i)),
                "m": memoryview(np.full(8192, i, np.uint8)), "b": bytes([i]) * 10_000}
        out = ta.restore(ta.offload(item, w), r)
        for key in ("x", "t", "m"):
            assert not inside_arena(arena, out[key])
            line = mapping_of(out[key].data_ptr() if key == "t" else np.frombuffer(out[key], np.uint8).ctypes.data)
            assert line.split()[1] == "rw-p", line  # private, not shared with any process
        assert type(out["b"]) is bytes and type(out["m"]) is memoryview
        out["x"][0] = 255  # writable, and ours
        kept.append((i, out))
    assert arena.usage()["units_in_use"] == 0  # copied out: the arena holds nothing
    for i, out in kept:
        assert int(out["x"][1]) == i and out["x"].sum() == 255 + i * (2 * MiB - 1)
        assert torch.equal(out["t"], torch.full((MiB // 4,), float(i)))
        assert bytes(out["m"]) == bytes([i]) * 8192 and out["b"] == bytes([i]) * 10_000


def test_a_buffer_is_reused_only_once_every_view_of_it_is_dead():
    buffers = PrivateBuffers()
    a = buffers.copy_of(np.full(3 * MiB, 1, np.uint8))
    views = [a[10:], torch.from_numpy(a), memoryview(a), a.reshape(3, MiB)]
    address = a.ctypes.data
    del a
    for view in list(views):
        b = buffers.copy_of(np.full(3 * MiB, 2, np.uint8))
        assert b.ctypes.data != address  # a view of the first buffer lives
        assert int(np.frombuffer(view, np.uint8)[0] if isinstance(view, memoryview) else view.reshape(-1)[0]) == 1
        del b
        views.remove(view)
        del view
    assert buffers.stats()["fresh"] == 2  # the second buffer was recycled in between
    c = buffers.copy_of(np.full(3 * MiB, 3, np.uint8))
    assert buffers.stats()["fresh"] == 2 and int(c[0]) == 3  # every view gone: recycled


def test_out_of_order_release_reuses_and_never_clobbers():
    buffers = PrivateBuffers()
    rng = random.Random(5)
    live: dict[int, tuple[np.ndarray, int]] = {}
    for i in range(200):
        n = rng.choice([1, 2, 3]) * MiB + rng.randint(0, 5000)
        src = np.random.default_rng(i).integers(0, 255, n, dtype=np.uint8)
        live[i] = (buffers.copy_of(src), crc(src))
        if len(live) > 5:
            del live[rng.choice(sorted(live))]
        for out, expected in live.values():
            assert crc(out) == expected
    stats = buffers.stats()
    assert stats["reused"] > 150 and stats["fresh"] < 50
    assert stats["busy_bytes"] + stats["free_bytes"] <= (6 * (3 * MiB + 5000)) * 5 // 4 + 16 * MiB + 4 * MiB


def test_free_buffers_shrink_with_the_working_set():
    buffers = PrivateBuffers()
    for _ in range(8):
        buffers.copy_of(np.zeros(64 * MiB, np.uint8))  # dropped at once
    for _ in range(40):
        buffers.copy_of(np.zeros(MiB, np.uint8))
    stats = buffers.stats()
    assert stats["free_bytes"] <= 24 * MiB


def test_size_classes_are_pages_and_at_most_a_quarter_larger():
    for n in (1, 4095, 4097, MiB, MiB + 1, 33 * MiB + 7, 600 * MiB):
        c = size_class(n)
        assert c >= n and c % 4096 == 0 and c <= max(4096, n * 5 // 4 + 4096)


def test_process_buffers_are_per_process():
    assert process_buffers() is process_buffers()


def _grow(ring, producer, out_q) -> None:
    w = ring.open_writer()
    for i in range(8):
        out_q.put(ta.offload({"p": producer, "i": i, "x": np.full((1 + i) * MiB, producer * 10 + i, np.uint8)}, w))


@pytest.mark.slow
def test_elastic_ring_grows_with_several_producers():
    ring = ta.SharedMemoryElasticRing("256MiB", acquire_timeout=30)
    r = ring.open_reader()
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    procs = [ctx.Process(target=_grow, args=(ring, p, out_q)) for p in range(2)]
    for p in procs:
        p.start()
    kept = []
    for _ in range(16):
        out = ta.restore(out_q.get(timeout=120), r)
        assert out["x"].nbytes == (1 + out["i"]) * MiB and int(out["x"][-1]) == out["p"] * 10 + out["i"]
        kept.append(out)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    usage = ring.usage()
    assert usage["units_in_use"] == 0 and usage["committed_bytes"] <= usage["bytes_high_water"] * 5 // 4 + 16 * MiB
    assert sorted((k["p"], k["i"]) for k in kept) == [(p, i) for p in range(2) for i in range(8)]


@pytest.mark.slow
def test_loader_ring_moves_600_mib_batches_with_default_settings():
    class Big(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((150, 1 << 20), float(i))  # 600 MiB

    loader = ta.ArenaDataLoader(Big(), batch_size=None, num_workers=2, arena="ring")
    seen = [float(b[0, 0]) for b in loader]
    assert seen == [0.0, 1.0, 2.0, 3.0]
    stats = loader.arena_stats
    assert stats.fallbacks == 0 and stats.batches == 4
    loader.release_arena()
    collect()


class Numbered(torch.utils.data.Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, i):
        if i == 17:
            raise KeyError(f"no item {i}")
        return torch.full((64, 1024), float(i))


def restore_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "torch_arena-restore" and t.is_alive()]


@pytest.mark.slow
@pytest.mark.parametrize("persistent", [False, True])
def test_ring_loader_restores_in_its_own_thread_like_torch(persistent):
    """The ring's copy runs in a restore thread (so it overlaps the step): batches in
    order, a worker's exception re-raised with its type for its batch, iteration
    goes on, and the thread stops with the iterator."""
    import gc
    import time

    loader = ta.ArenaDataLoader(Numbered(), batch_size=2, num_workers=2, arena="ring", persistent_workers=persistent)
    for _ in range(2):
        it = iter(loader)
        assert it._pin_memory_thread.name == "torch_arena-restore"
        got = []
        with pytest.raises(KeyError, match="no item 17"):
            for b in it:
                got.append(int(b[0, 0, 0]))
        got += [int(b[0, 0, 0]) for b in it]  # after the failed batch, iteration goes on
        assert got == [i for i in range(0, 24, 2) if i != 16]
        assert not inside_arena(loader._torch_arena.session.arena, b)
    assert loader.arena_stats.fallbacks == 0 and loader.arena_stats.batches == 22
    del it, b
    loader.release_arena()
    gc.collect()
    deadline = time.monotonic() + 10
    while restore_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not restore_threads()


@pytest.mark.slow
def test_zero_copy_loader_starts_no_restore_thread():
    loader = ta.ArenaDataLoader(Numbered(), batch_size=2, num_workers=2, arena="pool")
    it = iter(loader)
    assert next(it) is not None and not hasattr(it, "_pin_memory_thread")
    del it
    loader.release_arena()


class Slow(torch.utils.data.Dataset):
    """16 MiB items whose first byte is the index."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> np.ndarray:
        item = np.zeros(16 << 20, np.uint8)
        item[0] = i
        return item


@pytest.mark.slow
@pytest.mark.parametrize("persistent", [False, True])
def test_copy_out_memory_is_bounded_while_the_loop_is_slow(persistent):
    """A slow training step gives the workers and the restore thread time to
    run ahead; restored (private) batches stay within the one the loop holds,
    the one being copied and RESTORE_AHEAD more."""
    import time

    from torch_arena._loader.restore_thread import RESTORE_AHEAD

    loader = ta.ArenaDataLoader(Slow(), batch_size=None, num_workers=2, arena="ring", persistent_workers=persistent)
    buffers = process_buffers()
    for _ in range(2):  # the second epoch of persistent workers resets what was in flight
        busy, seen = [], []
        for batch in loader:
            seen.append(int(batch[0]))
            time.sleep(0.05)  # the step
            busy.append(buffers.stats()["busy_bytes"])
        del batch
        assert seen == list(range(24))
        limit = (1 + 1 + RESTORE_AHEAD) * size_class(16 << 20)
        assert max(busy) <= limit, (max(busy) >> 20, limit >> 20)
    assert loader.arena_stats.fallbacks == 0
    loader.release_arena()


def _available() -> int:
    from torch_arena._os.limits import available_memory

    available, _ = available_memory()
    assert available is not None
    return available


@pytest.fixture
def no_free_buffers(monkeypatch):
    """A fresh buffer cache: free buffers kept from earlier tests would take
    the copies (reusing them costs no memory, so nothing is spilled)."""
    import torch_arena._arena.private as private

    monkeypatch.setattr(private, "_buffers", None)


def test_a_copy_that_would_take_what_the_ring_may_grow_into_is_restored_zero_copy(no_free_buffers):
    """A ring allowed to grow past what this machine (or its memory cgroup)
    has: a private copy would take memory the ring may still claim, so the
    batch is restored zero-copy instead (counted), holds its unit while it
    lives, and gives it back when dropped."""
    ring = ta.SharedMemoryElasticRing(max_bytes=2 * _available())
    writer, reader = ring.open_writer(), ring.open_reader()
    batch = {"x": torch.arange(2 * MiB, dtype=torch.float32), "y": np.arange(1000)}
    out = ta.restore(ta.offload(batch, writer), reader)
    assert torch.equal(out["x"], batch["x"]) and np.array_equal(out["y"], batch["y"])
    assert reader.spilled == 1
    assert inside_arena(ring, out["x"].numpy())  # a view of the ring, not a copy
    assert ring.usage()["units_in_use"] == 1  # held by the views
    del out
    collect()
    assert ring.usage()["units_in_use"] == 0
    ring.close()


def test_a_ring_that_cannot_outgrow_the_machine_copies_out(no_free_buffers):
    ring = ta.SharedMemoryElasticRing(max_bytes="256MiB")
    writer, reader = ring.open_writer(), ring.open_reader()
    out = ta.restore(ta.offload(torch.arange(2 * MiB, dtype=torch.float32), writer), reader)
    assert reader.spilled == 0 and not inside_arena(ring, out.numpy())
    assert ring.usage()["units_in_use"] == 0  # released as soon as it was read
    ring.close()


class _Tensors(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((256, 1024), float(i))


@pytest.mark.slow
def test_loader_counts_spilled_batches_and_gives_stocks_batches(no_free_buffers):
    """Through real workers and the restore thread: every batch spilled, the
    same values as without the arena, counted in ``arena_stats.spilled``, and
    every unit back once the batches are dropped."""
    ring = ta.SharedMemoryElasticRing(max_bytes=2 * _available())
    loader = ta.ArenaDataLoader(_Tensors(), batch_size=4, num_workers=2, arena=ring)
    got = [batch.clone() for batch in loader]
    expected = list(torch.utils.data.DataLoader(_Tensors(), batch_size=4))
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and len(got) == 4
    stats = loader.arena_stats
    assert (stats.batches, stats.spilled, stats.fallbacks) == (4, 4, 0)
    collect()
    assert ring.usage()["units_in_use"] == 0
    ring.close()
