"""Fault scenarios, each run as ``python _scenarios.py NAME [ARGS...]`` in a child process.

A scenario prints ``@@RESULT {json}`` lines with what it observed; the tests
(``test_*.py`` beside this file) assert on them and on what the harness saw
from outside (exit status, hangs, orphaned processes, ``/dev/shm``). A line
``@@SIGNAL-GROUP N`` asks the harness to send signal N to this process group.

Batches are dicts ``{"x": float tensor of (batch, 64, 256) where row j is
filled with idx[j], "idx": int64 tensor}`` unless a scenario says otherwise,
so a wrong, mixed or overwritten batch is caught by :func:`verify`.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import random
import resource
import signal
import sys
import time
import traceback
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

import torch_arena as ta

ITEM_SHAPE = (64, 256)  # 64 KiB of float32 per item
ITEM_BYTES = 64 * 256 * 4


def result(**fields: object) -> None:
    print("@@RESULT " + json.dumps(fields, default=str), flush=True)


class SampleError(Exception):
    """A user exception raised by a dataset or a collate function."""


class KillOnPickle:
    """Pickling this SIGKILLs the process: a worker dies mid-write into its unit."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)


class Items(Dataset):
    """``n`` items ``{"x": full(ITEM_SHAPE, i), "idx": i}``, with optional faults."""

    def __init__(self, n: int, shape=ITEM_SHAPE) -> None:
        self.n, self.shape = n, shape
        self.kill_at: int | None = None
        self.raise_at: int | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if i == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if i == self.raise_at:
            raise SampleError(f"sample {i} is corrupt on disk")
        return {"x": torch.full(self.shape, float(i)), "idx": i}


class Collate:
    """A user collate_fn; ``where`` says which fault to inject for index ``at``."""

    def __init__(self, where: str | None = None, at: int | None = None) -> None:
        self.where, self.at = where, at

    def __call__(self, items: list) -> dict:
        idx = [it["idx"] for it in items]
        armed = self.at in idx
        if armed and self.where == "collate-kill":  # the arena unit is already begun
            os.kill(os.getpid(), signal.SIGKILL)
        if armed and self.where == "collate-raise":
            raise SampleError(f"cannot collate batch with sample {self.at}")
        batch = {"x": torch.stack([it["x"] for it in items]), "idx": torch.tensor(idx)}
        if armed and self.where == "offload-kill":
            batch["tail"] = KillOnPickle()  # pickled after "x" was copied into the unit
        return batch


def verify(batch: dict) -> list[int]:
    """Check every row of ``batch["x"]`` holds its index; return the indices."""
    idx = batch["idx"].tolist()
    x = batch["x"]
    for j, i in enumerate(idx):
        if not bool((x[j] == float(i)).all()):
            raise AssertionError(f"batch row {j} (sample {i}) holds wrong data")
    return idx


def verified_epoch(loader) -> list[int]:
    """Run one epoch, verifying every batch; the sample indices seen, in order."""
    seen: list[int] = []
    for batch in loader:
        seen += verify(batch)
    return seen


def make_arena(kind: str, slots: int, unit_bytes: int, timeout: float = 1.0):
    """``pool``: a fixed pool of ``slots`` segments; ``elastic``: an elastic pool
    capped at ``slots`` units; ``ring``: a ring of as much."""
    if kind == "pool":
        return ta.SharedMemorySegmentPool(unit_bytes, slots, acquire_timeout=timeout)
    if kind == "elastic":
        return ta.SharedMemoryElasticPool(slots * (unit_bytes + 4096), acquire_timeout=timeout)
    return ta.SharedMemoryRingBuffer(unit_bytes * slots, acquire_timeout=timeout)


def arena_settles(arena, seconds: float = 5.0) -> dict:
    """Wait until no unit is in use; return the final usage (and pool states)."""
    deadline = time.monotonic() + seconds
    while True:
        gc.collect()
        usage = arena.usage()
        if usage["units_in_use"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if isinstance(arena, ta.SharedMemorySegmentPool):
        usage["states"] = arena.segment_states()
    return usage


def describe(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc)}


def _finish(it) -> None:
    """End an iterator that raised along the way, as a training loop would.

    Exhausting it makes torch stop its workers at once. A caught DataLoader
    exception keeps the iterator in a reference cycle (traceback -> frame ->
    iterator) and, as with the stock loader, shutting it down from the garbage
    collector takes torch 5 s per worker.
    """
    leftover = next(it, None)
    if leftover is not None:
        raise AssertionError("the iterator yielded more batches than len(loader)")
    del it
    gc.collect()


# -- scenarios ------------------------------------------------------------------
def worker_killed(kind: str, where: str) -> None:
    """A worker SIGKILLed in __getitem__, in a collate_fn after the unit is begun,
    or while its batch is being copied into the unit."""
    slots = 2 * 2 + 2
    arena = make_arena(kind, slots, 4 * ITEM_BYTES + 4096)
    ds = Items(64)
    if where == "getitem":
        ds.kill_at = 21
        collate = None
    else:
        collate = Collate(where, 21)
    loader = ta.ArenaDataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate, arena=arena)
    start = time.monotonic()
    seen: list[int] = []
    error = batch = None
    it = iter(loader)
    try:
        for batch in it:
            seen += verify(batch)
    except RuntimeError as exc:
        error = describe(exc)
    elapsed = time.monotonic() - start
    states_at_error = arena.segment_states() if kind == "pool" else None
    usage_at_error = arena.usage()
    del it, batch
    after_error = arena_settles(arena)
    # The next epoch on the same arena, without the fault.
    ds.kill_at = None
    if collate is not None:
        collate.where = None
    epoch2 = verified_epoch(loader)
    result(
        error=error,
        error_seconds=elapsed,
        batches_before_error=len(seen) // 4,
        states_at_error=states_at_error,
        usage_at_error=usage_at_error,
        after_error=after_error,
        epoch2_ok=sorted(epoch2) == list(range(64)),
        fallbacks=loader.arena_stats.fallbacks,
        after_epoch2=arena_settles(arena),
    )


def _run_with_raise(arena, where: str) -> dict:
    ds = Items(32)
    if where == "getitem":
        ds.raise_at, collate = 13, None
    else:
        collate = Collate("collate-raise", 13)
    loader = ta.ArenaDataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate, arena=arena)
    it = iter(loader)
    errors, seen = [], []
    for _ in range(len(loader)):
        try:
            seen += verify(next(it))
        except SampleError as exc:
            errors.append({"type": type(exc).__name__, "message": str(exc)})
    _finish(it)
    stats = loader.arena_stats
    return {"errors": errors, "seen": seen, "arena_batches": stats.batches, "fallbacks": stats.fallbacks}


def worker_raises(kind: str, where: str) -> None:
    """A worker's exception reaches the user as with the stock loader."""
    arena = make_arena(kind, 6, 4 * ITEM_BYTES + 4096)
    with_arena = _run_with_raise(arena, where)
    stock = _run_with_raise(None, where)
    result(arena=with_arena, stock=stock, after=arena_settles(arena))


def main_killed(kind: str) -> None:
    """SIGKILL the training process mid-epoch while it holds every batch it got.

    With the pool the workers are then waiting for a free segment (up to the
    default ``arena_timeout`` of 2 s) when their parent dies.
    """
    loader = ta.ArenaDataLoader(Items(4000), batch_size=4, num_workers=2, arena=kind, arena_budget=8 << 20)
    held = []
    for n, batch in enumerate(loader):
        held.append(batch)  # keep every batch
        if n == 3:
            time.sleep(0.2)  # let the workers run into the full pool
            print(f"@@DYING {time.time()}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def ctrl_c(kind: str) -> None:
    """Ctrl-C (SIGINT to the whole process group) during iteration, not caught.

    Like a user, it presses Ctrl-C again if the first one did not stop the
    program within 3 s (a KeyboardInterrupt raised inside a garbage-collector
    callback is printed and swallowed by Python); the report says how many
    presses it took.
    """
    loader = ta.ArenaDataLoader(Items(400000), batch_size=4, num_workers=2, arena=kind)
    pressed_at = None
    for n, batch in enumerate(loader):
        verify(batch)
        if n == 20 or (pressed_at is not None and time.monotonic() - pressed_at > 3.0):
            pressed_at = time.monotonic()
            print(f"@@SIGNAL-GROUP {int(signal.SIGINT)}", flush=True)
        if n > 200000:
            break
    print("@@NOT-INTERRUPTED", flush=True)


def interrupt_storm(kind: str, rounds: str = "8") -> None:
    """KeyboardInterrupt at random moments in the training process, caught each
    time (an interrupted notebook cell, run again): the arena stays usable."""
    arena = make_arena(kind, 6, 4 * ITEM_BYTES + 4096)
    loader = ta.ArenaDataLoader(Items(40000), batch_size=4, num_workers=2, arena=arena)
    rng = random.Random(7)

    def on_alarm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_alarm)
    where, batches, leaked, shutdown_seconds = [], 0, [], []
    for _ in range(int(rounds)):
        it = iter(loader)
        signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.02, 0.3))
        try:
            for batch in it:
                verify(batch)
                batches += 1
        except KeyboardInterrupt as exc:
            frame = traceback.extract_tb(exc.__traceback__)[-2]
            where.append(f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.name}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        started = time.monotonic()
        it._shutdown_workers()  # a traceback cycle may hold it; see _finish
        shutdown_seconds.append(round(time.monotonic() - started, 2))
        del it
        batch = None
        leaked.append(arena_settles(arena, 1.0)["units_in_use"])
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    # A clean epoch afterwards, on the same arena.
    loader2 = ta.ArenaDataLoader(Items(64), batch_size=4, num_workers=2, arena=arena)
    seen = verified_epoch(loader2)
    result(
        where=where,
        batches=batches,
        leaked_per_round=leaked,
        shutdown_seconds=shutdown_seconds,
        clean_epoch_ok=sorted(seen) == list(range(64)),
        after=arena_settles(arena, 1.0),
    )


def gc_reentry(kind: str) -> None:
    """An abandoned iterator collected by the garbage collector while this
    thread is inside an arena call on the same arena (its __del__ returns the
    dead workers' units): deferred, never a self-deadlock."""
    from torch_arena._os import sync as _sync
    from torch_arena._loader.session import ArenaSession

    arena = make_arena(kind, 4, 1 << 16)
    session = ArenaSession(arena, owned=False, slots=4)
    # Only the collection below may find the garbage: an automatic one in
    # between (any allocation can start it) would run it outside the lock.
    gc.disable()

    class AbandonedIterator:  # what _shutdown_workers does from __del__
        def __del__(self) -> None:
            session.note_workers_gone([2**22 + 12345])

    garbage = AbandonedIterator()
    garbage.cycle = garbage
    del garbage
    # A restored batch whose last view dies in the locked section too: its lease
    # is outstanding when the collector runs there.
    kept = [ta.restore(ta.offload(np.ones(30_000, np.uint8), arena.open_writer()), session.reader)]
    real = _sync.ProcessLock.acquire

    def acquire_then_collect(self) -> None:
        real(self)
        _sync.ProcessLock.acquire = real
        kept.clear()
        gc.collect()  # as if an allocation in the locked section triggered it

    _sync.ProcessLock.acquire = acquire_then_collect
    usage = arena.usage() if kind == "ring" else None
    with arena.file.locked():
        pass
    gc.enable()
    deferred = sorted(session._dead_workers)
    session.note_workers_gone([])  # the next iterator's start
    result(deferred=deferred, later=sorted(session._dead_workers), usage=usage or arena.usage())


def hold_all(kind: str, overflow: str) -> None:
    """The training loop keeps every batch: the arena fills up."""
    n_batches = 24
    unit = 4 * ITEM_BYTES + 8192
    # "fixed": the user's own pool of 6 segments; "pool": the loader's elastic
    # pool, capped at 6 batches; "ring": a ring of 6 batches.
    arena = ta.SharedMemorySegmentPool(unit, 6, acquire_timeout=0.5) if kind == "fixed" else kind
    loader = ta.ArenaDataLoader(
        Items(4 * n_batches),
        batch_size=4,
        num_workers=2,
        arena=arena,
        arena_budget=None if kind == "fixed" else 6 * unit,
        arena_overflow=overflow,
        arena_timeout=0.5,
    )
    held, seen, error = [], [], None
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for batch in loader:
                seen += verify(batch)
                held.append(batch)
        except BufferError as exc:
            error = describe(exc)
    elapsed = time.monotonic() - start
    stats = loader.arena_stats
    result(
        seconds=elapsed,
        complete=sorted(seen) == list(range(4 * n_batches)),
        held=len(held),
        batches=stats.batches,
        fallbacks=stats.fallbacks,
        warnings=[
            {"category": w.category.__name__, "message": str(w.message)}
            for w in caught
            if issubclass(w.category, ta.ArenaFallbackWarning)
        ],
        error=error,
    )


def oversize(kind: str, overflow: str, shape: str) -> None:
    """A batch larger than a pool segment / the whole ring."""
    # arena_budget caps the elastic pool at 1 MiB, or makes a ring of 1 MiB.
    budget = 1 << 20
    if shape == "one":  # one 2 MiB tensor per batch
        ds, batch_size = Items(16, shape=(512, 256)), 4
    else:  # two tensors of 768 KiB each: each fits, together they do not
        ds, batch_size = Items(16, shape=(192, 256)), 4

        def collate(items):
            b = torch.utils.data.default_collate(items)
            return {"x": b["x"], "y": b["x"].clone(), "idx": b["idx"]}

    loader = ta.ArenaDataLoader(
        ds,
        batch_size=batch_size,
        num_workers=2,
        collate_fn=None if shape == "one" else collate,
        arena=kind,
        arena_budget=budget,
        arena_overflow=overflow,
        arena_timeout=0.5,
    )
    seen, error = [], None
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for batch in loader:
                seen += verify(batch)
        except BufferError as exc:
            error = describe(exc)
    stats = loader.arena_stats
    result(
        seconds=time.monotonic() - start,
        complete=sorted(seen) == list(range(16)),
        batches=stats.batches,
        fallbacks=stats.fallbacks,
        warnings=[str(w.message) for w in caught if issubclass(w.category, ta.ArenaFallbackWarning)],
        error=error,
    )


class BigItems(Dataset):
    """16 MiB numpy items (``batch_size=None``), filled with their index."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> np.ndarray:
        return np.full(4 << 20, i, dtype=np.float32)


def small_shm(transport: str) -> None:
    """16 MiB batches, 2 workers, on a 64 MiB /dev/shm (Docker's default)."""
    stat = os.statvfs("/dev/shm")
    arena = None if transport == "stock" else transport
    loader = ta.ArenaDataLoader(BigItems(), batch_size=None, num_workers=2, arena=arena)
    print("@@STARTED", flush=True)
    seen = []
    for i, batch in enumerate(loader):
        if batch.shape != (4 << 20,) or not bool((batch == float(i)).all()):
            raise AssertionError(f"batch {i} holds wrong data")
        seen.append(i)
    stats = loader.arena_stats
    result(
        shm_size=stat.f_blocks * stat.f_frsize,
        batches=len(seen),
        arena_batches=stats.batches,
        fallbacks=stats.fallbacks,
        ok=seen == list(range(24)),
    )


def _meminfo_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable")


def memory_error() -> None:
    """Arenas larger than the memory there is."""
    too_much = _meminfo_available() * 2
    out: dict = {"asked": too_much}
    for name, make in (
        ("pool", lambda: ta.SharedMemorySegmentPool(too_much // 4, 4)),
        ("ring", lambda: ta.SharedMemoryRingBuffer(too_much)),
    ):
        try:
            make()
            out[name] = None
        except MemoryError as exc:
            out[name] = describe(exc)
    # The loader's arenas (elastic pool and ring) reserve nothing up front: a cap
    # above the memory there is only a limit, and the loader works, committing
    # what its batches need.
    for kind in ("pool", "ring"):
        loader = ta.ArenaDataLoader(Items(8), batch_size=4, num_workers=2, arena=kind, arena_budget=too_much)
        out[f"elastic_{kind}_batches"] = len(verified_epoch(loader)) // 4
        out[f"elastic_{kind}_committed"] = loader.arena_stats.committed_high_water
        loader.release_arena()
    # Past the pre-flight check: the kernel refuses the reservation itself
    # (here a file-size limit makes ftruncate fail with EFBIG).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
    for name, make in (
        ("kernel", lambda: ta.SharedMemoryRingBuffer(8 << 20)),
        ("kernel_elastic", lambda: ta.SharedMemoryElasticPool("1GiB")),
    ):
        try:
            make()
            out[name] = None
        except MemoryError as exc:
            out[name] = describe(exc)
    result(**out)


def _mutations(rng: random.Random):
    """``(label, mutate)`` pairs: truncations, bad headers and random byte flips."""

    def flip(envelope: bytes, seed: int) -> bytes:
        r = random.Random(seed)
        data = bytearray(envelope)
        for _ in range(r.randint(1, 4)):
            data[r.randrange(20, len(data))] = r.randrange(256)
        return bytes(data)

    yield "empty", lambda e: b""
    yield "half header", lambda e: e[:10]
    yield "header only", lambda e: e[:20]
    yield "one body byte", lambda e: e[:21]
    yield "half", lambda e: e[: len(e) // 2]
    yield "last byte cut", lambda e: e[:-1]
    yield "bad magic", lambda e: b"XXXX" + e[4:]
    yield "other token", lambda e: e[:4] + bytes(7) + b"\1" + e[12:]
    yield "wrong segment", lambda e: e[:12] + (12345).to_bytes(8, "little") + e[20:]
    yield "wrong generation", lambda e: e[:12] + (int.from_bytes(e[12:20], "little") ^ (77 << 32)).to_bytes(8, "little") + e[20:]
    for k in range(200):
        seed = rng.randrange(1 << 30)
        yield f"flip {k} (seed {seed})", lambda e, seed=seed: flip(e, seed)


def _sample_item() -> dict:
    return {
        "a": torch.arange(20000, dtype=torch.int32),
        "b": np.full(3000, 7, dtype=np.float64),
        "c": bytes(range(256)) * 40,
        "small": [1, 2.5, "x"],
    }


def _item_ok(item: object) -> bool:
    try:
        return (
            tuple(item["a"].shape) == (20000,)
            and torch.equal(item["a"], torch.arange(20000, dtype=torch.int32))
            and item["b"].shape == (3000,)
            and bool((item["b"] == 7).all())
            and bytes(item["c"]) == bytes(range(256)) * 40
        )
    except Exception:  # noqa: BLE001 - a mutated but decodable item
        return False


def _limit_address_space(extra: int) -> None:
    """Cap virtual memory so a corrupt shape can never allocate its way into an OOM."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, resource.RLIM_INFINITY))


def corrupt_direct(kind: str) -> None:
    """restore() on corrupt and truncated envelopes: ValueError, nothing leaks.

    Each mutation is applied to a fresh envelope; afterwards the genuine
    envelope must still restore correctly (or be refused as already used) and
    no unit may stay reserved. The pool also keeps one unit held throughout
    (``pristine``), so envelopes that name it are tried too; the ring frees
    space in order, so there nothing is kept.
    """
    rng = random.Random(1234)
    arena = make_arena(kind, 4, 1 << 20, timeout=0.0)
    writer, reader = arena.open_writer(), arena.open_reader()
    _limit_address_space(1 << 30)
    outcomes: dict[str, int] = {}
    bad: list[str] = []
    pristine = ta.offload(_sample_item(), writer) if kind == "pool" else None
    kept = 1 if pristine is not None else 0
    for label, mutate in _mutations(rng):
        envelope = ta.offload(_sample_item(), writer)
        data = mutate(envelope)
        try:
            item = ta.restore(data, reader)
            outcome = "restored" if _item_ok(item) else "restored-differently"
            del item
        except ValueError as exc:
            outcome = "ValueError"
            if "envelope" not in str(exc):
                bad.append(f"{label}: unclear message {exc!r}")
        except Exception as exc:  # noqa: BLE001
            outcome = type(exc).__name__
            bad.append(f"{label}: {type(exc).__name__}: {exc}")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        # The genuine envelope still restores, or is refused as already used.
        try:
            item = ta.restore(envelope, reader)
            if not _item_ok(item):
                bad.append(f"{label}: the genuine envelope restored wrong data")
            del item
        except ValueError as exc:
            if "stale" not in str(exc):
                bad.append(f"{label}: genuine envelope: {exc}")
        if arena.usage()["units_in_use"] != kept:
            gc.collect()  # a failed restore's views may sit in a traceback cycle
        if arena.usage()["units_in_use"] != kept:
            bad.append(f"{label}: {arena.usage()['units_in_use']} units in use afterwards")
            break
    pristine_ok = None
    if pristine is not None:
        item = ta.restore(pristine, reader)
        pristine_ok = _item_ok(item)
        del item
    result(outcomes=outcomes, bad=bad, pristine_ok=pristine_ok, after=arena_settles(arena))


class _ShiftingWriter:
    """A writer that writes the data in place but lies about where it put it."""

    def __init__(self, writer, shift: int) -> None:
        self._writer, self._shift, self.token = writer, shift, writer.token

    def place(self, src):
        return self._writer.place(src) + self._shift

    def __getattr__(self, name: str):
        return getattr(self._writer, name)


def _corrupting_worker_init(mode: str, victim: int):
    def init(worker_id: int) -> None:
        from torch_arena._loader import worker as _worker

        real_offload, real_pack = _worker.offload_open_unit, _worker.pack_envelope
        state = {"batch": None}

        def offload(obj, writer, threshold):
            state["batch"] = obj["idx"].tolist() if isinstance(obj, dict) else None
            if mode == "offset" and victim in (state["batch"] or ()):
                writer = _ShiftingWriter(writer, 1 << 30)
            return real_offload(obj, writer, threshold)

        def pack(token, span, body, *threshold):
            envelope = real_pack(token, span, body, *threshold)
            if victim in (state["batch"] or ()):
                if mode == "truncate":
                    return envelope[: len(envelope) // 2]
                if mode == "magic":
                    return b"JUNK" + envelope[4:]
            return envelope

        _worker.offload_open_unit, _worker.pack_envelope = offload, pack

    return init


def corrupt_loader(kind: str, mode: str) -> None:
    """A corrupt envelope unpickled in the training process (DataLoader path)."""
    arena = make_arena(kind, 6, 4 * ITEM_BYTES + 4096)
    loader = ta.ArenaDataLoader(
        Items(32),
        batch_size=4,
        num_workers=2,
        collate_fn=Collate(),
        arena=arena,
        worker_init_fn=_corrupting_worker_init(mode, 13),
    )
    it = iter(loader)
    errors, seen = [], []
    for _ in range(len(loader)):
        try:
            seen += verify(next(it))
        except ValueError as exc:
            errors.append(describe(exc))
            print(f"@@CAUGHT {describe(exc)}", flush=True)
    _finish(it)
    result(errors=errors, seen=seen, after=arena_settles(arena))


SCENARIOS = {
    f.__name__: f
    for f in (
        worker_killed,
        worker_raises,
        main_killed,
        ctrl_c,
        interrupt_storm,
        gc_reentry,
        hold_all,
        oversize,
        small_shm,
        memory_error,
        corrupt_direct,
        corrupt_loader,
    )
}


if __name__ == "__main__":
    name, args = sys.argv[1], sys.argv[2:]
    dump_after = float(os.environ.get("FAULTS_DUMP_AFTER", "0"))
    if dump_after > 0:  # a hang shows where every thread is, before the harness kills us
        faulthandler.dump_traceback_later(dump_after, exit=False)
    try:
        SCENARIOS[name](*args)
    except Exception:  # noqa: BLE001 - reported through the exit status
        traceback.print_exc()
        sys.exit(3)
