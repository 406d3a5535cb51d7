"""restore: corrupt, truncated, forged and foreign envelopes; objects that fail to rebuild."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch

import torch_arena as ta
from torch_arena._codec import envelope as _codec
from conftest import assert_arena_idle, assert_same, round_trip
from conftest import zero_copy as is_pool


# -- corrupt envelopes ------------------------------------------------------------------------

ITEM = {"a": np.arange(3000, dtype=np.int32), "t": torch.ones(100, 50), "b": b"x" * 5000, "s": "hello"}


def test_header_bit_flips_raise_value_error(arena):
    w, r = arena.open_writer(), arena.open_reader()
    env = ta.offload(ITEM, w)
    for pos in range(_codec._HEADER.size):
        for bit in range(8):
            bad = bytearray(env)
            bad[pos] ^= 1 << bit
            with pytest.raises(ValueError):
                ta.restore(bytes(bad), r)
    assert_same(ITEM, ta.restore(env, r))  # the real unit was never disturbed
    assert_arena_idle(arena)


def test_truncated_envelopes_raise_value_error(arena):
    w, r = arena.open_writer(), arena.open_reader()
    first = ta.offload(ITEM, w)
    length = len(first)
    ta.restore(first, r)
    for cut in list(range(0, 40)) + list(range(40, length, 7)) + [length - 1]:
        env = ta.offload(ITEM, w)
        with pytest.raises(ValueError):
            ta.restore(env[:cut], r)
        try:  # the unit was either never opened (header cut) or is already freed
            ta.restore(env, r)
        except ValueError:
            pass
    assert_arena_idle(arena)


def test_wrong_magic_and_wrong_type(arena):
    w, r = arena.open_writer(), arena.open_reader()
    env = ta.offload(ITEM, w)
    with pytest.raises(ValueError, match="bad magic"):
        ta.restore(b"XXXX" + env[4:], r)
    with pytest.raises(ValueError, match="bad magic"):
        ta.restore(pickle.dumps(ITEM), r)
    with pytest.raises(ValueError, match="shorter than"):
        ta.restore(b"", r)
    with pytest.raises(TypeError):
        ta.restore("not bytes", r)
    assert_same(ITEM, ta.restore(memoryview(env), r))
    assert_arena_idle(arena)


def test_envelope_from_another_arena(arena):
    others = [ta.SharedMemorySegmentPool(1 << 20, 2), ta.SharedMemoryRingBuffer(1 << 20)]
    w, r = arena.open_writer(), arena.open_reader()
    env = ta.offload(ITEM, w)
    for other in others:
        with pytest.raises(ValueError, match="belongs to arena"):
            ta.restore(env, other.open_reader())
        foreign = ta.offload(ITEM, other.open_writer())
        with pytest.raises(ValueError, match="belongs to arena"):
            ta.restore(foreign, r)
        ta.restore(foreign, other.open_reader())
        other.close()
    assert_same(ITEM, ta.restore(env, r))
    assert_arena_idle(arena)


class _Ref:
    def __init__(self, *pid):
        self.pid = pid


class _ForgingPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Ref) else None


def forge(writer, make_refs) -> bytes:
    """A well-formed envelope for a real unit whose references ``make_refs(base)`` names."""
    writer.begin_unit()
    base, view = writer.allocate(4096)
    view[:] = 0x5A
    span = writer.commit_unit()
    buf = io.BytesIO()
    _ForgingPickler(buf, protocol=5).dump(make_refs(base))
    return _codec.pack_envelope(writer.token, span, buf.getvalue())


NP_META = (np.dtype(np.uint8), (8,), "C")
FORGERIES = {
    "past-the-unit": lambda base: [_Ref("torch_arena", "numpy", base + 4096 + 64, 8, NP_META)],
    "straddles-the-end": lambda base: [_Ref("torch_arena", "numpy", base + 4090, 8, NP_META)],
    "huge-size": lambda base: [_Ref("torch_arena", "bytes", base, 10**12, (bytes, "B", (10**12,)))],
    "far-offset": lambda base: [_Ref("torch_arena", "numpy", 2**62, 8, NP_META)],
    "before-the-unit": lambda base: [_Ref("torch_arena", "numpy", base - 64, 8, NP_META)],
    "negative-offset": lambda base: [_Ref("torch_arena", "numpy", -8, 8, NP_META)],
    "negative-size": lambda base: [_Ref("torch_arena", "numpy", base, -8, NP_META)],
    "offset-not-int": lambda base: [_Ref("torch_arena", "numpy", "0", 8, NP_META)],
    "unknown-kind": lambda base: [_Ref("torch_arena", "no-such-kind", base, 8, NP_META)],
    "foreign-tag": lambda base: [_Ref("other", "numpy", base, 8, NP_META)],
    "short-reference": lambda base: [_Ref("torch_arena", "numpy", base)],
    "meta-mismatch": lambda base: [_Ref("torch_arena", "numpy", base, 8, (np.dtype(np.float64), (1000,), "C"))],
    "good-then-bad": lambda base: [
        _Ref("torch_arena", "numpy", base, 8, NP_META),
        _Ref("torch_arena", "numpy", base + 8192, 8, NP_META),
    ],
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_forged_references_raise_value_error(arena, name):
    w, r = arena.open_writer(), arena.open_reader()
    held = ta.restore(ta.offload(np.full(4000, 3, np.uint8), w), r)  # a neighbouring unit
    env = forge(w, FORGERIES[name])
    with pytest.raises(ValueError):
        ta.restore(env, r)
    with pytest.raises(ValueError):
        ta.restore(env, r)  # the unit was consumed: no leak, no second chance
    assert np.all(held == 3)
    del held
    assert_arena_idle(arena)


def test_reference_into_another_unit_is_refused(pool):
    w, r = pool.open_writer(), pool.open_reader()
    other = ta.offload(np.full(4000, 9, np.uint8), w)  # committed, in another segment
    _, other_span, _ = _codec.parse_envelope(other)
    other_base = (other_span & 0xFFFFFFFF) * pool.core.space.stride
    env = forge(w, lambda base: [_Ref("torch_arena", "numpy", other_base, 8, NP_META)])
    with pytest.raises(ValueError, match="outside"):
        ta.restore(env, r)
    assert np.all(ta.restore(other, r) == 9)
    assert_arena_idle(pool)


def test_forged_envelope_that_is_valid_restores(arena):
    w, r = arena.open_writer(), arena.open_reader()
    env = forge(w, lambda base: [_Ref("torch_arena", "numpy", base + 64, 8, NP_META)])
    out = ta.restore(env, r)
    assert list(out[0]) == [0x5A] * 8
    del out
    assert_arena_idle(arena)
