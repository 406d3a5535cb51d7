"""Arenas for loaders torch_arena did not build: two hooks on the loader classes.

Frameworks build their own loaders (HF Accelerate rebuilds every loader it
prepares, as a plain ``DataLoader`` or torchdata ``StatefulDataLoader``). For
such a loader to use an arena it needs arena settings (a
:class:`~torch_arena._loader.loader_arena.LoaderArena`) and an iterator whose
workers write into the arena. Two hooks on each loader class provide them:

* ``__init__``: a loader built while :func:`adopting` is active in this
  thread takes the offered settings, before anything can start an iterator
  (a ``StatefulDataLoader``'s first ``state_dict()`` does), so the first
  iterator is already an arena iterator;
* ``_get_iterator``: a loader with arena settings and workers gets an arena
  iterator (the class's own factory, :func:`register`); a loader without any
  takes the switch's settings, when the switch is on
  (:mod:`torch_arena._loader.switch`); any other loader gets exactly the
  class's own iterator.

The hooks are installed the first time something needs them (never at
import), wrap the originals with ``functools.wraps`` (so signatures that
Lightning inspects are unchanged), and do nothing for a loader without
settings.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from torch.utils.data import DataLoader

from torch_arena._loader.after_import import when_imported
from torch_arena._loader.iterators import ArenaMultiProcessingDataLoaderIter, track
from torch_arena._loader.loader_arena import ATTRIBUTE, LoaderArena, adopt, arena_state
from torch_arena._loader.settings import ArenaSettings
from torch_arena._loader.stats import ArenaStats

__all__ = ["adopting", "install", "offer_within_caller", "register", "set_default"]

IteratorFactory = Callable[[Any, LoaderArena], Any]
_factories: dict[type, IteratorFactory] = {}
_forgetters: dict[type, Callable[[Any], None]] = {}
_install_lock = threading.Lock()
_pending = threading.local()
#: The switch's settings: what a loader without settings of its own adopts
#: when its first iterator starts (None: the switch is off).
_default: ArenaSettings | None = None


def _forget_iterator(loader: Any) -> None:
    loader._iterator = None


def register(cls: type, factory: IteratorFactory, forget: Callable[[Any], None] = _forget_iterator) -> None:
    """Hook loader class ``cls`` (idempotent): ``factory(loader, state)`` makes
    the arena iterator of its loaders that have arena settings; ``forget(loader)``
    drops the loader's kept iterator once its arena is released. The class
    also gets ``arena_stats`` and ``release_arena``, as
    :class:`~torch_arena.ArenaDataLoader` has them (Accelerate's wrappers
    forward attribute reads to the loader inside)."""
    with _install_lock:
        installed = cls in _factories
        _factories[cls], _forgetters[cls] = factory, forget
        if installed:
            return
        original_init, original_get_iterator = cls.__init__, cls._get_iterator
        while getattr(original_get_iterator, "torch_arena_trampoline", False):
            # The start-up hook's stand-in, left on the class: calling it would
            # come back here. What it stands in for is the original.
            original_get_iterator = original_get_iterator.__wrapped__

        @functools.wraps(original_init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original_init(self, *args, **kwargs)
            _claim(self)

        @functools.wraps(original_get_iterator)
        def _get_iterator(self: Any) -> Any:
            state = arena_state(self)
            if state is None and _default is not None and self.num_workers > 0:
                state = adopt(self, _default)
            if state is None or not state.uses_arena(self) or type(self)._get_iterator is not _get_iterator:
                return original_get_iterator(self)
            self.check_worker_number_rationality()
            return track(_factories[cls](self, state), state)

        cls.__init__ = __init__  # type: ignore[method-assign]
        cls._get_iterator = _get_iterator  # type: ignore[method-assign]
        cls.arena_stats = property(_arena_stats, doc=_arena_stats.__doc__)  # type: ignore[attr-defined]
        cls.release_arena = _release_arena  # type: ignore[attr-defined]


def _arena_stats(loader: Any) -> ArenaStats:
    """What the loader's arena has moved (empty for a loader without one)."""
    state = arena_state(loader)
    return state.stats() if state is not None else ArenaStats()


def _release_arena(loader: Any) -> None:
    """Stop the loader's workers and free its arena (nothing for a loader without one)."""
    state = arena_state(loader)
    if state is not None:
        state.release()
        for cls in type(loader).__mro__:
            if cls in _forgetters:
                _forgetters[cls](loader)
                break


def install() -> None:
    """Hook torch's DataLoader now, and torchdata's StatefulDataLoader once it
    is imported (at once if it is)."""
    if DataLoader not in _factories:
        register(DataLoader, ArenaMultiProcessingDataLoaderIter)
        when_imported("torchdata.stateful_dataloader.stateful_dataloader", _register_stateful)


def _register_stateful(_: object) -> None:
    from torch_arena._loader import stateful

    register(stateful.StatefulDataLoader, stateful.stateful_iterator, stateful.forget_iterator)


def set_default(settings: ArenaSettings | None) -> None:
    """The settings loaders without their own adopt (the switch's); installs the hooks."""
    global _default
    if settings is not None:
        install()
    _default = settings


class _Offer(NamedTuple):
    settings: ArenaSettings
    dataset: Any
    caller: tuple[int, Any] | None  # (id, code) of a frame the offer lives within


@contextlib.contextmanager
def adopting(settings: ArenaSettings, dataset: Any = None) -> Iterator[None]:
    """Within the block, the next loader this thread builds (over ``dataset``,
    or a wrapper of it such as Accelerate's ``IterableDatasetShard``, when
    given) takes ``settings``: for a framework that builds its own loader from
    one of ours."""
    install()
    previous = getattr(_pending, "offer", None)
    _pending.offer = _Offer(settings, dataset, None)
    try:
        yield
    finally:
        _pending.offer = previous


def offer_within_caller(settings: ArenaSettings, dataset: Any, depth: int = 2) -> None:
    """Offer ``settings`` to the next loader built over ``dataset`` while the
    frame ``depth`` levels up (the framework's function that is about to build
    one) is still running; the offer lapses when that call returns."""
    install()
    frame = sys._getframe(depth)
    _pending.offer = _Offer(settings, dataset, (id(frame), frame.f_code))


def _caller_running(caller: tuple[int, Any]) -> bool:
    frame = sys._getframe(2)
    for _ in range(64):
        if frame is None:
            return False
        if id(frame) == caller[0] and frame.f_code is caller[1]:
            return True
        frame = frame.f_back
    return False


def _claim(loader: Any) -> None:
    offer: _Offer | None = getattr(_pending, "offer", None)
    if offer is None or ATTRIBUTE in loader.__dict__:
        return
    if offer.caller is not None and not _caller_running(offer.caller):
        _pending.offer = None  # the call it was made for has returned
        return
    built_over = getattr(loader, "dataset", None)
    dataset = offer.dataset
    if dataset is not None and built_over is not dataset and getattr(built_over, "dataset", None) is not dataset:
        return  # some other loader, built meanwhile
    _pending.offer = None
    adopt(loader, offer.settings)
