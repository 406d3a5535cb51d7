"""The bytes rule: SPDL's for the user's own bytes, the original type inside other objects' state.

Objects whose pickled state holds bytes (``array.array``, masked arrays, numpy
scalars, ``datetime``, datetime64 dtypes, ...) round-trip on every backend at
every threshold, through ``offload``/``restore``, the loader and the reducer.
An intact envelope whose object fails to rebuild is a ``RestoreError`` naming
it, not a "corrupt envelope".
"""

from __future__ import annotations

import array
import collections
import dataclasses
import datetime
import decimal
import fractions
import uuid
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import torch_arena as ta
from conftest import ARENA_FACTORIES, assert_arena_idle, assert_same, inside_arena, round_trip, zero_copy

THRESHOLDS = [0, 1024, 4096]
Point = collections.namedtuple("Point", ["x", "y"])
BIG = bytes(range(256)) * 40  # 10 KiB: above every threshold here


@dataclasses.dataclass
class Sample:
    raw: bytes
    label: int


def state_objects() -> dict[str, object]:
    """Objects whose reconstructors need bytes, large and small."""
    structured = np.zeros(4, dtype=[("id", "<i4"), ("score", "<f8")])
    structured["id"] = [1, 2, 3, 4]
    return {
        "array.array": array.array("d", range(2000)),
        "small array.array": array.array("b", b"xyz"),
        "masked": np.ma.masked_array(np.arange(3000.0), mask=np.arange(3000) % 2 == 0),
        "date": datetime.date(2024, 2, 29),
        "datetime": datetime.datetime(2024, 2, 29, 13, 5, 7, 123, tzinfo=datetime.timezone.utc),
        "time": datetime.time(1, 2, 3),
        "timedelta": datetime.timedelta(days=3, microseconds=9),
        "float64": np.float64(2.5),
        "int8": np.int8(-3),
        "datetime64": np.datetime64("2024-01-01T00:00:00", "ns"),
        "str_": np.str_("hello"),
        "bytes_": np.bytes_(BIG),
        "void": structured[2],
        "datetime64 array": np.arange(600).astype("M8[s]"),
        "timedelta64 array": np.arange(600).astype("m8[ms]"),
        "decimal": decimal.Decimal("1.25"),
        "fraction": fractions.Fraction(1, 3),
        "uuid": uuid.UUID(int=12345),
        "bytes keys": {BIG: 1, b"k": 2},
        "frozenset": frozenset([BIG, b"s"]),
        "tuple key": {(BIG, 1): "v"},
        "deque of arrays": collections.deque([array.array("i", range(1500))]),
    }


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("name", list(state_objects()))
def test_objects_with_bytes_in_their_state_round_trip(arena, name, threshold):
    obj = state_objects()[name]
    out = round_trip(arena, {"obj": obj}, threshold=threshold)["obj"]
    assert_same(obj, out)
    del out
    assert_arena_idle(arena)


def test_state_bytes_travel_through_the_arena_and_come_back_as_bytes(arena):
    a = array.array("B", BIG)
    env = ta.offload({"a": a, "key": {BIG + b"!": 0}}, arena.open_writer(), threshold=4096)
    assert len(env) < 1024, "large state bytes must not be copied into the envelope"
    out = ta.restore(env, arena.open_reader())
    assert out["a"] == a and type(next(iter(out["key"]))) is bytes
    del out
    assert_arena_idle(arena)


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_users_own_bytes_keep_spdls_rule(arena, kind):
    """In the item itself, dict/list/tuple items, namedtuple fields and dataclass
    members: a writable view into the pool, the original type from the ring."""
    blob = kind(BIG)
    item = {"d": blob, "l": [blob], "t": (blob,), "nt": Point(blob, 1), "dc": Sample(blob, 2)}
    out = round_trip(arena, item)
    leaves = [out["d"], out["l"][0], out["t"][0], out["nt"].x, out["dc"].raw]
    for leaf in leaves:
        assert bytes(leaf) == BIG
        if zero_copy(arena):
            assert type(leaf) is memoryview and not leaf.readonly and inside_arena(arena, leaf)
        else:
            assert type(leaf) is kind
    root = round_trip(arena, blob)
    assert (type(root) is memoryview) if zero_copy(arena) else (type(root) is kind)
    del out, leaves, leaf, root
    assert_arena_idle(arena)


def test_one_bytes_object_both_own_and_state_restores_each_way(arena):
    blob = BIG
    out = round_trip(arena, {"own": blob, "state": array.array("B", blob)}, threshold=0)
    assert bytes(out["own"]) == blob and out["state"].tobytes() == blob
    del out
    assert_arena_idle(arena)


# -- objects that fail to rebuild ----------------------------------------------------------------


class Fragile:
    """Pickles fine; its reconstructor raises in the restoring process (``broken``)."""

    broken = False

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __reduce__(self):
        return (_rebuild_fragile, (self.payload,))


def _rebuild_fragile(payload: bytes) -> Fragile:
    if Fragile.broken:
        raise KeyError("no codec for this payload here")
    return Fragile(payload)


@pytest.mark.parametrize("threshold", [0, 4096])
def test_a_reconstructor_that_raises_is_named_with_backend_and_threshold(arena, threshold):
    env = ta.offload({"ok": torch.ones(2000), "bad": Fragile(BIG)}, arena.open_writer(), threshold=threshold)
    Fragile.broken = True
    try:
        with pytest.raises(ta.RestoreError) as caught:
            ta.restore(env, arena.open_reader())
    finally:
        Fragile.broken = False
    message = str(caught.value)
    assert "corrupt" not in message
    assert "_rebuild_fragile" in message and f"threshold {threshold}" in message
    assert type(arena).__name__ in message
    assert isinstance(caught.value.__cause__, KeyError)
    del caught
    assert_arena_idle(arena)


def test_damaged_body_is_a_corrupt_envelope_not_a_restore_error(arena):
    env = bytearray(ta.offload({"x": array.array("d", range(100))}, arena.open_writer()))
    env[-5] ^= 0xFF
    with pytest.raises(ValueError, match="corrupt envelope: its checksum"):
        ta.restore(bytes(env), arena.open_reader())


# -- the loader and the reducer --------------------------------------------------------------------


class StateItems(Dataset):
    def __init__(self) -> None:
        self.items = list(state_objects().values())

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> object:
        return self.items[i]


def as_is(item: object) -> object:
    """No conversion (torch's default_convert would turn arrays into tensors)."""
    return item


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(ARENA_FACTORIES))
def test_loader_restores_objects_with_state_bytes(backend):
    arena = ARENA_FACTORIES[backend]()
    loader = ta.ArenaDataLoader(
        StateItems(), batch_size=None, collate_fn=as_is, num_workers=2, arena=arena, arena_threshold=0
    )
    try:
        got = list(loader)
        assert loader.arena_stats.batches == len(StateItems()) and loader.arena_stats.fallbacks == 0
        for want, out in zip(StateItems().items, got):
            assert_same(want, out)
        del got, out
    finally:
        loader.release_arena()
        arena.close()


@pytest.mark.parametrize("threshold", [0, 4096])
def test_reducer_passes_objects_with_state_bytes(arena, threshold):
    item = {"t": torch.arange(3000.0), "a": np.arange(2000), **state_objects()}
    with ta.arena_reducer(arena, threshold=threshold):
        out = ForkingPickler.loads(bytes(ForkingPickler.dumps(item)))
        assert_same(item, out)
        del out
    assert_arena_idle(arena)
