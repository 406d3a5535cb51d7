"""SharedMemoryRingBuffer: private copies, space accounting, wrap-around, failure modes."""

from __future__ import annotations

import os
import random
import re
import threading
import time

import numpy as np
import pytest
import torch

import torch_arena as ta
from torch_arena._codec import envelope as _codec
from conftest import assert_same, crc, data_region, in_child, inside_arena

KiB = 1024


def assert_empty(ring: ta.SharedMemoryRingBuffer) -> None:
    used = ring.usage()
    assert used["units_in_use"] == 0 and used["bytes_in_use"] == 0, used


# -- types and copies ---------------------------------------------------------------


def test_restores_original_types(ring):
    w, r = ring.open_writer(), ring.open_reader()
    item = {
        "bytes": b"\x01" * 10_000,
        "bytearray": bytearray(b"\x02" * 10_000),
        "memoryview": memoryview(b"\x03" * 10_000),
        "array": np.arange(20_000, dtype=np.float32),
        "tensor": torch.arange(20_000, dtype=torch.int16),
    }
    env = ta.offload(item, w)
    assert len(env) < 1024
    out = ta.restore(env, r)
    assert type(out["bytes"]) is bytes and out["bytes"] == item["bytes"]
    assert type(out["bytearray"]) is bytearray and out["bytearray"] == item["bytearray"]
    assert type(out["memoryview"]) is memoryview and out["memoryview"].tobytes() == b"\x03" * 10_000
    assert_same(item, out)
    assert_empty(ring)  # a ring unit is free as soon as it is restored


def test_restores_are_private_copies(ring):
    w, r = ring.open_writer(), ring.open_reader()
    item = {
        "a": np.arange(50_000, dtype=np.int32),
        "t": torch.arange(30_000, dtype=torch.float64),
        "mv": memoryview(bytearray(b"\x07" * 9000)),
    }
    env = ta.offload(item, w)
    snapshot = data_region(ring).copy()
    out = ta.restore(env, r)
    for key in ("a", "t", "mv"):
        assert not inside_arena(ring, out[key]), f"{key} points into the ring"
    assert out["a"].flags.writeable
    out["a"][:] = -1
    out["t"][:] = 0.5
    out["mv"][0] = 0
    assert np.array_equal(data_region(ring), snapshot)  # the ring never saw the writes
    assert np.array_equal(item["a"], np.arange(50_000, dtype=np.int32))


def test_empty_unit_round_trips(ring):
    w, r = ring.open_writer(), ring.open_reader()
    for _ in range(3):
        assert ta.restore(ta.offload({"x": 1, "s": "small"}, w), r) == {"x": 1, "s": "small"}
    assert_empty(ring)


# -- full ring ---------------------------------------------------------------------------


def test_full_ring_raises_at_once_with_sizing_advice():
    ring = ta.SharedMemoryRingBuffer(64 * KiB)
    w, r = ring.open_writer(), ring.open_reader()
    first = ta.offload(np.zeros(40_000, np.uint8), w)
    start = time.monotonic()
    with pytest.raises(BufferError) as info:
        ta.offload(np.ones(40_000, np.uint8), w)
    assert time.monotonic() - start < 2.0  # no wait (margin for a loaded machine)
    msg = str(info.value)
    assert msg.startswith("shared-memory arena full: ")
    assert "(buffer_size + 2) × max_item_bytes" in msg
    assert "acquire_timeout > 0" in msg
    assert ring.usage()["units_in_use"] == 1  # the failed unit was aborted
    ta.restore(first, r)
    out = ta.restore(ta.offload(np.ones(40_000, np.uint8), w), r)
    assert np.all(out == 1)
    assert_empty(ring)
    ring.close()


def test_positive_timeout_waits_for_space_freed_by_another_thread():
    ring = ta.SharedMemoryRingBuffer(64 * KiB, acquire_timeout=10.0)
    w, r = ring.open_writer(), ring.open_reader()
    first = ta.offload(np.full(40_000, 1, np.uint8), w)
    got = {}

    def consume_later():
        time.sleep(0.3)
        got["first"] = ta.restore(first, r)

    thread = threading.Thread(target=consume_later)
    thread.start()
    start = time.monotonic()
    second = ta.offload(np.full(40_000, 2, np.uint8), w)
    waited = time.monotonic() - start
    thread.join()
    assert 0.25 <= waited < 5.0
    assert w.last_wait_seconds >= 0.25
    assert np.all(got["first"] == 1)
    assert np.all(ta.restore(second, r) == 2)
    assert_empty(ring)
    ring.close()


def test_positive_timeout_expires():
    ring = ta.SharedMemoryRingBuffer(64 * KiB, acquire_timeout=0.3)
    w, r = ring.open_writer(), ring.open_reader()
    first = ta.offload(np.zeros(40_000, np.uint8), w)
    start = time.monotonic()
    with pytest.raises(BufferError, match="^shared-memory arena full") as info:
        ta.offload(np.zeros(40_000, np.uint8), w)
    assert 0.25 <= time.monotonic() - start < 10.0  # the timeout, no hang (margin for load)
    assert "pass acquire_timeout" not in str(info.value)
    ta.restore(first, r)
    ring.close()


def test_shutdown_wakes_a_waiting_writer():
    ring = ta.SharedMemoryRingBuffer(64 * KiB, acquire_timeout=30.0)
    w = ring.open_writer()
    ta.offload(np.zeros(40_000, np.uint8), w)
    threading.Timer(0.2, ring.shutdown_arena).start()
    start = time.monotonic()
    with pytest.raises(BufferError, match="shut down"):
        ta.offload(np.zeros(40_000, np.uint8), w)
    assert time.monotonic() - start < 5.0
    ring.close()


# -- ordering and wrap-around -------------------------------------------------------------


def test_out_of_order_end_unit():
    ring = ta.SharedMemoryRingBuffer(256 * KiB)
    w, r = ring.open_writer(), ring.open_reader()
    envs = {name: ta.offload({"n": name, "x": np.full(60_000, i + 1, np.uint8)}, w) for i, name in enumerate("ABC")}
    used_all = ring.usage()["bytes_in_use"]
    out = ta.restore(envs["C"], r)
    assert out["n"] == "C" and np.all(out["x"] == 3)
    assert ring.usage()["units_in_use"] == 2
    assert ring.usage()["bytes_in_use"] == used_all  # the tail waits for A
    out = ta.restore(envs["A"], r)
    assert out["n"] == "A" and np.all(out["x"] == 1)
    assert 0 < ring.usage()["bytes_in_use"] < used_all
    out = ta.restore(envs["B"], r)
    assert out["n"] == "B" and np.all(out["x"] == 2)
    assert_empty(ring)
    # all the space came back: a unit of nearly the whole capacity fits
    big = np.arange(250 * KiB // 8, dtype=np.int64)
    assert np.array_equal(ta.restore(ta.offload(big, w), r), big)
    ring.close()


def test_wrap_around_many_units_of_varying_sizes():
    capacity = 200_000
    ring = ta.SharedMemoryRingBuffer(capacity)
    w, r = ring.open_writer(), ring.open_reader()
    rng = random.Random(1234)
    pending: list[tuple[bytes, int, list[int]]] = []
    written = restored = full_hits = 0

    def restore_one(index: int) -> None:
        nonlocal restored
        env, key, sums = pending.pop(index)
        out = ta.restore(env, r)
        assert out["key"] == key
        assert [crc(p) for p in out["parts"]] == sums
        restored += 1

    for key in range(600):
        parts = []
        for _ in range(rng.randint(1, 3)):
            n = rng.randint(1, 30_000)
            kind = rng.randrange(3)
            if kind == 0:
                parts.append(rng.randbytes(n))
            elif kind == 1:
                parts.append(np.frombuffer(rng.randbytes(n - n % 4 or 4), dtype=np.float32))
            else:
                parts.append(torch.from_numpy(np.frombuffer(rng.randbytes(n - n % 8 or 8), dtype=np.int64).copy()))
        item = {"key": key, "parts": parts}
        while True:
            try:
                env = ta.offload(item, w, threshold=rng.choice([0, 64, 4096]))
                break
            except BufferError as exc:
                assert str(exc).startswith("shared-memory arena full")
                full_hits += 1
                restore_one(rng.randrange(len(pending)))  # free a random unit, out of order
        pending.append((env, key, [crc(p) for p in parts]))
        written += sum(p.nbytes if hasattr(p, "nbytes") else len(p) for p in parts)
        if rng.random() < 0.4 and pending:
            restore_one(rng.randrange(len(pending)))
    while pending:
        restore_one(0)
    assert restored == 600
    assert written > 20 * capacity, "the ring did not wrap around often enough"
    assert full_hits > 0
    assert_empty(ring)
    ring.close()


def test_interleaved_units_of_two_writers():
    ring = ta.SharedMemoryRingBuffer(256 * KiB)
    w1, w2, r = ring.open_writer(), ring.open_writer(), ring.open_reader()
    w1.begin_unit()
    w2.begin_unit()
    placed = {1: [], 2: []}
    for k in range(4):
        for wid, w in ((1, w1), (2, w2)):
            data = bytes([wid * 16 + k]) * (5000 + 100 * k)
            placed[wid].append((w.write_binary(data), data))
    spans = {1: w1.commit_unit(), 2: w2.commit_unit()}
    for wid in (2, 1):
        for (offset, nbytes), data in placed[wid]:
            assert bytes(r.read_binary(offset, nbytes)) == data
        r.end_unit(spans[wid], [])
    assert_empty(ring)
    ring.close()


# -- failure modes -----------------------------------------------------------------------


def test_oversize_binary_names_both_sizes():
    ring = ta.SharedMemoryRingBuffer(64 * KiB)
    w = ring.open_writer()
    with pytest.raises(BufferError) as info:
        ta.offload({"big": np.zeros(100_000, np.uint8)}, w)
    msg = str(info.value)
    needed = re.search(r"\((\d+) bytes\) does not fit", msg)
    assert needed and 100_000 <= int(needed.group(1)) < 100_000 + 64, msg  # the unit's size...
    assert "65536 bytes" in msg and "raise capacity" in msg  # ...and the ring's
    assert_empty(ring)


def test_unit_larger_than_the_ring_fails_at_once_even_with_a_timeout():
    ring = ta.SharedMemoryRingBuffer(64 * KiB, acquire_timeout=30.0)
    w = ring.open_writer()
    start = time.monotonic()
    with pytest.raises(BufferError, match="does not fit"):
        ta.offload([np.zeros(40_000, np.uint8), np.zeros(40_000, np.uint8)], w)  # 80 KB in one unit
    assert time.monotonic() - start < 10.0  # not the 30 s timeout: waiting could never help
    assert_empty(ring)


def test_begin_twice_abort_and_double_restore(ring):
    w, r = ring.open_writer(), ring.open_reader()
    w.begin_unit()
    with pytest.raises(RuntimeError, match="already open"):
        w.begin_unit()
    w.allocate(10_000)
    assert ring.usage()["units_in_use"] == 1
    w.abort_unit()
    assert_empty(ring)
    with pytest.raises(RuntimeError):
        w.commit_unit()

    env = ta.offload(np.arange(10_000), w)
    assert np.array_equal(ta.restore(env, r), np.arange(10_000))
    with pytest.raises(ValueError, match="stale or corrupt"):
        ta.restore(env, r)
    token, span, body = _codec.parse_envelope(env)
    with pytest.raises(ValueError):
        ta.restore(_codec.pack_envelope(token, span + 12345, bytes(body)), r)
    assert_empty(ring)


def test_dead_writer_space_is_reclaimed():
    ring = ta.SharedMemoryRingBuffer(64 * KiB)

    def begin_and_die():
        w = ring.open_writer()
        w.begin_unit()
        w.allocate(50_000)[1][:] = 9

    in_child(begin_and_die)
    assert ring.usage()["units_in_use"] == 1
    w, r = ring.open_writer(), ring.open_reader()
    out = ta.restore(ta.offload(np.full(40_000, 4, np.uint8), w), r)
    assert np.all(out == 4)
    assert_empty(ring)


def test_reclaim_frees_committed_units_of_dead_producers():
    ring = ta.SharedMemoryRingBuffer(256 * KiB)

    def produce_and_die():
        w = ring.open_writer()
        for i in range(3):
            ta.offload({"i": i, "a": np.full(5000, i, np.int64)}, w)

    child = in_child(produce_and_die)
    assert ring.usage()["units_in_use"] == 3
    assert ring.reclaim([os.getpid()]) == 0
    assert ring.reclaim([child]) == 3
    assert_empty(ring)
    w, r = ring.open_writer(), ring.open_reader()
    big = np.arange(250 * KiB // 8, dtype=np.int64)
    assert np.array_equal(ta.restore(ta.offload(big, w), r), big)
    ring.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(capacity=0), "capacity must be a positive int, got 0"),
        (dict(capacity=-5), "capacity must be a positive int, got -5"),
        (dict(capacity=1024, acquire_timeout=-1), "acquire_timeout must be a number of seconds >= 0, got -1"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    capacity = kwargs.pop("capacity")
    with pytest.raises(ValueError, match=re.escape(message)):
        ta.SharedMemoryRingBuffer(capacity, **kwargs)
