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
from torch_arena._lease import flush as flush_leases
from torch_arena._memory import committed_bytes

MiB = 1 << 20


def committed(pool) -> int:
    """What the kernel holds for the pool's data region right now."""
    return committed_bytes(pool.state.files.memory_fd) - pool.state.header_bytes


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
    state = pool.state
    pool.close()
    del w, r
    gc.collect()
    assert int(out[-1]) == 9 and out.sum() == 9 * 3 * MiB
    del out
    flush_leases()  # what the reaper thread does a moment later
    assert int(state.header[6]) == 0  # bytes in use: released after close, too


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
        for _ in range(30):  # padded sequences: a random length per batch
            held.append(ta.restore(offload_array(pool, w, rng.randint(1, 48) * MiB + rng.randint(0, 9999)), r))
            del held[:-4]
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
    token_end = 4 + 8  # magic, token, then the span
    with pytest.raises(ValueError, match="corrupt envelope: span 12345 names unit slot 12345"):
        ta.restore(env[:token_end] + (12345).to_bytes(8, "little") + env[token_end + 8 :], r)
    with pytest.raises(ValueError, match="stale or corrupt envelope: unit 7 generation 0"):
        ta.restore(env[:token_end] + (7).to_bytes(8, "little") + env[token_end + 8 :], r)
    span = int.from_bytes(env[token_end : token_end + 8], "little")
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
