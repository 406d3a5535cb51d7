"""offload / restore: threshold validation and user payload handlers."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

import torch_arena as ta
from conftest import assert_arena_idle, assert_same, inside_arena, round_trip
from conftest import zero_copy as is_pool


def test_threshold_must_be_a_non_negative_int(pool):
    w = pool.open_writer()
    for bad in (-1, 1.5, True, "4096"):
        with pytest.raises(ValueError, match="threshold"):
            ta.offload(b"x", w, threshold=bad)
    assert pool.segment_states() == ["free"] * 4


# -- user handlers -------------------------------------------------------------------------


class Blob:
    """A user type the built-in handlers know nothing about."""

    def __init__(self, payload, tag):
        self.payload, self.tag = payload, tag


class BlobHandler:
    kind = "test-blob"

    def __init__(self):
        self.restored = collections.Counter()

    def matches(self, obj, threshold):
        return type(obj) is Blob and len(obj.payload) >= threshold

    def get_buffer(self, obj):
        return obj.payload, obj.tag

    def from_buffer(self, buf, meta, zero_copy):
        self.restored[zero_copy] += 1
        return Blob(buf if zero_copy else bytes(buf), meta)


@pytest.fixture
def blob_handler():
    handler = BlobHandler()
    ta.register_handler(handler)
    yield handler
    try:
        ta.unregister_handler(handler.kind)
    except ValueError:
        pass  # the test unregistered it already


def test_user_handler_round_trips(arena, blob_handler):
    w, r = arena.open_writer(), arena.open_reader()
    blob = Blob(bytes(range(256)) * 64, tag="t1")
    env = ta.offload({"blob": blob, "n": 1}, w)
    assert len(env) < 1024 and b"test-blob" in env
    out = ta.restore(env, r)
    assert out["blob"].tag == "t1" and bytes(out["blob"].payload) == blob.payload
    assert blob_handler.restored[is_pool(arena)] == 1
    if is_pool(arena):
        assert inside_arena(arena, out["blob"].payload)  # zero-copy on the pool
    else:
        assert type(out["blob"].payload) is bytes
    # below the threshold the handler is not used: plain pickling
    small = ta.restore(ta.offload(Blob(b"abc", "s"), w), r)
    assert small.payload == b"abc" and sum(blob_handler.restored.values()) == 1
    del out
    assert_arena_idle(arena)


def test_user_handler_is_tried_before_builtins_and_unregisters(arena):
    class BigBytes(BlobHandler):
        kind = "test-bytes-first"

        def matches(self, obj, threshold):
            return isinstance(obj, bytes) and len(obj) >= threshold

        def get_buffer(self, obj):
            return obj, None

        def from_buffer(self, buf, meta, zero_copy):
            self.restored[zero_copy] += 1
            return bytes(buf)

    handler = BigBytes()
    ta.register_handler(handler)
    try:
        w, r = arena.open_writer(), arena.open_reader()
        out = ta.restore(ta.offload(b"z" * 10_000, w), r)
        assert type(out) is bytes and sum(handler.restored.values()) == 1
        pending = ta.offload(b"y" * 10_000, w)
    finally:
        ta.unregister_handler("test-bytes-first")
    with pytest.raises(ValueError, match="test-bytes-first"):
        ta.restore(pending, r)  # its handler is gone here
    out = ta.restore(ta.offload(b"z" * 10_000, w), r)  # built-in bytes handler again
    assert bytes(out) == b"z" * 10_000 and sum(handler.restored.values()) == 1
    del out
    assert_arena_idle(arena)


def test_register_handler_rejects_bad_objects(blob_handler):
    class NoMethods:
        kind = "test-no-methods"

    class BadKind(BlobHandler):
        kind = 5

    for bad in (object(), NoMethods(), BadKind(), "handler", None):
        with pytest.raises(ValueError, match="not a payload handler"):
            ta.register_handler(bad)
    with pytest.raises(ValueError, match="already registered"):
        ta.register_handler(BlobHandler())  # same kind twice
    with pytest.raises(ValueError, match="already registered"):
        dup = BlobHandler()
        dup.kind = "numpy"
        ta.register_handler(dup)
    with pytest.raises(ValueError):
        ta.unregister_handler("numpy")  # built-ins stay
    with pytest.raises(ValueError):
        ta.unregister_handler("test-never-registered")
    ta.unregister_handler(blob_handler.kind)
    with pytest.raises(ValueError):
        ta.unregister_handler(blob_handler.kind)


def test_small_tensors_travel_inline_without_torch_save(arena):
    """Below the threshold a CPU storage's raw bytes travel in the envelope (not
    torch.save's zip archive, whose load is most of a small batch's restore),
    and everything torch's own path keeps survives."""
    base = torch.arange(100, dtype=torch.float64)
    item = {
        "a": base,
        "v": base[10:20],  # a view of the same storage
        "b": torch.tensor([True, False]),
        "h": torch.ones(3, dtype=torch.bfloat16, requires_grad=True),
        "e": torch.empty(0),
        "p": torch.nn.Parameter(torch.ones(4)),
        "labels": torch.arange(256),
    }
    w, r = arena.open_writer(), arena.open_reader()
    env = ta.offload(item, w, threshold=4096)
    assert b"PK\x03\x04" not in env  # no zip archive inside
    out = ta.restore(env, r)
    assert out["v"].untyped_storage().data_ptr() == out["a"].untyped_storage().data_ptr()
    assert torch.equal(out["a"], base) and torch.equal(out["v"], base[10:20])
    assert out["h"].dtype == torch.bfloat16 and out["h"].requires_grad
    assert type(out["p"]) is torch.nn.Parameter and out["e"].numel() == 0
    assert out["b"].tolist() == [True, False] and torch.equal(out["labels"], torch.arange(256))
    out["labels"][0] = 7  # private, writable
    assert item["labels"][0] == 0
