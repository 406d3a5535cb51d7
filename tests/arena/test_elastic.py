"""SharedMemoryElasticPool: any size, memory that follows the working set, pool semantics."""

from __future__ import annotations

import gc
import os
import random
import threading
import time

import numpy as np
import pytest
import torch

import torch_arena as ta
from conftest import collect, crc, inside_arena
from torch_arena._arena.units import UnitTable
from torch_arena._codec.envelope import pack_envelope, parse_envelope
from torch_arena._arena.leases import flush as flush_leases
from torch_arena._os.memory import committed_bytes

MiB = 1 << 20


def committed(pool) -> int:
    """What the kernel holds for the pool's data region right now."""
    return committed_bytes(pool.file.fds.memory_fd) - pool.file.header_bytes


def offload_array(pool, writer, nbytes: int, fill: int = 7) -> bytes:
    return ta.offload(np.full(nbytes, fill % 251, dtype=np.uint8), writer)


# -- sizes and zero-copy ------------------------------------------------------------------


@pytest.mark.parametrize("nbytes", [4096, 1 << 20, 33 * MiB + 123, 300 * MiB])
def test_any_size_round_trips_zero_copy(nbytes):
    pool = ta.SharedMemoryElasticPool("1GiB")
    w, r = pool.open_writer(), pool.open_reader()
    src = np.random.default_rng(nbytes).integers(0, 255, nbytes, dtype=np.uint8)
    out = ta.restore(ta.offload({"x": src, "t": torch.from_numpy(src[:8192].copy())}, w), r)
    assert inside_arena(pool, out["x"]) and inside_arena(pool, out["t"])
    assert crc(out["x"]) == crc(src) and crc(out["t"]) == crc(src[:8192])
    assert pool.usage()["units_in_use"] == 1
    del out
    assert pool.usage()["units_in_use"] == 0
    pool.close()


def test_nothing_committed_until_written_then_only_what_is_used():
    pool = ta.SharedMemoryElasticPool("8GiB")
    assert committed(pool) == 0  # an 8 GiB cap costs nothing up front
    w, r = pool.open_writer(), pool.open_reader()
    out = ta.restore(offload_array(pool, w, 10 * MiB), r)
    assert 10 * MiB <= committed(pool) <= 10 * MiB + (1 << 16)
    usage = pool.usage()
    assert usage["committed_bytes"] == committed(pool)
    assert usage["committed_high_water"] >= 10 * MiB and usage["max_bytes"] == 8 << 30
    del out


def test_recycled_extent_is_reused_not_committed_again():
    pool = ta.SharedMemoryElasticPool("1GiB")
    w, r = pool.open_writer(), pool.open_reader()
    for _ in range(20):
        out = ta.restore(offload_array(pool, w, 32 * MiB), r)
        address = out.ctypes.data
        del out
    assert committed(pool) <= 33 * MiB  # one warm extent, recycled 20 times
    out = ta.restore(offload_array(pool, w, 32 * MiB), r)
    assert out.ctypes.data == address


def test_many_small_binaries_share_extents():
    pool = ta.SharedMemoryElasticPool("256MiB")
    w, r = pool.open_writer(), pool.open_reader()
    item = [np.full(5000, i % 200, dtype=np.uint8) for i in range(1000)]
    out = ta.restore(ta.offload(item, w), r)
    assert all(int(a[0]) == i % 200 and a.nbytes == 5000 for i, a in enumerate(out))
    busy = pool.extent_states()["busy"]
    assert busy < 2 * 1000 * 5000  # chunks shared, tails given back
    del out
    assert pool.extent_states()["busy"] == 0


# -- lifetime -------------------------------------------------------------------------------


def test_out_of_order_release_never_reuses_space_with_a_live_view():
    pool = ta.SharedMemoryElasticPool("512MiB")
    w, r = pool.open_writer(), pool.open_reader()
    rng = random.Random(3)
    live: dict[int, tuple[object, int]] = {}
    for i in range(60):
        n = rng.randint(1, 12) * MiB + rng.randint(0, 4096)
        src = np.random.default_rng(i).integers(0, 255, n, dtype=np.uint8)
        kind = rng.choice(["array", "slice", "tensor", "memoryview"])
        out = ta.restore(ta.offload(src, w), r)
        view = {"array": out, "slice": out[1000:], "tensor": torch.from_numpy(out), "memoryview": memoryview(out)}[kind]
        expected = crc(src) if kind != "slice" else crc(src[1000:])
        del out
        live[i] = (view, expected)
        if len(live) > 6:  # drop a random one, not the oldest
            victim = rng.choice(sorted(live))
            del live[victim]
        for view, expected in live.values():
            assert crc(view) == expected  # nothing written since overwrote a live view
    assert pool.usage()["units_in_use"] == len(live)
    del view
    live.clear()
    collect()
    assert pool.usage()["units_in_use"] == 0 and pool.extent_states()["busy"] == 0


def test_views_outlive_close():
    pool = ta.SharedMemoryElasticPool("64MiB")
    w, r = pool.open_writer(), pool.open_reader()
    out = ta.restore(offload_array(pool, w, 3 * MiB, fill=9), r)
    state = pool.file
    pool.close()
    del w, r
    gc.collect()
    assert int(out[-1]) == 9 and out.sum() == 9 * 3 * MiB
    del out
    flush_leases()  # what the reaper thread does a moment later
    # released after close, too (the next writer collects it)
    assert UnitTable(state).state_names()[:1] == ["released"]


def test_shrinks_after_the_working_set_does():
    pool = ta.SharedMemoryElasticPool("2GiB")
    w, r = pool.open_writer(), pool.open_reader()
    held = []
    for _ in range(12):  # an epoch of 128 MiB batches, 3 alive at a time
        held.append(ta.restore(offload_array(pool, w, 128 * MiB), r))
        del held[:-3]
    held.clear()
    assert pool.usage()["committed_high_water"] >= 3 * 128 * MiB
    for _ in range(2 * 40):  # two epochs of 1 MiB batches
        held.append(ta.restore(offload_array(pool, w, MiB), r))
        del held[:-3]
    assert committed(pool) <= 64 * MiB


def test_variable_sizes_do_not_grow_committed_memory():
    pool = ta.SharedMemoryElasticPool("2GiB")
    w, r = pool.open_writer(), pool.open_reader()
    rng = random.Random(0)
    held, peaks = [], []
    for epoch in range(6):
        for _ in range(15):  # padded sequences: a random length per batch, often larger than any warm extent
            held.append(ta.restore(offload_array(pool, w, rng.randint(2, 96) * MiB + rng.randint(0, 9999)), r))
            del held[:-3]
        peaks.append(committed(pool))
    usage = pool.usage()
    assert usage["committed_high_water"] <= usage["bytes_high_water"] * 5 // 4 + 16 * MiB
    assert max(peaks[3:]) <= max(peaks[:3]) * 1.1


def test_trim_gives_warm_memory_back():
    pool = ta.SharedMemoryElasticPool("1GiB")
    w, r = pool.open_writer(), pool.open_reader()
    keep = ta.restore(offload_array(pool, w, 8 * MiB), r)
    gone = ta.restore(offload_array(pool, w, 8 * MiB), r)
    del gone
    assert committed(pool) >= 16 * MiB
    assert pool.trim() >= 8 * MiB
    assert 8 * MiB <= committed(pool) < 9 * MiB  # the unit in use is untouched
    assert int(keep[0]) == 7


# -- the cap ---------------------------------------------------------------------------------


def test_cap_reached_waits_then_times_out_naming_the_cap():
    pool = ta.SharedMemoryElasticPool("16MiB", acquire_timeout=0.3)
    w, r = pool.open_writer(), pool.open_reader()
    held = ta.restore(offload_array(pool, w, 12 * MiB), r)
    started = time.monotonic()
    with pytest.raises(ta.ArenaSpaceTimeout, match=r"16\.0 MiB cap \(max_bytes\).*raise max_bytes") as info:
        ta.offload(np.zeros(8 * MiB, np.uint8), w)
    assert isinstance(info.value, BufferError)
    assert time.monotonic() - started >= 0.3
    assert pool.usage()["units_in_use"] == 1  # the failed unit was aborted
    del held


def test_writer_waiting_at_the_cap_proceeds_when_a_view_dies():
    pool = ta.SharedMemoryElasticPool("16MiB", acquire_timeout=60)
    w, r = pool.open_writer(), pool.open_reader()
    held = [ta.restore(offload_array(pool, w, 12 * MiB), r)]
    timer = threading.Timer(0.3, held.clear)  # the consumer drops its batch later
    timer.start()
    env = ta.offload(np.ones(8 * MiB, np.uint8), w)  # waits for the release, then fits
    timer.join()
    assert int(ta.restore(env, r).sum()) == 8 * MiB
    assert committed(pool) <= 16 * MiB


def test_unit_larger_than_the_cap_fails_at_once():
    pool = ta.SharedMemoryElasticPool("4MiB", acquire_timeout=30)
    w = pool.open_writer()
    started = time.monotonic()
    with pytest.raises(BufferError, match=r"does not fit a pool capped at 4\.0 MiB.*raise max_bytes"):
        ta.offload(np.zeros(5 * MiB, np.uint8), w)
    assert time.monotonic() - started < 10  # no waiting: waiting cannot help
    assert pool.usage()["units_in_use"] == 0


@pytest.mark.parametrize(
    "value, expected",
    [("4GiB", 4 << 30), ("512MB", 512 * 10**6), (1.5e9, 1_500_000_000), (64 << 20, 64 << 20), ("2 MiB", 2 << 20)],
)
def test_max_bytes_accepts_ints_floats_and_strings(value, expected):
    assert ta.SharedMemoryElasticPool(value).max_bytes == expected


@pytest.mark.parametrize("value", [0, -1, 1.5, "lots", "4 GiBs", True, [4]])
def test_max_bytes_rejects_nonsense_with_the_accepted_forms(value):
    with pytest.raises(ValueError, match=r"max_bytes must be a positive number of bytes.*'4GiB'"):
        ta.SharedMemoryElasticPool(value)


# -- envelopes --------------------------------------------------------------------------------


def test_envelope_bounds_checked_against_the_extent_table():
    pool = ta.SharedMemoryElasticPool("64MiB")
    w, r = pool.open_writer(), pool.open_reader()
    env = ta.offload(np.zeros(1 * MiB, np.uint8), w)
    token, span, body = parse_envelope(env)
    with pytest.raises(ValueError, match="corrupt envelope: span 12345 names unit slot 12345"):
        ta.restore(pack_envelope(token, 12345, bytes(body)), r)
    with pytest.raises(ValueError, match="stale or corrupt envelope: unit 7 generation 0"):
        ta.restore(pack_envelope(token, 7, bytes(body)), r)
    unit = r.open_unit(span)
    (start, length), = unit.extents
    assert unit.view(start, MiB).nbytes == MiB
    for offset, nbytes in [(start + length - 10, 11), (start - 1, 10), (start, -1), (10 * length, 1)]:
        with pytest.raises(ValueError, match="corrupt envelope: binary at offset"):
            unit.view(offset, nbytes)
    unit.finish()
    del unit
    assert pool.usage()["units_in_use"] == 0


def test_an_envelope_restores_once():
    pool = ta.SharedMemoryElasticPool("64MiB")
    w, r = pool.open_writer(), pool.open_reader()
    env = ta.offload(np.zeros(MiB, np.uint8), w)
    out = ta.restore(env, r)
    with pytest.raises(ValueError, match="can be restored once"):
        ta.restore(env, r)
    del out


# -- processes ----------------------------------------------------------------------------------


def _grow(pool, producer: int, out_q) -> None:
    """Write units that grow from 64 KiB to 24 MiB, each filled with its number."""
    writer = pool.open_writer()
    for i in range(12):
        n = (64 << 10) << (i % 10)
        out_q.put((producer, i, n, ta.offload(np.full(n, (producer * 16 + i) % 251, np.uint8), writer)))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_several_producers_grow_it_at_once(method):
    import multiprocessing as mp

    ctx = mp.get_context(method)
    pool = ta.SharedMemoryElasticPool("512MiB", acquire_timeout=30)
    reader = pool.open_reader()
    out_q = ctx.Queue()
    procs = [ctx.Process(target=_grow, args=(pool, p, out_q)) for p in range(3)]
    for proc in procs:
        proc.start()
    seen, kept = set(), []
    for _ in range(36):
        producer, i, n, env = out_q.get(timeout=120)
        out = ta.restore(env, reader)
        assert out.nbytes == n and int(out[0]) == int(out[-1]) == (producer * 16 + i) % 251
        seen.add((producer, i))
        kept.append(out)
        del kept[:-5]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert len(seen) == 36
    usage = pool.usage()
    assert usage["committed_high_water"] <= usage["bytes_high_water"] * 5 // 4 + 16 * MiB + 3 * (24 * MiB)
    del out
    kept.clear()
    assert pool.usage()["units_in_use"] == 0


def _die_mid_unit(pool) -> None:
    writer = pool.open_writer()
    writer.begin_unit()
    _, view = writer.allocate(10 * MiB)
    view[:] = 1
    os.kill(os.getpid(), 9)


@pytest.mark.slow
def test_writer_killed_mid_extent_is_reclaimed():
    import multiprocessing as mp

    pool = ta.SharedMemoryElasticPool("16MiB", acquire_timeout=10)
    proc = mp.get_context("fork").Process(target=_die_mid_unit, args=(pool,))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -9
    assert pool.usage()["units_in_use"] == 1  # the dead writer's unit
    w, r = pool.open_writer(), pool.open_reader()
    out = ta.restore(offload_array(pool, w, 12 * MiB), r)  # needs the dead unit's room
    assert int(out[0]) == 7 and pool.usage()["units_in_use"] == 1
    del out
    assert committed(pool) <= 16 * MiB


def test_pickled_pool_is_the_same_arena():
    import pickle

    from multiprocessing.reduction import ForkingPickler

    pool = ta.SharedMemoryElasticPool("64MiB")
    clone = pickle.loads(ForkingPickler.dumps(pool))
    assert clone.token == pool.token and clone.max_bytes == pool.max_bytes
    out = ta.restore(offload_array(clone, clone.open_writer(), MiB), pool.open_reader())
    assert pool.usage()["units_in_use"] == 1 and int(out[0]) == 7


# -- the loader ---------------------------------------------------------------------------------


class Big(torch.utils.data.Dataset):
    def __init__(self, n: int, shape: tuple[int, ...]) -> None:
        self.n, self.shape = n, shape

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full(self.shape, float(i))


@pytest.mark.slow
def test_loader_default_moves_big_batches_without_fallback():
    # 16 x 3 x 224 x 224 float32 = 9.2 MiB... and ImageNet-sized 73.5 MiB batches
    for batch_size, n in ((16, 64), (128, 384)):
        loader = ta.ArenaDataLoader(Big(n, (3, 224, 224)), batch_size=batch_size, num_workers=2)
        assert isinstance(loader, torch.utils.data.DataLoader)
        got = [int(b[:, 0, 0, 0].sum()) for b in loader]
        assert got == [sum(range(i, i + batch_size)) for i in range(0, n, batch_size)]
        stats = loader.arena_stats
        assert stats.fallbacks == 0 and stats.batches == n // batch_size
        assert stats.committed_high_water <= stats.high_water_bytes * 5 // 4 + 16 * MiB
        loader.release_arena()


@pytest.mark.slow
def test_loader_that_keeps_every_batch_never_falls_back_or_stalls():
    loader = ta.ArenaDataLoader(Big(96, (256, 1024)), batch_size=4, num_workers=2)  # 4 MiB batches
    kept = list(loader)
    assert [int(b[0, 0, 0]) for b in kept] == list(range(0, 96, 4))
    stats = loader.arena_stats
    assert stats.fallbacks == 0 and stats.batches == 24
    assert stats.wait_seconds < 0.5
    assert stats.bytes_in_flight >= 24 * 4 * MiB  # all held, none reused under them
    del kept
    assert loader.arena_stats.bytes_in_flight == 0


def test_loader_budget_strings_and_errors():
    loader = ta.ArenaDataLoader(Big(8, (4,)), batch_size=2, num_workers=2, arena_budget="32MiB")
    assert loader.arena_budget == 32 << 20
    assert ta.ArenaDataLoader(Big(8, (4,)), arena_budget=1.5e9).arena_budget == 1_500_000_000
    with pytest.raises(ValueError, match=r"arena_budget must be a positive number of bytes.*'4GiB'"):
        ta.ArenaDataLoader(Big(8, (4,)), arena_budget="a lot")


@pytest.mark.slow
def test_user_pool_with_too_few_segments_warns_at_iter():
    pool = ta.SharedMemorySegmentPool(1 << 20, 2, acquire_timeout=1.0)
    loader = ta.ArenaDataLoader(Big(8, (16,)), batch_size=2, num_workers=2, arena=pool)
    with pytest.warns(ta.ArenaFallbackWarning, match=r"holds 2 batches at once, but the loader keeps up to 6 batches"):
        it = iter(loader)
    assert len(list(it)) == 4
    del it
    loader.release_arena()
