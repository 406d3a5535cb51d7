"""Leases: a zero-copy unit is released when the last view of it dies.

A restore hands out views into shared memory; the unit they point into may
be reused only once every one of them is gone (NOTE [ Arena units, leases,
locks and fork ] in :mod:`torch_arena._arena.protocol`). The obvious way, a
Python ``weakref.finalize`` callback per view, loses releases: a
``KeyboardInterrupt`` (or any signal handler that raises) landing inside a
finalizer is printed and swallowed by Python, and the release with it.

Here the callback of each lease's weak reference is ``deque.append`` of one
process-wide deque: a single C call that no signal handler can interrupt
half-way, and only a hint. What is outstanding lives in each tracker's
``refs`` (key -> its anchors' weak references), changed only by single dict
assignments, so an interrupt leaves either the old anchors or the new ones in
place, never none. A *drain* finds the units all of whose anchors are dead,
releases them (one store each: see the NOTE) and only then forgets them. A
drain cut short by an interrupt loses nothing: the next one, or the sweep of
every tracker that the reaper thread makes every second, finds what is left,
and a release of a unit that was released already is a no-op (its generation
or state no longer matches).

Who drains: the consumer's own arena calls (``open_unit``, a writer's
``begin_unit`` in the same process, anything that reports usage) when
something died, and otherwise a daemon thread that looks every few
milliseconds while leases are outstanding. It never wakes per death, and it
parks only after a second with nothing outstanding: a training loop, whose
previous batch is often released just before the next one is held, never has
to wake it. So the training process pays for a release only in its own
thread, with no lock and no thread switch.

After ``fork`` the child starts with an empty registry: views it inherited
belong to its parent, which releases them.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable


__all__ = ["LeaseTracker", "flush", "reap_now"]

#: How often the reaper thread looks for dead leases that the consumer's own
#: thread has not released yet, while leases are outstanding.
_REAP_INTERVAL_S = 0.01
#: How often it scans the whole registry for dead leases nobody hinted at (a
#: drain cut short by an interrupt).
_SWEEP_S = 1.0
#: How long it keeps looking with nothing outstanding before it parks (and a
#: new lease has to wake it).
_LINGER_S = 1.0


class _Reaper:
    """The registry of outstanding leases, and the thread that releases them."""

    def __init__(self) -> None:
        self.dead: collections.deque[weakref.ref] = collections.deque()
        # id(ref) -> (tracker, key, ref): where a hint leads (best effort).
        self.entries: dict[int, tuple[LeaseTracker, Hashable, weakref.ref]] = {}
        # Trackers with outstanding keys, kept alive (with their arena file)
        # until those are released: what a sweep looks through.
        self.active: dict[int, LeaseTracker] = {}
        self.lock = threading.Lock()
        self.local = threading.local()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        # Set (under ``lock``) when the thread waits for ``wake``: only then
        # does a new lease have to wake it.
        self.parked = False

    def ensure_running(self) -> None:
        """Start the thread, or wake it if it parked. Call under ``lock``."""
        if self.thread is None:
            thread = threading.Thread(target=self._run, name="torch_arena-lease-reaper", daemon=True)
            thread.start()
            self.thread = thread
        if self.parked:
            self.parked = False
            self.wake.set()

    def _run(self) -> None:
        last_sweep = last_busy = time.monotonic()
        while True:
            if not self.active and time.monotonic() - last_busy >= _LINGER_S:
                with self.lock:  # parked is read under the same lock by hold()
                    park = self.parked = not self.active
                    self.wake.clear()
                if park:
                    self.wake.wait()
                last_busy = time.monotonic()
                continue
            time.sleep(_REAP_INTERVAL_S)
            now = time.monotonic()
            if self.active:
                last_busy = now
            if now - last_sweep >= _SWEEP_S:
                last_sweep = now
                self.drain(sweep=True)
            elif self.dead:
                self.drain()

    def drain(self, sweep: bool = False) -> None:
        """Release every unit all of whose anchors are dead, then forget them.

        ``sweep``: look at every outstanding key, not only those hinted at.
        Does nothing when called again from inside a drain (the garbage
        collector can run code that flushes while a drain allocates).
        """
        local = self.local
        if getattr(local, "draining", False):
            return
        local.draining = True
        try:
            with self.lock:
                if sweep:
                    self.dead.clear()
                    candidates = [(t, key) for t in list(self.active.values()) for key in list(t.refs)]
                else:
                    candidates = []
                    while self.dead:
                        entry = self.entries.get(id(self.dead.popleft()))
                        if entry is not None:
                            candidates.append((entry[0], entry[1]))
                for tracker, key in candidates:
                    refs = tracker.refs.get(key)
                    if refs is None or any(ref() is not None for ref in refs):
                        continue
                    tracker.release(key)  # before forgetting: an interrupt here loses nothing
                    del tracker.refs[key]
                    for ref in refs:
                        self.entries.pop(id(ref), None)
                    if not tracker.refs:
                        self.active.pop(id(tracker), None)
        finally:
            local.draining = False


_reaper = _Reaper()


def _after_fork_in_child() -> None:
    global _reaper
    _reaper = _Reaper()


os.register_at_fork(after_in_child=_after_fork_in_child)


def flush() -> None:
    """Release, in this thread and now, every unit whose last view has died.

    Calls that report (usage, states) run it first, so what they report does
    not depend on thread scheduling.
    """
    if _reaper.active:
        _reaper.drain(sweep=True)


def reap_now() -> None:
    """Release units whose leases died since the last drain: cheap when none did."""
    if _reaper.dead:
        _reaper.drain()


class LeaseTracker:
    """The leases one process holds on one arena's units.

    Args:
        release: Called with a key whose leases are all gone (or that was held
            with none). Must be idempotent and must not block: it may run in
            any thread, even inside another arena call.
    """

    def __init__(self, release: Callable[[Hashable], None]) -> None:
        self.release = release
        self.refs: dict[Hashable, list[weakref.ref]] = {}

    def hold(self, key: Hashable, anchors: Iterable[object]) -> None:
        """Keep ``key`` held until every anchor that can be weakly referenced
        dies (none: release it now); replaces the anchors an earlier
        :meth:`hold` gave for ``key``. An interrupt anywhere in here leaves the
        old anchors or the new ones holding ``key``, never neither."""
        reaper = _reaper
        append = reaper.dead.append
        refs = []
        for anchor in anchors:
            try:
                refs.append(weakref.ref(anchor, append))
            except TypeError:
                continue  # cannot be tracked; the other anchors cover it
        if not refs:
            if not sys.is_finalizing():
                self.release(key)  # first: should this be interrupted, the old anchors still hold it
            with reaper.lock:
                for ref in self.refs.pop(key, ()):
                    reaper.entries.pop(id(ref), None)
                if not self.refs:
                    reaper.active.pop(id(self), None)
            return
        with reaper.lock:
            old = self.refs.get(key, ())
            self.refs[key] = refs  # the swap: one assignment
            reaper.active[id(self)] = self
            for ref in refs:
                reaper.entries[id(ref)] = (self, key, ref)
            for ref in old:
                reaper.entries.pop(id(ref), None)
            if reaper.parked or reaper.thread is None:
                reaper.ensure_running()

    @property
    def held(self) -> int:
        """How many units this process still holds leases on."""
        return len(self.refs)
