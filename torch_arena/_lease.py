"""Leases: a restored unit's space goes back when the last view of it dies.

A zero-copy restore hands out views into shared memory; the unit they point
into may be reused only once every one of them is gone. The obvious way, a
Python ``weakref.finalize`` callback per view, loses releases: a
``KeyboardInterrupt`` (or any signal handler that raises) that lands inside a
finalizer is printed and swallowed by Python, and the release with it. The
segment then stays reserved until something sweeps it up.

Here the callback of each view's weak reference is ``SimpleQueue.put`` of one
process-wide queue: a single C call, which no signal handler can interrupt
half-way. A daemon thread (signals are only ever handled in the main thread)
takes the dead references off the queue, counts each lease down, and frees a
unit under the arena lock once all its views are gone. Nothing in the
training loop's thread waits for the arena lock to drop a batch.

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

from ._sync import current_pid

__all__ = ["LeaseTracker", "flush", "reap_now"]

#: How long the reaper thread leaves a dead reference for the consumer's own
#: thread to release before releasing it itself.
_REAP_DELAY_S = 0.002


class _Reaper:
    """The process-wide queue of dead references and the thread that drains it."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[weakref.ref] = queue.SimpleQueue()
        # id(ref) -> (tracker, key, ref); holds the tracker (and so its arena
        # state) only while one of its leases is outstanding.
        self.entries: dict[int, tuple[LeaseTracker, Hashable, weakref.ref]] = {}
        self.lock = threading.Lock()
        # Held by the thread for a whole drain, releases included.
        self.drain_lock = threading.Lock()
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
            q.put(q.get())  # wait for a dead reference, and leave it queued
            # Give the consumer's own arena call (reap_now, which runs without
            # contending for the arena lock) a moment to take it; whatever is
            # still queued after that is released here.
            time.sleep(_REAP_DELAY_S)
            with self.drain_lock:
                self.drain([])

    def drain(self, dead: "list[weakref.ref]", *, scan: bool = False) -> None:
        """Count down the leases of ``dead`` references (and any queued with
        them), and release the units whose views are now all gone.

        With ``scan``, also every registered reference that is already dead:
        one the thread has taken off the queue but not yet counted. Whoever
        pops an entry first counts it; the other finds it gone.
        """
        q = self.queue
        while True:
            try:
                dead.append(q.get_nowait())
            except queue.Empty:
                break
        expired: dict[LeaseTracker, list[Hashable]] = {}
        with self.lock:
            if scan:
                dead.extend(entry[2] for entry in self.entries.values() if entry[2]() is None)
            for ref in dead:
                entry = self.entries.pop(id(ref), None)
                if entry is not None and entry[2] is ref:
                    tracker, key, _ = entry
                    if tracker._count_down(key):
                        expired.setdefault(tracker, []).append(key)
        dead.clear()
        for tracker, keys in expired.items():
            tracker._release(keys)


_reaper = _Reaper()


def _after_fork_in_child() -> None:
    global _reaper
    _reaper = _Reaper()


os.register_at_fork(after_in_child=_after_fork_in_child)


def flush() -> None:
    """Release, in this thread and now, the units whose last view has died.

    The reaper thread does the same a moment later; arena calls run this
    first so what they report (usage, states) and what a writer in this
    process finds free does not depend on thread scheduling. Never call it
    with an arena lock held.
    """
    reaper = _reaper
    if reaper.thread is not None:
        # The thread takes a reference off the queue before it holds the drain
        # lock: the scan counts such a one here. One it has counted, it holds
        # the lock for until its release is done: waiting for the lock waits
        # for that release.
        with reaper.drain_lock:
            reaper.drain([], scan=True)


def reap_now() -> None:
    """Release what died, here and now, if anything is queued and the reaper
    thread is not at it already. Cheap when there is nothing to do; arenas
    call it before taking their lock on the consumer's hot path, so that
    releases run in that thread instead of contending with the reaper for the
    lock. Never call it with an arena lock held."""
    reaper = _reaper
    if reaper.queue.empty() or not reaper.drain_lock.acquire(blocking=False):
        return
    try:
        reaper.drain([])
    finally:
        reaper.drain_lock.release()


class LeaseTracker:
    """The leases one process holds on one arena's units.

    Args:
        state: The arena's per-process state (its ``locked()`` and ``wakeup``).
        release: Called with the header under the arena lock for each key
            whose views are all gone.
    """

    def __init__(self, state: Any, release: Callable[[Any, Hashable], None]) -> None:
        self.state = state
        self.release_locked = release
        self.pid = current_pid()
        self._remaining: dict[Hashable, int] = {}
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
        with reaper.lock:
            for ref in self._refs.get(key, ()):  # a new set of anchors replaces the old
                reaper.entries.pop(id(ref), None)
            self._remaining[key] = len(refs)
            self._refs[key] = refs
            for ref in refs:
                reaper.entries[id(ref)] = (self, key, ref)
        reaper.ensure_running()
        if not refs:
            self._release([key])

    def _count_down(self, key: Hashable) -> bool:
        # Called with the reaper lock held.
        left = self._remaining.get(key)
        if left is None:
            return False
        if left > 1:
            self._remaining[key] = left - 1
            return False
        del self._remaining[key]
        self._refs.pop(key, None)
        return True

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
        return len(self._remaining)

    def sweep(self) -> None:
        """Free leases whose anchors are all dead but whose release never ran
        (an interrupt between taking the views and :meth:`hold` returning)."""
        reaper = _reaper
        stale = []
        with reaper.lock:
            for key, refs in list(self._refs.items()):
                if refs and all(ref() is None for ref in refs):
                    stale.append(key)
                    del self._refs[key]
                    self._remaining.pop(key, None)
                    for ref in refs:
                        reaper.entries.pop(id(ref), None)
        if stale:
            self._release(stale)
