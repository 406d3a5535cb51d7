"""Iterators whose workers write into the arena: torch's own, with two changes.

:class:`ArenaIteratorMixin`, put before a torch-style multi-process iterator
class (torch's, torchdata's), wraps the collate function each worker runs in
an :class:`~torch_arena._loader.worker.ArenaCollate` and ties the iterator to
its loader's session; everything else is torch's iterator (code that reads
``it._workers`` or calls ``it._shutdown_workers()`` keeps working). With a
copy-out arena and no pin-memory thread, batches are restored in a thread of
their own (:mod:`torch_arena._loader.restore_thread`).
"""

from __future__ import annotations

import atexit
import os
import sys
import weakref
from typing import Any

from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from torch_arena._loader.loader_arena import LoaderArena
from torch_arena._loader.restore_thread import RestoreAhead, resolve, start_restore_thread
from torch_arena._loader.worker import ArenaCollate

__all__ = ["ArenaIteratorMixin", "ArenaMultiProcessingDataLoaderIter", "track"]

_live_iterators: "weakref.WeakSet[Any]" = weakref.WeakSet()


def track(iterator: Any, state: LoaderArena) -> Any:
    """Register a new arena iterator with its loader and for shutdown at exit."""
    state.iterators.add(iterator)
    _live_iterators.add(iterator)
    return iterator


@atexit.register
def _shut_down_live_iterators() -> None:
    # Registered after multiprocessing's own exit handler, so it runs first: the
    # workers stop through torch's orderly path instead of being terminated by
    # multiprocessing, which torch's SIGCHLD handler reports as a worker failure.
    for iterator in list(_live_iterators):
        try:
            iterator._shutdown_workers()
        except Exception:
            pass


class ArenaIteratorMixin:
    """Put before a torch-style multi-process iterator class: its workers run
    an :class:`ArenaCollate` and its batches restore from the loader's arena."""

    def __init__(self, loader: Any, state: LoaderArena, *args: Any) -> None:
        self._arena_pid = os.getpid()  # only this process may shut its workers down
        session = state.session_for(loader)
        session.note_workers_gone([])  # reclaim what earlier iterators' workers left
        self._arena_session = session
        self._arena_settings = state.settings
        super().__init__(loader, *args)  # type: ignore[call-arg]

    # torch's base iterator assigns ``self._collate_fn = loader.collate_fn`` and
    # hands it to the worker processes it starts right after; wrapping it at
    # assignment puts the arena in the workers without touching torch's code.
    @property  # type: ignore[override]
    def _collate_fn(self) -> Any:
        return self.__dict__["_collate_fn"]

    @_collate_fn.setter
    def _collate_fn(self, collate_fn: Any) -> None:
        if not isinstance(collate_fn, ArenaCollate):
            session = self._arena_session
            collate_fn = ArenaCollate(collate_fn, session.arena, self._arena_settings, session.slots)
        self.__dict__["_collate_fn"] = collate_fn

    def _reset(self, *args: Any, **kwargs: Any) -> None:
        # Every epoch starts here (the first, and each one of persistent workers).
        self._arena_session.start_epoch()
        super()._reset(*args, **kwargs)  # type: ignore[misc]

    def _shutdown_workers(self) -> None:
        if "_shutdown" not in self.__dict__:
            # __init__ failed before torch's part ran (e.g. MemoryError making
            # the arena): no worker exists; torch's __del__ would otherwise
            # print an AttributeError under the user's real error.
            return
        if self.__dict__.get("_arena_pid") != os.getpid():
            # A copy inherited by a forked process (the next loader's worker, while
            # this iterator was still alive): its workers are not this process's
            # children, and torch's shutdown would fail asserting so.
            return
        pids = [w.pid for w in getattr(self, "_workers", ())]
        try:
            super()._shutdown_workers()  # type: ignore[misc]
        finally:
            session = getattr(self, "_arena_session", None)
            if session is not None and pids and not sys.is_finalizing():
                # Batches these workers committed but nobody will read (early
                # break, abandoned iterator) go back to the arena.
                session.note_workers_gone(pids)
                session.keep_peaks()


class ArenaMultiProcessingDataLoaderIter(ArenaIteratorMixin, _MultiProcessingDataLoaderIter):
    """torch's multi-process iterator; workers run an :class:`ArenaCollate`.

    With a copy-out arena and no pin-memory thread, batches are restored in a
    thread of their own, at most one ahead of the loop; the loop restores the
    others as it takes them (:mod:`torch_arena._loader.restore_thread`).
    """

    _arena_ahead: RestoreAhead | None = None

    def __init__(self, loader: Any, state: LoaderArena) -> None:
        super().__init__(loader, state)
        session = self._arena_session
        if not self._pin_memory and not session.reader.zero_copy:
            session.defer_copies = True
            self._arena_ahead = start_restore_thread(self)

    def _process_data(self, data: Any, *args: Any) -> Any:
        return super()._process_data(resolve(data), *args)

    def _reset(self, *args: Any, **kwargs: Any) -> None:
        super()._reset(*args, **kwargs)
        if self._arena_ahead is not None:
            self._arena_ahead.reset()  # what was in flight is gone
