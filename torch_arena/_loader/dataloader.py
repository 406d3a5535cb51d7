"""ArenaDataLoader: torch's DataLoader, with batches crossing through an arena.

Only two things differ from the stock loader, both at iterator time:

* the collate function each worker runs is wrapped in
  :class:`~torch_arena._loader.worker.ArenaCollate`, which writes the batch into the
  arena and returns a small envelope;
* the loader owns an :class:`~torch_arena._loader.session.ArenaSession` that the
  envelope finds when it is unpickled in this process, where it restores.

Everything else is torch's own ``_MultiProcessingDataLoaderIter`` (the
iterator *is* one, so code that reads ``it._workers`` or calls
``it._shutdown_workers()`` keeps working). Nothing is allocated in
``__init__``: Lightning builds and discards copies of loaders and pickles
them under ddp_spawn. The arena is made when the first iterator starts and
kept for the loader's later iterators.
"""

from __future__ import annotations

import atexit
import os
import sys
import weakref
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _BaseDataLoaderIter, _MultiProcessingDataLoaderIter

from torch_arena._codec.codec import DEFAULT_THRESHOLD
from torch_arena._os.sizes import parse_bytes
from torch_arena._loader.restore_thread import start_restore_thread
from torch_arena._loader.session import ArenaSession, ArenaStats, arena_slots, make_arena, warn_if_pool_too_small
from torch_arena._loader.worker import ArenaCollate

__all__ = ["ArenaDataLoader"]

_ARENA_NAMES = ("pool", "ring")
_OVERFLOW = ("fallback", "raise")


def _validate_arena(arena: object) -> object:
    """The arena setting to store: ``"none"`` (as on the Lightning flag) means None."""
    if arena is None or arena == "none":
        return None
    if arena in _ARENA_NAMES:
        return arena
    if isinstance(arena, str) or not all(hasattr(arena, m) for m in ("open_writer", "open_reader")):
        raise ValueError(
            f"arena must be 'pool', 'ring', None or 'none' (torch's default transport) or an "
            f"arena instance (SharedMemorySegmentPool / SharedMemoryRingBuffer), got {arena!r}"
        )
    return arena


class ArenaDataLoader(DataLoader):
    """A drop-in :class:`torch.utils.data.DataLoader` whose workers send batches
    through a shared-memory arena.

    Every DataLoader argument keeps its meaning. The extra keyword-only
    arguments:

    Args:
        arena: ``"pool"`` (the default: an elastic pool, zero-copy views, sized
            by the batches themselves), ``"ring"`` (the same memory, restores
            copied into recycled private memory), an arena
            instance you own (shared by all the loader's iterators), or
            ``None`` / ``"none"`` for exactly the stock transport (the A side
            of an A/B comparison). Ignored with ``num_workers=0``.
        arena_budget: The most memory an arena the loader makes (``"pool"`` or
            ``"ring"``) may commit. Default: half of the memory available when
            the first iterator starts; nothing is committed until batches need
            it, and memory above the recent working set goes back.
            Bytes as an int, an integral float (``1.5e9``) or a string
            (``"4GiB"``, ``"512MB"``).
        arena_overflow: ``"fallback"`` (default): a batch that does not fit
            travels by torch's default path, with one warning and a count in
            :attr:`arena_stats`; ``"raise"``: a :class:`BufferError` that says
            what to change.
        arena_timeout: Seconds a worker waits for space (the arena at its
            budget with batches the training loop keeps) before falling back
            or raising.
        arena_threshold: Tensors, arrays and bytes smaller than this travel
            inline in the envelope.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        num_workers: int = 0,
        collate_fn: Callable[[Any], Any] | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: Any = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        arena: Any = "pool",
        arena_budget: int | float | str | None = None,
        arena_overflow: str = "fallback",
        arena_timeout: float = 2.0,
        arena_threshold: int = DEFAULT_THRESHOLD,
        **kwargs: Any,
    ) -> None:
        arena = _validate_arena(arena)
        if arena_budget is not None:
            arena_budget = parse_bytes(arena_budget, "arena_budget")
        if arena_overflow not in _OVERFLOW:
            raise ValueError(f"arena_overflow must be 'fallback' or 'raise', got {arena_overflow!r}")
        if isinstance(arena_timeout, bool) or not isinstance(arena_timeout, (int, float)) or not arena_timeout >= 0:
            raise ValueError(f"arena_timeout must be a number of seconds >= 0, got {arena_timeout!r}")
        if isinstance(arena_threshold, bool) or not isinstance(arena_threshold, int) or arena_threshold < 0:
            raise ValueError(f"arena_threshold must be an int >= 0, got {arena_threshold!r}")
        self._arena_session: ArenaSession | None = None
        self._arena_session_key: tuple[Any, ...] | None = None
        self._arena_iterators: weakref.WeakSet[Any] = weakref.WeakSet()
        super().__init__(
            dataset,
            batch_size,
            shuffle,
            sampler,
            batch_sampler,
            num_workers,
            collate_fn,
            pin_memory,
            drop_last,
            timeout,
            worker_init_fn,
            multiprocessing_context,
            generator,
            prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers,
            pin_memory_device=pin_memory_device,
            in_order=in_order,
            **kwargs,
        )
        self.arena = arena
        self.arena_budget = arena_budget
        self.arena_overflow = arena_overflow
        self.arena_timeout = float(arena_timeout)
        self.arena_threshold = arena_threshold

    def __getstate__(self) -> dict[str, Any]:
        # A live arena or iterator never travels with a pickled loader
        # (ddp_spawn pickles DataModules and their loaders).
        state = self.__dict__.copy()
        state["_arena_session"] = None
        state["_arena_session_key"] = None
        state["_iterator"] = None
        state["_arena_iterators"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__["_arena_iterators"] = weakref.WeakSet()

    @property
    def uses_arena(self) -> bool:
        """Whether batches will cross processes through an arena."""
        return self.arena is not None and self.num_workers > 0

    @property
    def arena_stats(self) -> ArenaStats:
        """Batches and bytes moved through the arena, fallbacks, producer wait
        time and high-water marks, over all of this loader's iterators."""
        session = self._arena_session
        return session.snapshot() if session is not None else ArenaStats()

    def release_arena(self) -> None:
        """Stop this loader's workers and free the arena it made.

        Batches already restored stay valid (their memory goes when they do).
        An arena instance passed in by the user is not closed. The next
        iteration makes a fresh arena.
        """
        for iterator in list(self._arena_iterators):
            iterator._shutdown_workers()
        self._iterator = None
        session, self._arena_session = self._arena_session, None
        self._arena_session_key = None
        if session is not None:
            session.close()

    def _session_for_iterator(self) -> ArenaSession:
        prefetch = self.prefetch_factor if self.prefetch_factor is not None else 2
        slots = arena_slots(self.num_workers, prefetch, bool(self.pin_memory))
        arena_key = self.arena if isinstance(self.arena, str) else id(self.arena)
        key = (arena_key, self.arena_budget, slots, self.arena_timeout)
        session = self._arena_session
        if session is not None and session.pid != os.getpid():
            session = None  # inherited through fork (ddp_fork): the parent's, not ours to close
        elif session is not None and (self._arena_session_key != key or session.arena.closed):
            session.close()
            session = None
        if session is None:
            if isinstance(self.arena, str):
                arena = make_arena(self.arena, self.arena_budget, self.arena_timeout)
                session = ArenaSession(arena, owned=True, slots=slots)
            else:
                warn_if_pool_too_small(self.arena, slots)
                session = ArenaSession(self.arena, owned=False, slots=slots)
            self._arena_session, self._arena_session_key = session, key
        return session

    def _get_iterator(self) -> _BaseDataLoaderIter:
        if not self.uses_arena:
            return super()._get_iterator()
        self.check_worker_number_rationality()
        iterator = self._arena_iterator()
        self._arena_iterators.add(iterator)
        _live_iterators.add(iterator)
        return iterator

    def _arena_iterator(self) -> _BaseDataLoaderIter:
        """A new multi-process iterator whose workers write into the arena
        (a subclass with its own iterator, e.g. torchdata's, overrides it)."""
        return _ArenaMultiProcessingDataLoaderIter(self)

    # Accelerate reads this flag before it rebuilds a loader as a plain
    # DataLoader (torch_arena.accelerate keeps the arena; otherwise warn).
    @property
    def _is_accelerate_prepared(self) -> bool:
        prepared = bool(self.__dict__.get("_is_accelerate_prepared", False))
        if not prepared and self.uses_arena:
            from torch_arena._loader.rebuild import warn_arena_dropped

            warn_arena_dropped(self)
        return prepared

    @_is_accelerate_prepared.setter
    def _is_accelerate_prepared(self, value: bool) -> None:
        self.__dict__["_is_accelerate_prepared"] = value


_live_iterators: "weakref.WeakSet[Any]" = weakref.WeakSet()


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

    def __init__(self, loader: ArenaDataLoader, *args: Any) -> None:
        self._arena_pid = os.getpid()  # only this process may shut its workers down
        session = loader._session_for_iterator()
        session.note_workers_gone([])  # reclaim what earlier iterators' workers left
        self._arena_session = session
        self._arena_config = dict(
            threshold=loader.arena_threshold,
            overflow=loader.arena_overflow,
            timeout=loader.arena_timeout,
            slots_hint=session.slots,
        )
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
            collate_fn = ArenaCollate(collate_fn, self._arena_session.arena, **self._arena_config)
        self.__dict__["_collate_fn"] = collate_fn

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


class _ArenaMultiProcessingDataLoaderIter(ArenaIteratorMixin, _MultiProcessingDataLoaderIter):
    """torch's multi-process iterator; workers run an :class:`ArenaCollate`.

    With a copy-out arena (a ring) and no pin-memory thread, batches are
    restored in a thread of their own, so the copy overlaps the training step
    (see :mod:`torch_arena._loader.restore_thread`).
    """

    def __init__(self, loader: ArenaDataLoader) -> None:
        super().__init__(loader)
        if not self._pin_memory and not self._arena_session.reader.zero_copy:
            start_restore_thread(self)
