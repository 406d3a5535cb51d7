"""Property test: whatever pickles round-trips, on every backend and at every threshold.

Leaves are drawn from a wide set of types (the standard library's, numpy's
arrays and scalars of every dtype, masked, structured and object arrays, torch
tensors, PIL images, objects with their own ``__reduce__``) and nested in
random containers, including dict keys and set members.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import datetime
import decimal
import enum
import fractions
import random
import uuid
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import torch_arena as ta
from conftest import ARENA_FACTORIES, assert_same
from test_codec import random_array

Pair = collections.namedtuple("Pair", ["left", "right"])


@dataclasses.dataclass
class Box:
    left: Any
    right: Any


@dataclasses.dataclass(frozen=True)
class Key:
    """Hashable, with a bytes field: as a dict key its bytes must hash as bytes."""

    name: str
    raw: bytes


class Holder:
    """A plain class: pickled attribute by attribute."""

    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)


class Reduced:
    """Its own ``__reduce__``: what it returns is state, rebuilt by __init__."""

    def __init__(self, raw: bytes, child: Any) -> None:
        if type(raw) is not bytes:
            raise TypeError(f"Reduced needs bytes, got {type(raw).__name__}")
        self.raw, self.child = raw, child

    def __reduce__(self) -> tuple[Any, ...]:
        return (Reduced, (self.raw, self.child))

    def __eq__(self, other: object) -> bool:
        return type(other) is Reduced and other.raw == self.raw and _equal(other.child, self.child)


def _equal(a: Any, b: Any) -> bool:
    try:
        assert_same(a, b)
    except AssertionError:
        return False
    return True


class Color(enum.Enum):
    RED = b"r" * 5000  # a bytes value: it must come back as bytes to find the member
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


seeds = st.integers(0, 2**32 - 1)
sizes = st.sampled_from([0, 3, 100, 1500, 6000])


@st.composite
def blobs(draw: Any) -> Any:
    data = random.Random(draw(seeds)).randbytes(draw(sizes))
    return draw(st.sampled_from([bytes, bytearray]))(data)


@st.composite
def arrays_stdlib(draw: Any) -> array.array:
    code = draw(st.sampled_from("bBhHiIlLqQfd"))
    raw = random.Random(draw(seeds)).randbytes(draw(sizes) // 8 * 8)
    out = array.array(code)
    out.frombytes(raw[: len(raw) // out.itemsize * out.itemsize])
    return out


_NP_DTYPES = [
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.longdouble, np.complex64, np.complex128, np.clongdouble,
    "datetime64[ns]", "datetime64[D]", "timedelta64[ms]", "S5", "U3",
    [("id", "<i4"), ("score", "<f8"), ("tag", "S3")],
]


@st.composite
def np_arrays(draw: Any) -> np.ndarray:
    dtype = draw(st.sampled_from(_NP_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 30), min_size=0, max_size=3)))
    a = random_array(dtype, shape, seed=draw(seeds))
    layout = draw(st.sampled_from(["c", "f", "t", "step"]))
    if layout == "f":
        a = np.asfortranarray(a)
    elif layout == "t":
        a = a.T
    elif layout == "step" and a.ndim:
        a = a[::2]
    return a


@st.composite
def np_scalars(draw: Any) -> np.generic:
    a = random_array(draw(st.sampled_from(_NP_DTYPES)), (1,), seed=draw(seeds))
    return a[0]


@st.composite
def masked_arrays(draw: Any) -> np.ma.MaskedArray:
    n = draw(st.sampled_from([0, 7, 700]))
    data = random_array(draw(st.sampled_from([np.float64, np.int32, np.uint8])), (n,), seed=draw(seeds))
    return np.ma.masked_array(data, mask=np.arange(n) % 3 == 0)


@st.composite
def tensors(draw: Any) -> torch.Tensor:
    a = draw(np_arrays().filter(lambda a: a.dtype.kind in "biufc" and a.dtype != np.longdouble))
    if a.dtype.kind == "c" and a.dtype.itemsize > 16:
        a = a.astype(np.complex128)
    t = torch.from_numpy(np.ascontiguousarray(a))
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1)
    return t


@st.composite
def images(draw: Any) -> Image.Image:
    mode = draw(st.sampled_from(["L", "RGB", "RGBA"]))
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    raw = random.Random(draw(seeds)).randbytes(w * h * len(mode))
    return Image.frombytes(mode, (w, h), raw)


aware = st.datetimes(timezones=st.sampled_from([datetime.timezone.utc, datetime.timezone(datetime.timedelta(hours=-3))]))
hashable_leaves = st.one_of(
    st.integers(),
    st.text(max_size=6),
    blobs().map(bytes),
    st.dates(),
    st.datetimes(),
    aware,
    st.times(),
    st.timedeltas(),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.fractions(),
    st.uuids(),
    st.sampled_from(list(Color) + list(Level)),
    st.builds(Key, st.text(max_size=3), blobs().map(bytes)),
    st.complex_numbers(allow_nan=False),
)
leaves = st.one_of(
    hashable_leaves,
    blobs(),
    st.none(),
    st.floats(),
    arrays_stdlib(),
    np_arrays(),
    np_scalars(),
    masked_arrays(),
    tensors(),
    images(),
)


def _containers(children: Any) -> Any:
    keys = st.one_of(st.text(max_size=4), hashable_leaves, st.tuples(hashable_leaves, st.integers()))
    return st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(keys, children, max_size=3),
        st.builds(Pair, children, children),
        st.builds(Box, children, children),
        st.builds(Holder, a=children, b=children),
        st.builds(Reduced, blobs().map(bytes), children),
        st.lists(children, max_size=3).map(collections.deque),
        st.dictionaries(st.text(max_size=4), children, max_size=3).map(collections.OrderedDict),
        st.dictionaries(keys, children, max_size=3).map(lambda d: collections.defaultdict(list, d)),
        st.frozensets(hashable_leaves, max_size=3),
        st.sets(hashable_leaves, max_size=3),
        st.lists(children, min_size=1, max_size=3).map(_object_array),
    )


def _object_array(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


structures = st.recursive(leaves, _containers, max_leaves=8)


@pytest.fixture(scope="module")
def property_arenas():
    arenas = [factory(8 << 20, 2) for factory in ARENA_FACTORIES.values()]
    yield arenas
    for arena in arenas:
        arena.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(obj=structures, threshold=st.sampled_from([0, 1024, 4096]))
def test_property_random_structures_round_trip(property_arenas, obj, threshold):
    for arena in property_arenas:
        problem = _mismatch(obj, arena, threshold)
        assert problem is None, f"{type(arena).__name__}, threshold {threshold}: {problem}"
        assert arena.usage()["units_in_use"] == 0


def _mismatch(obj: Any, arena: Any, threshold: int) -> str | None:
    """What is wrong with ``obj``'s round trip, as text: no traceback keeps the
    restored views (and their unit) alive while hypothesis shrinks."""
    try:
        assert_same(obj, ta.restore(ta.offload(obj, arena.open_writer(), threshold=threshold), arena.open_reader()))
    except Exception as exc:  # noqa: BLE001 - reported as text
        return f"{type(exc).__name__}: {exc}"
    return None
