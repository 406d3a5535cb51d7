"""SharedMemorySegmentPool: zero-copy restores, segment life cycle, failure modes."""

from __future__ import annotations

import os
import pickle
import re
import time

import numpy as np
import pytest
import torch

import torch_arena as ta
from torch_arena._arena import units as _units
from torch_arena._arena.arena_file import ArenaFile
from torch_arena._codec import envelope as _codec
from conftest import arena_bytes_at, assert_same, collect, in_child, inside_arena

KiB = 1024


def seg_of(envelope: bytes) -> int:
    """The segment index an envelope's unit lives in."""
    _, span, _ = _codec.parse_envelope(envelope)
    return span & 0xFFFFFFFF


def table_states(file: ArenaFile) -> list[int]:
    """Segment states read straight from the shared header (works after close())."""
    return _units.UnitTable(file).state.tolist()


# -- round trips --------------------------------------------------------------


def test_round_trip_mixed_item(pool):
    w, r = pool.open_writer(), pool.open_reader()
    item = {
        "image": np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8),
        "label": 7,
        "name": "sample-0",
        "tensor": torch.randn(128, 64),
        "raw": bytes(range(256)) * 32,
        "small": b"tiny",
        "nested": [np.arange(5000, dtype=np.float64), (torch.arange(3000), {"k": b"z" * 9000})],
    }
    env = ta.offload(item, w)
    assert len(env) < 2048, "large leaves must not be pickled into the envelope"
    assert pool.segment_states().count("committed") == 1
    out = ta.restore(env, r)
    assert_same(item, out)
    assert type(out["small"]) is bytes  # below the threshold: inline, type kept
    assert isinstance(out["raw"], memoryview)  # the pool hands bytes back as a view
    used = pool.usage()
    assert used["units_in_use"] == 1 and used["bytes_in_use"] > 0
    del out
    assert pool.segment_states() == ["free"] * 4
    assert pool.usage()["units_in_use"] == 0 and pool.usage()["bytes_in_use"] == 0


def test_many_round_trips_reuse_segments(pool):
    w, r = pool.open_writer(), pool.open_reader()
    rng = np.random.default_rng(1)
    for i in range(50):
        a = rng.standard_normal(int(rng.integers(1000, 100_000)) // 8)
        out = ta.restore(ta.offload({"i": i, "a": a}, w), r)
        assert out["i"] == i and np.array_equal(out["a"], a)
    del out
    assert pool.usage()["units_high_water"] == 2  # a restored unit and the next one
    assert pool.segment_states() == ["free"] * 4


# -- zero-copy, writable views ------------------------------------------------------


def test_restores_are_zero_copy_writable_views(pool):
    w, r = pool.open_writer(), pool.open_reader()
    a = np.arange(50_000, dtype=np.int32)
    t = torch.arange(30_000, dtype=torch.float64)
    b = bytes(range(256)) * 40
    out = ta.restore(ta.offload({"a": a, "t": t, "b": b}, w), r)
    for key in ("a", "t", "b"):
        assert inside_arena(pool, out[key]), f"{key} was copied out of the pool"

    assert out["a"].flags.writeable
    out["a"][7] = -5
    assert arena_bytes_at(pool, out["a"], a.nbytes).view(np.int32)[7] == -5
    assert a[7] == 7  # the source is untouched

    out["t"][3] = 2.5
    assert arena_bytes_at(pool, out["t"], t.nbytes).view(np.float64)[3] == 2.5

    mv = out["b"]
    assert isinstance(mv, memoryview) and not mv.readonly
    mv[0] = 0xAB
    assert arena_bytes_at(pool, mv, 1)[0] == 0xAB


# -- release order ------------------------------------------------------------------


@pytest.mark.parametrize("held_index", [0, 1, 2])
def test_holding_one_unit_never_stalls_the_others(held_index):
    pool = ta.SharedMemorySegmentPool(256 * KiB, 3, acquire_timeout=1.0)
    w, r = pool.open_writer(), pool.open_reader()
    envs = [ta.offload({"i": i, "x": np.full(100_000, i, np.uint8)}, w) for i in range(3)]
    outs = [ta.restore(e, r) for e in envs]
    held = outs[held_index]
    held_seg = seg_of(envs[held_index])
    del outs
    assert pool.segment_states().count("restored") == 1
    assert pool.segment_states()[held_seg] == "restored"

    start = time.monotonic()
    for i in range(3, 60):
        env = ta.offload({"i": i, "x": np.full(100_000, i % 251, np.uint8)}, w)
        assert seg_of(env) != held_seg
        out = ta.restore(env, r)
        assert out["i"] == i and int(out["x"].min()) == int(out["x"].max()) == i % 251
        del out
    assert time.monotonic() - start < 5.0
    assert w.last_wait_seconds < 0.5
    assert held["i"] == held_index and np.all(held["x"] == held_index)
    del held
    assert pool.segment_states() == ["free"] * 3
    pool.close()


@pytest.mark.parametrize("order", [(2, 0, 1), (1, 2, 0), (0, 1, 2)])
def test_each_segment_frees_the_moment_its_last_view_dies(order):
    pool = ta.SharedMemorySegmentPool(128 * KiB, 3)
    w, r = pool.open_writer(), pool.open_reader()
    envs = [ta.offload(np.full(60_000, i, np.uint8), w) for i in range(3)]
    outs = {i: ta.restore(envs[i], r) for i in range(3)}
    segs = {i: seg_of(envs[i]) for i in range(3)}
    freed: set[int] = set()
    for i in order:
        view = outs[i][10:20]  # a derived view outlives the array for one step
        del outs[i]
        assert pool.segment_states()[segs[i]] == "restored"
        del view  # no gc.collect(): reference counting alone releases it
        freed.add(segs[i])
        states = pool.segment_states()
        for s in range(3):
            assert (states[s] == "free") == (s in freed), states
    pool.close()


def test_release_queued_while_lock_held_is_applied_on_unlock(pool):
    w, r = pool.open_writer(), pool.open_reader()
    env = ta.offload(np.ones(10_000), w)
    out = ta.restore(env, r)
    seg = seg_of(env)
    state = pool.file
    with state.locked() as header:
        del out  # the finalizer cannot take the lock now: the release is queued
        assert table_states(state)[seg] == _units.HELD
    assert pool.segment_states()[seg] == "free"


# -- derived views keep their segment --------------------------------------------------

DERIVATIONS = {
    "numpy-slice": lambda out: out["a"][1000:2000],
    "numpy-reshape": lambda out: out["a"].reshape(100, -1),
    "numpy-transpose-of-slice": lambda out: out["a"][:4000].reshape(40, 100).T,
    "torch-from-numpy-slice": lambda out: torch.from_numpy(out["a"][10:]),
    "tensor-slice": lambda out: out["t"][100:],
    "tensor-view": lambda out: out["t"].view(-1, 10)[3],
    "memoryview-slice": lambda out: out["b"][100:200],
    "numpy-of-memoryview": lambda out: np.frombuffer(out["b"], dtype=np.uint8)[5:],
}


def _as_bytes(x) -> bytes:
    if isinstance(x, torch.Tensor):
        return x.contiguous().numpy().tobytes()
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x).tobytes()
    return x.tobytes()


def _churn(pool, w, r, rounds: int, avoid_seg: int) -> None:
    for k in range(rounds):
        env = ta.offload(
            {"a": np.full(10_000, 0xEEEE, np.int32), "t": torch.full((5000,), -1.0), "b": b"\xee" * 8192},
            w,
        )
        assert seg_of(env) != avoid_seg, "a writer was handed a segment with a live view"
        out = ta.restore(env, r)
        out["a"][:] = k  # scribble over the whole unit
        del out


@pytest.mark.parametrize("derive", list(DERIVATIONS), ids=list(DERIVATIONS))
def test_derived_view_keeps_segment_reserved_and_intact(derive):
    pool = ta.SharedMemorySegmentPool(256 * KiB, 2, acquire_timeout=1.0)
    w, r = pool.open_writer(), pool.open_reader()
    item = {
        "a": np.arange(10_000, dtype=np.int32),
        "t": torch.arange(5000, dtype=torch.float32),
        "b": bytes(range(256)) * 32,
    }
    env = ta.offload(item, w)
    seg = seg_of(env)
    out = ta.restore(env, r)
    derived = DERIVATIONS[derive](out)
    expected = _as_bytes(DERIVATIONS[derive](item if derive != "memoryview-slice" else {"b": memoryview(item["b"])}))
    del out
    collect()
    assert pool.segment_states()[seg] == "restored"

    _churn(pool, w, r, 8, seg)
    r.reset()
    w.reset()
    _churn(pool, w, r, 8, seg)
    assert _as_bytes(derived) == expected

    state = pool.file
    pool.close()
    assert pool.closed
    with pytest.raises(ValueError, match="closed"):
        pool.open_writer()
    assert _as_bytes(derived) == expected  # memory still mapped after close()
    assert table_states(state)[seg] == _units.HELD
    del derived
    collect()
    # released: the next writer collects it (see NOTE [ Arena units, leases, locks and fork ])
    assert table_states(state)[seg] == _units.RELEASED
    assert _units.HELD not in table_states(state)


def test_writer_cannot_write_after_close(pool):
    w = pool.open_writer()
    pool.close()
    with pytest.raises(ValueError, match="closed"):
        ta.offload(np.zeros(10_000), w)
    pool.close()  # idempotent


def test_context_manager_closes():
    with ta.SharedMemorySegmentPool(64 * KiB, 1) as p:
        assert not p.closed
    assert p.closed
    p.unlink()  # no-op, never raises


# -- failure modes --------------------------------------------------------------------


def test_acquire_timeout_names_count_and_segment_size():
    pool = ta.SharedMemorySegmentPool(64 * KiB, 2, acquire_timeout=1.0)
    w, r = pool.open_writer(), pool.open_reader()
    envs = [ta.offload(np.zeros(5000), w) for _ in range(2)]  # committed, unread
    start = time.monotonic()
    with pytest.raises(BufferError) as info:
        ta.offload(np.zeros(5000), w)
    waited = time.monotonic() - start
    assert 0.95 <= waited < 15.0  # the whole timeout, and no hang (margin for a loaded machine)
    msg = str(info.value)
    assert "2 segments" in msg and "64.0 KiB" in msg and "acquire_timeout" in msg
    assert pool.segment_states() == ["committed", "committed"]

    start = time.monotonic()
    with pytest.raises(BufferError):
        w.begin_unit(timeout=0)
    assert time.monotonic() - start < waited / 2  # no wait at all, unlike the call above

    # the writer is ready for the next item once space comes back
    ta.restore(envs[0], r)
    out = ta.restore(ta.offload(np.full(5000, 3.0), w), r)
    assert np.all(out == 3.0)
    del out
    ta.restore(envs[1], r)
    assert pool.segment_states() == ["free", "free"]


def test_waiting_writer_wakes_when_a_view_dies():
    import threading

    pool = ta.SharedMemorySegmentPool(64 * KiB, 1, acquire_timeout=10.0)
    w, r = pool.open_writer(), pool.open_reader()
    held = [ta.restore(ta.offload(np.zeros(1000), w), r)]
    threading.Timer(0.3, held.clear).start()
    start = time.monotonic()
    out = ta.restore(ta.offload(np.ones(1000), w), r)
    assert 0.25 <= time.monotonic() - start < 5.0
    assert w.last_wait_seconds >= 0.25
    assert np.all(out == 1)


def test_oversize_unit_names_both_sizes():
    pool = ta.SharedMemorySegmentPool(64 * KiB, 2)
    w = pool.open_writer()
    with pytest.raises(BufferError) as info:
        ta.offload({"big": np.zeros(100_000, np.uint8)}, w)
    msg = str(info.value)
    assert "100000 bytes" in msg and "65536 bytes" in msg and "segment_size" in msg
    assert pool.segment_states() == ["free", "free"]  # the unit was aborted
    assert pool.usage()["units_in_use"] == 0


def test_begin_unit_twice_raises(pool):
    w = pool.open_writer()
    w.begin_unit()
    with pytest.raises(RuntimeError, match="already open"):
        w.begin_unit()
    w.abort_unit()
    assert pool.segment_states() == ["free"] * 4


def test_unit_calls_out_of_sequence_raise(pool):
    w = pool.open_writer()
    with pytest.raises(RuntimeError):
        w.commit_unit()
    with pytest.raises(RuntimeError):
        w.abort_unit()
    with pytest.raises(RuntimeError):
        w.write_binary(b"x")


def test_abort_frees_the_segment(pool):
    w = pool.open_writer()
    w.begin_unit()
    offset, view = w.allocate(1000)
    view[:] = 1
    assert pool.segment_states().count("being written") == 1
    assert pool.usage()["units_in_use"] == 1
    w.abort_unit()
    assert pool.segment_states() == ["free"] * 4
    assert pool.usage()["units_in_use"] == 0

    w.begin_unit()
    w.reset()  # reset abandons an open unit
    assert pool.segment_states() == ["free"] * 4


def test_failed_offload_aborts_its_unit(pool):
    w = pool.open_writer()
    with pytest.raises((pickle.PicklingError, AttributeError), match="lambda"):
        ta.offload({"ok": np.zeros(10_000), "bad": lambda: None}, w)
    assert pool.segment_states() == ["free"] * 4
    w.begin_unit()  # the writer is not left mid-unit
    w.abort_unit()


def test_double_and_stale_restore_raise(pool):
    w, r = pool.open_writer(), pool.open_reader()
    env = ta.offload(np.arange(10_000), w)
    out = ta.restore(env, r)
    with pytest.raises(ValueError, match="stale or corrupt"):
        ta.restore(env, r)
    assert np.array_equal(out, np.arange(10_000))  # the live unit is unaffected
    seg = seg_of(env)
    del out
    # the segment is reused: the old envelope names an older generation
    envs = [ta.offload(np.full(10_000, i), w) for i in range(4)]
    assert seg in {seg_of(e) for e in envs}
    with pytest.raises(ValueError, match="stale or corrupt"):
        ta.restore(env, r)
    for i, e in enumerate(envs):
        assert np.all(ta.restore(e, r) == i)


def test_corrupt_span_raises_and_leaves_the_unit_readable(pool):
    w, r = pool.open_writer(), pool.open_reader()
    env = ta.offload(np.arange(10_000), w)
    token, span, body = _codec.parse_envelope(env)
    seg, gen = span & 0xFFFFFFFF, span >> 32
    for bad in ((gen << 32) | 99, ((gen + 1) << 32) | seg, ((gen - 1) << 32) | seg, (gen << 32) | ((seg + 1) % 4)):
        with pytest.raises(ValueError):
            ta.restore(_codec.pack_envelope(token, bad, bytes(body)), r)
    assert np.array_equal(ta.restore(env, r), np.arange(10_000))
    assert pool.segment_states() == ["free"] * 4


# -- dead producers ------------------------------------------------------------------


def test_segment_of_a_dead_writer_is_reclaimed_by_the_next_acquire():
    pool = ta.SharedMemorySegmentPool(64 * KiB, 1, acquire_timeout=30.0)

    def begin_and_die():
        w = pool.open_writer()
        w.begin_unit()
        w.allocate(1000)[1][:] = 7

    child = in_child(begin_and_die)
    assert pool.segment_states() == ["being written"]
    assert _units.UnitTable(pool.file).owner[0] == child  # owner pid
    w, r = pool.open_writer(), pool.open_reader()
    start = time.monotonic()
    out = ta.restore(ta.offload(np.full(1000, 5.0), w), r)
    assert time.monotonic() - start < 10.0  # reclaimed at once, not after the 30 s timeout
    assert np.all(out == 5.0)
    del out
    assert pool.segment_states() == ["free"]
    assert pool.usage()["units_in_use"] == 0


def test_reclaim_frees_committed_units_of_dead_producers():
    pool = ta.SharedMemorySegmentPool(64 * KiB, 4)
    read_fd, write_fd = os.pipe()

    def produce_and_die():
        w = pool.open_writer()
        envs = [ta.offload({"i": i, "a": np.full(5000, i, np.int64)}, w) for i in range(3)]
        os.write(write_fd, len(envs[0]).to_bytes(4, "little") + envs[0])

    child = in_child(produce_and_die)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        n = int.from_bytes(f.read(4), "little")
        first = f.read(n)
    assert pool.segment_states().count("committed") == 3
    held = ta.restore(first, pool.open_reader())  # one of them was read

    assert pool.reclaim([os.getpid()]) == 0  # alive: never touched
    assert pool.reclaim([child]) == 2
    states = pool.segment_states()
    assert states.count("restored") == 1 and states.count("free") == 3
    assert held["i"] == 0 and np.all(held["a"] == 0)
    assert pool.usage()["units_in_use"] == 1
    assert pool.reclaim([child]) == 0
    del held
    assert pool.segment_states() == ["free"] * 4
    item_bytes = np.full(5000, 0, np.int64).nbytes  # one 64-byte-aligned binary per unit
    assert pool.usage() == {
        "committed_bytes": 4 * 64 * KiB,  # a fixed pool holds all of its memory
        "committed_high_water": 4 * 64 * KiB,
        "units_in_use": 0,
        "units_high_water": 3,
        "bytes_in_use": 0,
        "bytes_high_water": 3 * item_bytes,  # the three committed at once
    }


# -- argument checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(segment_size=0, count=1), "segment_size must be a positive int, got 0"),
        (dict(segment_size=1024, count=0), "count must be a positive int, got 0"),
        (dict(segment_size=1.5, count=1), "segment_size must be a positive int, got 1.5"),
        (dict(segment_size=1024, count=True), "count must be a positive int, got True"),
        (dict(segment_size=1024, count=1, acquire_timeout=-1), "acquire_timeout must be a number of seconds >= 0"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    segment_size, count = kwargs.pop("segment_size"), kwargs.pop("count")
    with pytest.raises(ValueError, match=re.escape(message)):
        ta.SharedMemorySegmentPool(segment_size, count, **kwargs)


def test_impossible_size_is_a_memory_error():
    with pytest.raises(MemoryError, match="cannot reserve|could not reserve"):
        ta.SharedMemorySegmentPool(1 << 40, 1 << 10)


def test_shutdown_wakes_a_writer_waiting_for_a_segment():
    import threading

    pool = ta.SharedMemorySegmentPool(64 * KiB, 1, acquire_timeout=30.0)
    w = pool.open_writer()
    env = ta.offload(np.zeros(1000), w)  # the only segment: committed, unread
    threading.Timer(0.2, pool.shutdown_arena).start()
    start = time.monotonic()
    with pytest.raises(BufferError, match="shut down while waiting"):
        ta.offload(np.zeros(1000), w)
    assert 0.15 <= time.monotonic() - start < 10.0  # woken by the shutdown, not the 30 s timeout
    assert pool.segment_states() == ["committed"]
    del env
    pool.close()
