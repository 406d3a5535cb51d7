"""Shared fixtures and helpers for the torch_arena test suite.

Helpers are plain functions so test modules can ``from conftest import ...``
them (the tests directory is on ``sys.path`` under pytest's default import
mode, and spawn/forkserver children inherit that path).
"""

from __future__ import annotations

import array
import collections
import gc
import multiprocessing
import os
import warnings
import time
import zlib
from typing import Any

import numpy as np
import pytest
import torch

_SHM = "/dev/shm"

# Semaphores this run's processes make get names of their own ("sem.mp-ta<pid>-…"
# in /dev/shm), so the leftover check counts them and not those of other programs
# on the machine. Forked children inherit the prefix; spawned ones set it when
# they import this module (every test module does, through its helpers).
_SEM_PREFIX = "/mp-ta%d" % int(os.environ.setdefault("TORCH_ARENA_TEST_RUN", str(os.getpid())))
multiprocessing.current_process()._config["semprefix"] = _SEM_PREFIX

#: Set by ``make test`` (and so CI): every test must run. A skip there means a
#: broken install (a missing extra, FFmpeg libraries, ``unshare``) and fails;
#: a plain ``pytest`` still skips, with the reason shown.
REQUIRE_ALL = os.environ.get("TORCH_ARENA_REQUIRE_ALL") == "1"

pytest_plugins = ["pytester"]


def _skip_reason(report: Any) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_skip(report: Any) -> None:
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped under TORCH_ARENA_REQUIRE_ALL=1 (make test), where every test must run: "
            f"{_skip_reason(report)}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Any:
    """Under :data:`REQUIRE_ALL`, a skipped test is a failed one."""
    outcome = yield
    _fail_skip(outcome.get_result())


_skipped_modules: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: Any) -> Any:
    """Under :data:`REQUIRE_ALL`, a module skipped at import (importorskip) fails
    the session, once everything else has run."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped:
        _skipped_modules.append(f"{report.nodeid}: {_skip_reason(report)}")


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    if _skipped_modules and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _skipped_modules:
        terminalreporter.write_line(f"FAILED (skipped under TORCH_ARENA_REQUIRE_ALL=1, make test): {line}", red=True)


def _shm_listing() -> set[str]:
    try:
        return set(os.listdir(_SHM))
    except FileNotFoundError:  # pragma: no cover - no /dev/shm on this system
        return set()


def _live_semaphores() -> set[str]:
    """/dev/shm names of multiprocessing semaphores still alive in this process.

    Under spawn/forkserver a ``multiprocessing`` lock keeps its name until the
    object is collected or the process exits (its finalizer unlinks it then), so
    one still referenced, say, by a failed test's traceback is not a leftover.
    """
    from multiprocessing import synchronize

    names = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() pokes torch's deprecated module attributes
        for obj in gc.get_objects():
            if isinstance(obj, synchronize.SemLock):
                name = getattr(getattr(obj, "_semlock", None), "name", None)
                if name:
                    names.add("sem." + name.lstrip("/"))
    return names


def _ours(name: str) -> bool:
    """Whether a /dev/shm entry can be this run's: a semaphore only if it has
    this run's prefix (other programs' semaphores come and go meanwhile)."""
    return not name.startswith("sem.mp-") or name.startswith("sem" + _SEM_PREFIX.replace("/", ".") + "-")


@pytest.fixture(scope="session", autouse=True)
def no_shm_leftovers():
    """The whole session must leave nothing new behind in /dev/shm."""
    before = _shm_listing()
    yield
    gc.collect()
    # give a finishing child process a moment before looking
    deadline = time.monotonic() + 5.0
    while True:
        new = {name for name in _shm_listing() - before - _live_semaphores() if _ours(name)}
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not new, f"entries left behind in {_SHM}: {sorted(new)}"


# -- helpers ------------------------------------------------------------------


def data_region(arena: Any) -> np.ndarray:
    """A ``uint8`` view of the arena's whole data region in this process."""
    state = arena.file
    return state.mapping.array[state.header_bytes : state.total_bytes]


def address_of(obj: Any) -> int:
    """The address of the first byte of a numpy array / tensor / buffer."""
    if isinstance(obj, torch.Tensor):
        return obj.data_ptr()
    if isinstance(obj, np.ndarray):
        return int(obj.ctypes.data)
    return int(np.frombuffer(obj, dtype=np.uint8).ctypes.data)


def inside_arena(arena: Any, obj: Any) -> bool:
    """Whether ``obj``'s memory lies in ``arena``'s data region (zero-copy)."""
    region = data_region(arena)
    start = int(region.ctypes.data)
    addr = address_of(obj)
    return start <= addr < start + region.nbytes


def arena_bytes_at(arena: Any, obj: Any, nbytes: int) -> np.ndarray:
    """``nbytes`` of the arena's memory at the address where ``obj`` starts."""
    region = data_region(arena)
    rel = address_of(obj) - int(region.ctypes.data)
    assert 0 <= rel and rel + nbytes <= region.nbytes, "object is not inside the arena"
    return region[rel : rel + nbytes]


def crc(obj: Any) -> int:
    """CRC32 of the raw bytes of a numpy array / tensor / bytes-like."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().contiguous().reshape(-1)
        return zlib.crc32(t.view(torch.uint8).numpy().tobytes()) if t.numel() else 0
    if isinstance(obj, np.ndarray):
        return zlib.crc32(np.ascontiguousarray(obj).tobytes())
    return zlib.crc32(memoryview(obj).cast("B").tobytes() if isinstance(obj, memoryview) else bytes(obj))


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's elements in logical (C) order, any dtype, 0-d too."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _same_scalar(a: Any, b: Any) -> bool:
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b  # NaN
    if isinstance(a, np.generic):  # numpy scalars, NaN / NaT included: compare the bytes
        return a.dtype == b.dtype and (a.tobytes() == b.tobytes() or bool(a == b))
    return bool(a == b)


def assert_same(a: Any, b: Any, path: str = "item") -> None:
    """Deep equality that also checks types, dtypes, shapes and exact bytes.

    ``b`` is the restored value. bytes-likes restored from a pool come back as
    memoryviews; that is accepted (the contents must still match).
    """
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: {type(b)} is not a tensor"
        assert type(b) is type(a), f"{path}: {type(b)} != {type(a)}"
        assert b.dtype == a.dtype, f"{path}: dtype {b.dtype} != {a.dtype}"
        assert b.shape == a.shape, f"{path}: shape {b.shape} != {a.shape}"
        assert b.requires_grad == a.requires_grad, f"{path}: requires_grad differs"
        assert tensor_bytes(b) == tensor_bytes(a), f"{path}: tensor contents differ"
    elif isinstance(a, np.ma.MaskedArray):
        assert type(b) is type(a), f"{path}: {type(b)} != {type(a)}"
        assert_same(a.data, b.data, f"{path}.data")
        assert_same(np.ma.getmaskarray(a), np.ma.getmaskarray(b), f"{path}.mask")
    elif isinstance(a, np.ndarray):
        assert type(b) is type(a), f"{path}: {type(b)} is not a {type(a)}"
        assert b.dtype == a.dtype, f"{path}: dtype {b.dtype} != {a.dtype}"
        assert b.shape == a.shape, f"{path}: shape {b.shape} != {a.shape}"
        if a.dtype.hasobject:
            for i, (x, y) in enumerate(zip(a.reshape(-1).tolist(), b.reshape(-1).tolist())):
                assert_same(x, y, f"{path}.flat[{i}]")
        else:
            assert np.ascontiguousarray(b).tobytes() == np.ascontiguousarray(a).tobytes(), (
                f"{path}: array contents differ"
            )
    elif isinstance(a, array.array):
        assert type(b) is type(a) and b.typecode == a.typecode, f"{path}: {b!r} != {a!r}"
        assert b.tobytes() == a.tobytes(), f"{path}: array contents differ"  # NaN-proof
    elif isinstance(a, (bytes, bytearray, memoryview)) and not isinstance(a, np.generic):
        assert isinstance(b, (bytes, bytearray, memoryview)), f"{path}: {type(b)} is not bytes-like"
        if type(a) is not memoryview and type(b) is not memoryview:
            assert type(b) is type(a), f"{path}: {type(b)} != {type(a)}"
        ab = a.tobytes() if isinstance(a, memoryview) else bytes(a)
        bb = b.tobytes() if isinstance(b, memoryview) else bytes(b)
        assert ab == bb, f"{path}: bytes differ"
    elif isinstance(a, dict):
        assert type(b) is type(a) and list(b) == list(a), f"{path}: keys {list(b)} != {list(a)}"
        assert getattr(b, "default_factory", None) == getattr(a, "default_factory", None), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple, collections.deque)):
        assert type(b) is type(a), f"{path}: {type(b)} != {type(a)}"
        assert len(b) == len(a), f"{path}: length {len(b)} != {len(a)}"
        assert getattr(b, "maxlen", None) == getattr(a, "maxlen", None), f"{path}: maxlen differs"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif hasattr(a, "__dataclass_fields__"):
        assert type(b) is type(a), f"{path}: {type(b)} != {type(a)}"
        for name in a.__dataclass_fields__:
            assert_same(getattr(a, name), getattr(b, name), f"{path}.{name}")
    elif type(a).__module__.startswith("PIL."):
        assert type(b) is type(a) and (b.mode, b.size) == (a.mode, a.size), f"{path}: {b!r} != {a!r}"
        assert b.tobytes() == a.tobytes(), f"{path}: pixels differ"
    elif type(a).__eq__ is object.__eq__ and hasattr(a, "__dict__"):
        assert type(b) is type(a), f"{path}: {type(b)} != {type(a)}"
        assert_same(vars(a), vars(b), f"{path}.__dict__")
    else:
        assert type(b) is type(a) and _same_scalar(a, b), f"{path}: {b!r} != {a!r}"


def in_child(fn) -> int:
    """Run ``fn()`` in a forked child that leaves with ``os._exit``; returns its pid (reaped)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "child failed"
    return pid


def collect() -> None:
    """Run the garbage collector, then release what it freed (what the lease
    reaper thread does a moment later), so a test can read arena state at once."""
    from torch_arena._arena.leases import flush

    gc.collect()
    flush()


def _small_pool(unit: int = 1 << 20, units: int = 4) -> Any:
    import torch_arena as ta

    return ta.SharedMemorySegmentPool(unit, units, acquire_timeout=2.0)


def _small_ring(unit: int = 1 << 20, units: int = 4) -> Any:
    import torch_arena as ta

    return ta.SharedMemoryRingBuffer(unit * units)


#: Every backend, as ``factory(unit=bytes, units=count)`` of an arena with room
#: for ``units`` units of up to ``unit`` bytes (default: 4 of 1 MiB). Tests
#: parametrized over backends use these: a new backend is one line here.
def _small_elastic(unit: int = 1 << 20, units: int = 4) -> Any:
    import torch_arena as ta

    return ta.SharedMemoryElasticPool(max(256 << 20, unit * units), acquire_timeout=2.0)


def _small_elastic_ring(unit: int = 1 << 20, units: int = 4) -> Any:
    import torch_arena as ta

    return ta.SharedMemoryElasticRing(max(256 << 20, unit * units), acquire_timeout=2.0)


ARENA_FACTORIES = {
    "pool": _small_pool,
    "ring": _small_ring,
    "elastic": _small_elastic,
    "elastic-ring": _small_elastic_ring,
}


def zero_copy(arena: Any) -> bool:
    """Whether ``arena`` restores zero-copy views (the pool's semantics) or copies."""
    return bool(arena.open_reader().zero_copy)


@pytest.fixture(params=list(ARENA_FACTORIES))
def arena(request):
    """Each backend in turn."""
    made = ARENA_FACTORIES[request.param]()
    yield made
    made.close()


@pytest.fixture
def pool():
    """A small segment pool: 4 segments of 1 MiB, 2 s acquire timeout."""
    made = _small_pool()
    yield made
    made.close()


@pytest.fixture
def ring():
    """A 4 MiB ring buffer (default acquire_timeout=0)."""
    made = _small_ring()
    yield made
    made.close()


def round_trip(arena: Any, obj: Any, **kwargs: Any) -> Any:
    """``restore(offload(obj))`` through fresh endpoints of ``arena``."""
    import torch_arena as ta

    w, r = arena.open_writer(), arena.open_reader()
    return ta.restore(ta.offload(obj, w, **kwargs), r)


@pytest.fixture
def elastic():
    """An elastic pool capped at 256 MiB, 2 s acquire timeout."""
    made = _small_elastic()
    yield made
    made.close()


def assert_arena_idle(arena: Any) -> None:
    """Nothing of ``arena`` stays reserved once the garbage is collected."""
    collect()
    used = arena.usage()
    assert used["units_in_use"] == 0 and used["bytes_in_use"] == 0, used
