"""The arena side of one DataLoader, whichever class built it.

A :class:`LoaderArena` holds a loader's :class:`ArenaSettings`, the session its
iterators share (made when the first iterator starts: nothing is allocated
when a loader is built, because Lightning builds and discards copies of
loaders and pickles them under ddp_spawn), and those iterators. It lives in
the loader's ``__dict__`` under :data:`ATTRIBUTE`: an
:class:`~torch_arena.ArenaDataLoader` makes its own from its arguments; any
other loader gets one by :func:`adopt` (what a framework integration does with
a loader the framework built; see :mod:`torch_arena._loader.hooks`), and its
multi-process iterators then go through the arena.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable
from typing import Any

from torch_arena._arena.factory import make_arena
from torch_arena._loader import report
from torch_arena._loader.session import ArenaSession, arena_slots, warn_if_too_few_units
from torch_arena._loader.settings import ArenaSettings
from torch_arena._loader.stats import ArenaStats

__all__ = ["ATTRIBUTE", "LoaderArena", "adopt", "arena_state", "release_all"]

#: Where a loader keeps its :class:`LoaderArena`.
ATTRIBUTE = "_torch_arena"


class LoaderArena:
    """A loader's arena settings, session and live iterators."""

    def __init__(self, settings: ArenaSettings) -> None:
        self.settings = settings
        self.session: ArenaSession | None = None
        self._session_key: tuple[Any, ...] | None = None
        self.iterators: weakref.WeakSet[Any] = weakref.WeakSet()
        self.record = report.track(self)  # TORCH_ARENA_REPORT=1

    def __getstate__(self) -> dict[str, Any]:
        # A pickled loader (ddp_spawn) carries its settings, never a live arena.
        return {"settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["settings"])  # type: ignore[misc]

    def uses_arena(self, loader: Any) -> bool:
        """Whether ``loader``'s batches cross processes through an arena."""
        return self.settings.enabled and loader.num_workers > 0

    def session_for(self, loader: Any) -> ArenaSession:
        """The session for a new iterator of ``loader``: the one earlier iterators
        used, unless the settings or the loader's shape changed since."""
        prefetch = loader.prefetch_factor if loader.prefetch_factor is not None else 2
        slots = arena_slots(loader.num_workers, prefetch, bool(loader.pin_memory))
        settings = self.settings
        arena = settings.arena
        key = (arena if isinstance(arena, str) else id(arena), settings.budget, slots, settings.timeout)
        session = self.session
        if session is not None and session.pid != os.getpid():
            session = None  # inherited through fork (ddp_fork): the parent's, not ours to close
        elif session is not None and (self._session_key != key or session.arena.closed):
            self._close(session)
            session = None
        if session is None:
            if self.record is not None:
                self.record.describe(loader)
            if isinstance(arena, str):
                session = ArenaSession(make_arena(arena, settings.budget, settings.timeout), owned=True, slots=slots)
            else:
                warn_if_too_few_units(arena, slots)
                session = ArenaSession(arena, owned=False, slots=slots)
            self.session, self._session_key = session, key
            if self.record is not None:
                self.record.follow(session)
        return session

    def stats(self) -> ArenaStats:
        """Batches and bytes moved, fallbacks, waits and memory, over all iterators."""
        return self.session.snapshot() if self.session is not None else ArenaStats()

    def release(self) -> None:
        """Stop the live iterators' workers and free the arena the loader made
        (an arena instance the user passed is not closed). Batches already
        delivered stay valid; the next iterator makes a fresh arena."""
        for iterator in list(self.iterators):
            iterator._shutdown_workers()
        session, self.session, self._session_key = self.session, None, None
        if session is not None:
            self._close(session)

    def _close(self, session: ArenaSession) -> None:
        if self.record is not None:
            self.record.add(session.snapshot())  # what it moved outlives it in the report
        session.close()


def arena_state(loader: Any) -> LoaderArena | None:
    """The loader's :class:`LoaderArena`, if it has one."""
    return loader.__dict__.get(ATTRIBUTE)


def adopt(loader: Any, settings: ArenaSettings) -> LoaderArena:
    """Give ``loader`` (any DataLoader) these arena settings."""
    state = loader.__dict__[ATTRIBUTE] = LoaderArena(settings)
    return state



def release_all(loaders: Iterable[Any]) -> None:
    """``release_arena()`` of each loader once; releases the others before
    raising the first failure."""
    seen: set[int] = set()
    errors: list[BaseException] = []
    for loader in loaders:
        if id(loader) in seen:
            continue
        seen.add(id(loader))
        try:
            loader.release_arena()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
