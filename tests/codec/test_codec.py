"""offload / restore: types, layouts, nesting, user handlers, corrupt envelopes."""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import random
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_arena as ta
from torch_arena._codec import envelope as _codec
from conftest import assert_arena_idle, assert_same, inside_arena, round_trip
from conftest import zero_copy as is_pool

KiB = 1024


# -- bytes-likes ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview"])
def test_bytes_like_threshold_rule(arena, kind):
    make = {"bytes": bytes, "bytearray": bytearray, "memoryview": lambda b: memoryview(bytearray(b))}[kind]
    small, large = make(b"s" * 100), make(b"L" * 10_000)
    w, r = arena.open_writer(), arena.open_reader()
    env = ta.offload({"small": small, "large": large}, w, threshold=4096)
    out = ta.restore(env, r)
    if kind == "memoryview":
        # pickle cannot inline a memoryview, so even a small one goes through the arena
        assert type(out["small"]) is memoryview and out["small"].tobytes() == b"s" * 100
    else:
        assert type(out["small"]) is type(small) and out["small"] == small
        assert b"s" * 100 in env  # inline: in the envelope itself
    assert b"L" * 10_000 not in env
    if is_pool(arena):
        assert type(out["large"]) is memoryview and inside_arena(arena, out["large"])
    else:
        assert type(out["large"]) is type(large)
    assert bytes(out["large"]) == b"L" * 10_000
    del out
    assert_arena_idle(arena)


def test_memoryview_shape_and_format_kept(arena):
    src = np.arange(6000, dtype=np.float64).reshape(60, 100)
    out = round_trip(arena, memoryview(src))
    assert type(out) is memoryview and out.format == "d" and out.shape == (60, 100)
    assert np.array_equal(np.asarray(out), src)
    strided = memoryview(src)[::2]  # not contiguous: flattened on the way in
    out2 = round_trip(arena, strided)
    assert out2.shape == (30, 100) and np.array_equal(np.asarray(out2), src[::2])
    del out, out2
    assert_arena_idle(arena)


# -- numpy ---------------------------------------------------------------------------------

NUMPY_DTYPES = [
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.longdouble, np.complex64, np.complex128,
    "datetime64[ns]", "timedelta64[ms]", "S7", "U3", ">i4", "<f8", ">c16",
]


def random_array(dtype, shape, seed=0) -> np.ndarray:
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape)) if shape else 1
    if dtype == np.bool_:
        flat = rng.integers(0, 2, n).astype(np.bool_)
    elif dtype.kind == "U":
        flat = np.array(["".join(rng.choice(list("abcxyz"), dtype.itemsize // 4)) for _ in range(n)], dtype=dtype)
    else:
        flat = np.frombuffer(rng.bytes(n * dtype.itemsize), dtype=dtype).copy()
    return flat.reshape(shape)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=str)
# 0 too: a datetime64 dtype pickles its unit as a 2-byte bytes object, which
# then travels through the arena and must come back as bytes.
@pytest.mark.parametrize("threshold", [0, 16, 4096])
def test_numpy_dtypes(arena, dtype, threshold):
    a = random_array(dtype, (50, 70), seed=1)
    w, r = arena.open_writer(), arena.open_reader()
    env = ta.offload({"a": a}, w, threshold=threshold)
    out = ta.restore(env, r)["a"]
    assert_same(a, out)
    offloaded = a.nbytes >= threshold
    assert (len(env) < a.nbytes) == offloaded
    if is_pool(arena):
        assert inside_arena(arena, out) == offloaded
        assert out.flags.writeable
    del out
    assert_arena_idle(arena)


def test_numpy_structured_dtype_is_kept(arena):
    dt = np.dtype([("id", "<i4"), ("score", "<f8")])  # 12 bytes: SPDL restores it as V12
    a = np.zeros(2000, dtype=dt)
    a["id"] = np.arange(2000)
    a["score"] = np.linspace(0, 1, 2000)
    out = round_trip(arena, a)
    assert out.dtype == dt and out.dtype.names == ("id", "score")
    assert np.array_equal(out["id"], a["id"]) and np.array_equal(out["score"], a["score"])
    nested = np.dtype([("pos", "<f4", (3,)), ("tag", "S4")])
    b = np.zeros(1000, dtype=nested)
    b["pos"] = np.arange(3000).reshape(1000, 3)
    b["tag"] = b"abcd"
    out2 = round_trip(arena, b)
    assert out2.dtype == nested and np.array_equal(out2["pos"], b["pos"]) and out2["tag"][0] == b"abcd"
    del out, out2
    assert_arena_idle(arena)


def test_numpy_layouts(arena):
    base = np.arange(100 * 300, dtype=np.int32).reshape(100, 300)
    strided = base[::2, 1::3]
    fortran = np.asfortranarray(base)
    transposed = base.T
    readonly = base.copy()
    readonly.flags.writeable = False
    out = round_trip(arena, {"s": strided, "f": fortran, "t": transposed, "ro": readonly})
    assert np.array_equal(out["s"], strided) and out["s"].flags.c_contiguous
    assert np.array_equal(out["f"], fortran)
    assert out["f"].flags.f_contiguous and not out["f"].flags.c_contiguous  # Fortran order kept
    assert np.array_equal(out["t"], transposed) and out["t"].flags.f_contiguous  # .T is F-contiguous
    assert np.array_equal(out["ro"], readonly) and out["ro"].flags.writeable
    del out
    assert_arena_idle(arena)


@pytest.mark.parametrize("threshold", [0, 4096])
def test_numpy_zero_d_and_empty(arena, threshold):
    item = {
        "zero_d": np.array(3.5),
        "zero_d_int": np.array(7, dtype=np.uint16),
        "empty": np.zeros((0, 7), dtype=np.float32),
        "empty_1d": np.array([], dtype=np.int8),
        "empty_f": np.asfortranarray(np.zeros((3, 0, 2))),
    }
    out = round_trip(arena, item, threshold=threshold)
    assert_same(item, out)
    assert out["zero_d"].shape == () and float(out["zero_d"]) == 3.5
    del out
    assert_arena_idle(arena)


def test_views_of_one_array_keep_their_own_dtype_and_shape(arena):
    a = np.arange(10_000, dtype=np.float32)
    item = {"a": a, "bytes": a.view(np.uint8), "grid": a.reshape(100, 100), "same": a, "empty": a[:0]}
    item["empty_i8"] = np.array([], dtype=np.int8)
    env = ta.offload(item, arena.open_writer(), threshold=0)
    assert arena.usage()["bytes_in_use"] < 2 * a.nbytes, "the shared bytes must be written once"
    out = ta.restore(env, arena.open_reader())
    assert_same(item, out)
    assert out["same"] is out["a"]  # one object in, one object out (pickle semantics)
    if is_pool(arena):
        assert np.shares_memory(out["a"], out["grid"])
    del out
    assert_arena_idle(arena)


def test_object_arrays_are_pickled_inline(arena):
    obj = np.array([{"a": 1}, None, "x"] * 2000, dtype=object)
    out = round_trip(arena, {"obj": obj})
    assert out["obj"].dtype == object and list(out["obj"][:3]) == [{"a": 1}, None, "x"]
    del out
    assert_arena_idle(arena)


@pytest.mark.parametrize("threshold", [0, 1024, 4096])
def test_masked_array_state_bytes(arena, threshold):
    """A masked array pickles its data and mask as bytes, which its __setstate__
    needs as bytes: it restores from every backend."""
    masked = np.ma.masked_array(np.arange(5000.0), mask=np.arange(5000) % 2 == 0)
    w, r = arena.open_writer(), arena.open_reader()
    env = ta.offload(masked, w, threshold=threshold)
    assert len(env) < 1024, "the data and the mask travel through the arena"
    out = ta.restore(env, r)
    assert type(out) is np.ma.MaskedArray
    assert np.array_equal(out.mask, masked.mask) and np.array_equal(out.data, masked.data)
    del out
    assert_arena_idle(arena)


# -- torch ---------------------------------------------------------------------------------

TORCH_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
    torch.uint16, torch.uint32, torch.uint64, torch.complex32,
    torch.float8_e4m3fn, torch.float8_e5m2,
]


def random_tensor(dtype, shape, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape)) if shape else 1
    if dtype == torch.bool:
        return torch.from_numpy(rng.integers(0, 2, n).astype(np.bool_)).reshape(shape)
    size = dtype.itemsize
    raw = torch.from_numpy(np.frombuffer(rng.bytes(n * size), dtype=np.uint8).copy())
    return raw.view(dtype).reshape(shape)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [0, 4096])
def test_torch_dtypes(arena, dtype, threshold):
    t = random_tensor(dtype, (40, 64), seed=2)
    out = round_trip(arena, {"t": t}, threshold=threshold)["t"]
    assert_same(t, out)
    if is_pool(arena) and t.nbytes >= threshold:
        assert inside_arena(arena, out)
    del out
    assert_arena_idle(arena)


@pytest.mark.parametrize("threshold", [0, 4096])
def test_torch_zero_d_empty_and_small(arena, threshold):
    item = {
        "zero_d": torch.tensor(3.5),
        "zero_d_bf16": torch.tensor(1.25, dtype=torch.bfloat16),
        "zero_d_u16": torch.tensor(9, dtype=torch.uint16),
        "empty": torch.zeros(0, 3),
        "empty_f8": torch.zeros(0, dtype=torch.float8_e4m3fn),
        "small_u32": torch.full((3,), 5, dtype=torch.uint32),
    }
    out = round_trip(arena, item, threshold=threshold)
    assert_same(item, out)
    del out
    assert_arena_idle(arena)


def test_torch_non_contiguous_views(arena):
    base = torch.arange(200 * 300, dtype=torch.float32).reshape(200, 300)
    item = {
        "t": base.t(),
        "slice": base[::2, 1:],
        "narrow": base.narrow(1, 50, 100),
        "expand": torch.arange(300.0).expand(50, 300),
    }
    out = round_trip(arena, item)
    for key, src in item.items():
        assert torch.equal(out[key], src), key
        assert out[key].stride() == src.stride(), key  # layout comes back as it was
    del out
    assert_arena_idle(arena)


def test_torch_requires_grad_and_parameter(arena):
    leaf = torch.randn(100, 100, requires_grad=True)
    param = torch.nn.Parameter(torch.randn(64, 64))
    frozen = torch.nn.Parameter(torch.randn(64, 64), requires_grad=False)
    out = round_trip(arena, {"leaf": leaf, "param": param, "frozen": frozen})
    assert out["leaf"].requires_grad and out["leaf"].is_leaf
    assert torch.equal(out["leaf"].detach(), leaf.detach())
    assert type(out["param"]) is torch.nn.Parameter and out["param"].requires_grad
    assert torch.equal(out["param"].detach(), param.detach())
    assert type(out["frozen"]) is torch.nn.Parameter and not out["frozen"].requires_grad
    (out["leaf"] * 2).sum().backward()
    assert torch.equal(out["leaf"].grad, torch.full((100, 100), 2.0))
    del out
    assert_arena_idle(arena)


def test_torch_views_of_one_storage_still_share_it(arena):
    base = torch.arange(10_000, dtype=torch.float32)
    item = {"a": base[:6000], "b": base[4000:], "grid": base.view(100, 100), "again": base[:6000]}
    env = ta.offload(item, arena.open_writer())
    assert arena.usage()["bytes_in_use"] < 2 * base.nbytes, "one storage must be written once"
    out = ta.restore(env, arena.open_reader())
    ptrs = {out[k].untyped_storage().data_ptr() for k in item}
    assert len(ptrs) == 1
    out["a"][5000] = -1.0
    assert out["b"][1000] == -1.0 and out["grid"][50, 0] == -1.0
    assert base[5000] == 5000.0
    del out
    assert_arena_idle(arena)


def test_storage_objects_round_trip(arena):
    typed = torch.arange(5000, dtype=torch.int64).untyped_storage()
    out = round_trip(arena, typed)
    assert isinstance(out, torch.UntypedStorage) and bytes(out) == bytes(typed)
    del out
    assert_arena_idle(arena)


# -- nesting -------------------------------------------------------------------------------

Point = collections.namedtuple("Point", ["x", "y"])


@dataclasses.dataclass
class Sample:
    image: Any
    label: int
    extra: Any = None


def test_nested_structures(arena):
    item = {
        "batch": [Sample(np.random.rand(40, 40), i, {"p": Point(torch.randn(30, 30), b"q" * 5000)}) for i in range(3)],
        "meta": ("name", 3.5, None, True, {"deep": [[np.arange(6000)]]}),
        "pt": Point(x=torch.arange(2000), y=np.arange(1000, dtype=np.int16)),
        ("tuple", "key"): [1, 2, 3],
    }
    out = round_trip(arena, item)
    assert_same(item, out)
    assert type(out["pt"]) is Point and type(out["batch"][0]) is Sample
    del out
    assert_arena_idle(arena)
