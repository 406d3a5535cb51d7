"""Leases: a restored unit's space goes back when the last view of it dies.

A zero-copy restore hands out views into shared memory; the unit they point
into may be reused only once every one of them is gone. The obvious way, a
Python ``weakref.finalize`` callback per view, loses releases: a
``KeyboardInterrupt`` (or any signal handler that raises) that lands inside a
finalizer is printed and swallowed by Python, and the release with it. The
segment then stays reserved until something sweeps it up.

Here the callback of each view's weak reference is ``SimpleQueue.put`` of one
process-wide queue: a single C call, which no signal handler can interrupt
half-way, and only a wake-up. What is outstanding lives in a registry; a
*drain* scans it for units all of whose anchors are dead, releases them under
the arena lock, and only then forgets them. Releases are idempotent, so a
drain cut short by an interrupt, or two drains at once, lose nothing. A daemon
thread (signals are only ever handled in the main thread) drains a moment
after something dies, and every second while leases are outstanding; the
consumer's own arena calls drain first when something died (so the release
usually runs there, without contending for the lock), and calls that report
usage drain first so what they report is exact.

After ``fork`` the child starts with an empty registry: views it inherited
belong to its parent, which releases them.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from torch_arena._os.sync import current_pid, holds_arena_lock

__all__ = ["LeaseTracker", "flush", "reap_now"]

#: How long the reaper thread leaves a dead reference for the consumer's own
#: thread to release before releasing it itself.
_REAP_DELAY_S = 0.002
#: How often the reaper thread looks for dead references nobody queued (a
#: drain cut short by an interrupt) while leases are outstanding.
_SWEEP_S = 1.0


class _Reaper:
    """The registry of outstanding leases, and the thread that releases them.

    Correctness never depends on the queue: a drain scans the registry for
    dead references, releases the units all of whose anchors are dead, and
    only then removes their entries. Releases are idempotent (a unit is freed
    only while its generation still matches), so two drains at once (the
    thread and a consumer's own call) or a drain cut short by an interrupt
    lose nothing: whatever a drain did not finish, the next one does. The
    queue only says that something died.
    """

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[weakref.ref] = queue.SimpleQueue()
        # id(ref) -> (tracker, key, ref); holds the tracker (and so its arena
        # state) only while one of its leases is outstanding.
        self.entries: dict[int, tuple[LeaseTracker, Hashable, weakref.ref]] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.pid = current_pid()

    def ensure_running(self) -> None:
        if self.thread is None:
            thread = threading.Thread(target=self._run, name="torch_arena-lease-reaper", daemon=True)
            thread.start()
            self.thread = thread

    def _run(self) -> None:
        q = self.queue
        while True:
            try:
                q.put(q.get(timeout=_SWEEP_S))  # wait for a death, and leave the hint for reap_now
            except queue.Empty:
                if not self.entries:
                    continue  # nothing outstanding: a periodic look finds nothing
            # Give the consumer's own arena call (reap_now) a moment to release
            # it without contending for the arena lock; then release what is left.
            time.sleep(_REAP_DELAY_S)
            self.drain()

    def drain(self) -> None:
        """Release every unit all of whose anchors are dead, then forget them.

        Does nothing in a thread that holds an arena lock (the garbage
        collector can run an object's ``__del__`` inside an arena call, and the
        locks are not reentrant): the next drain does it.
        """
        if holds_arena_lock():
            return
        q = self.queue
        while True:
            try:
                q.get_nowait()
            except queue.Empty:
                break
        with self.lock:
            candidates = {(entry[0], entry[1]) for entry in self.entries.values() if entry[2]() is None}
            expired = [
                (tracker, key, refs)
                for tracker, key in candidates
                if (refs := tracker._refs.get(key)) is not None and all(ref() is None for ref in refs)
            ]
        if not expired:
            return
        by_tracker: dict[LeaseTracker, list[Hashable]] = {}
        for tracker, key, _ in expired:
            by_tracker.setdefault(tracker, []).append(key)
        for tracker, keys in by_tracker.items():
            tracker._release(keys)
        with self.lock:
            for tracker, key, refs in expired:
                if tracker._refs.get(key) is refs:  # not given new anchors meanwhile
                    del tracker._refs[key]
                    for ref in refs:
                        self.entries.pop(id(ref), None)


_reaper = _Reaper()


def _after_fork_in_child() -> None:
    global _reaper
    _reaper = _Reaper()


os.register_at_fork(after_in_child=_after_fork_in_child)


def flush() -> None:
    """Release, in this thread and now, the units whose last view has died.

    Arena calls that report (usage, states) run it first, so what they say does
    not depend on thread scheduling. Never call it with an arena lock held.
    """
    if _reaper.entries:
        _reaper.drain()


def reap_now() -> None:
    """:func:`flush` if something died since the last drain: cheap when nothing
    did. Arenas call it before taking their lock on the consumer's hot path, so
    releases run in that thread instead of contending with the reaper thread
    for the lock. Never call it with an arena lock held."""
    if not _reaper.queue.empty():
        _reaper.drain()


class LeaseTracker:
    """The leases one process holds on one arena's units.

    Args:
        state: The arena's per-process state (its ``locked()`` and ``wakeup``).
        release: Called with the header under the arena lock for each key
            whose views are all gone. Must be idempotent: a key can be
            released twice (two drains at once).
    """

    def __init__(self, state: Any, release: Callable[[Any, Hashable], None]) -> None:
        self.state = state
        self.release_locked = release
        self.pid = current_pid()
        self._refs: dict[Hashable, list[weakref.ref]] = {}

    def hold(self, key: Hashable, anchors: Iterable[object]) -> None:
        """Keep ``key`` reserved until every anchor that can be weakly referenced
        dies; replaces the anchors an earlier :meth:`hold` gave for ``key``."""
        reaper = _reaper
        put = reaper.queue.put
        refs = []
        for anchor in anchors:
            try:
                refs.append(weakref.ref(anchor, put))
            except TypeError:
                continue  # cannot be tracked; the other anchors cover it
        if not refs:
            with reaper.lock:
                for ref in self._refs.pop(key, ()):
                    reaper.entries.pop(id(ref), None)
            self._release([key])
            return
        with reaper.lock:
            for ref in self._refs.get(key, ()):  # a new set of anchors replaces the old
                reaper.entries.pop(id(ref), None)
            self._refs[key] = refs
            for ref in refs:
                reaper.entries[id(ref)] = (self, key, ref)
        reaper.ensure_running()

    def _release(self, keys: list[Hashable]) -> None:
        if current_pid() != self.pid or sys.is_finalizing():
            return
        state = self.state
        try:
            with state.locked() as header:
                for key in keys:
                    self.release_locked(header, key)
            state.wakeup.notify()
        except Exception as exc:  # noqa: BLE001 - never kill the reaper thread
            print(f"torch_arena: could not release arena space: {exc!r}", file=sys.stderr)

    @property
    def held(self) -> int:
        """How many units this process still holds leases on."""
        return len(self._refs)
