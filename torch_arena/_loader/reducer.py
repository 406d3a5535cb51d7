"""A ForkingPickler reducer that sends tensors and arrays through an arena.

``multiprocessing.reduction.ForkingPickler`` pickles everything that crosses
a ``torch.multiprocessing``/``multiprocessing`` Queue, Pipe or Process
argument. torch registers reducers there that move each tensor's storage into
a fresh shared-memory segment and pass its file descriptor. While
:func:`arena_reducer` is active, CPU storages and numpy arrays of at least
``threshold`` bytes are written into the arena instead, and the receiving
process restores them with the arena's semantics (zero-copy views from a
pool, private copies from a ring).

Design rules, because the queue feeder thread pickles *after* ``put()``
returned and silently drops an item whose reducer raises (the consumer then
waits forever):

* the reducer never raises and never blocks: no space (``timeout=0``), an
  oversize payload or any error falls back to torch's own reducer;
* storages are intercepted, not tensors, so torch's tensor reducer still
  handles ``requires_grad``, ``Parameter`` and tensor subclasses;
* exact ``bytes`` are pickled before any reducer is consulted, so plain bytes
  cannot be intercepted (use :func:`torch_arena.offload` for those).

Call :func:`arena_reducer` (or :func:`install`) in every process that sends
*or receives*: the receiver needs the arena registered to restore.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import torch
from torch.multiprocessing import reductions as torch_reductions

from torch_arena._arena.protocol import Arena
from torch_arena._codec.envelope import pack_envelope
from torch_arena._codec.envelope import DEFAULT_THRESHOLD
from torch_arena._codec.offload import offload_open_unit
from torch_arena._codec.payloads import NumpyHandler
from torch_arena._loader.session import ArenaSession, session_for

__all__ = ["arena_reducer", "install", "uninstall"]

_log = logging.getLogger(__name__)
_NUMPY = NumpyHandler()


class _Installed:
    def __init__(self, arena: Any, threshold: int) -> None:
        self.arena = arena
        self.threshold = threshold
        self.session = ArenaSession(arena, owned=False, slots=0)
        self.local = threading.local()  # feeder threads pickle concurrently

    def writer(self) -> Any:
        writer = getattr(self.local, "writer", None)
        if writer is None:
            writer = self.local.writer = self.arena.open_writer()
        return writer


_stack: list[_Installed] = []
_stack_lock = threading.Lock()
_original: dict[type, Any] = {}


def _receive(token: int, envelope: bytes, nbytes: int) -> Any:
    return session_for(token).receive(envelope, nbytes, 0.0)


def _try_offload(obj: Any) -> Any:
    """``(rebuild, args)`` through the active arena, or None to fall back."""
    installed = _stack[-1] if _stack else None
    if installed is None or installed.arena.closed:
        return None
    try:
        writer = installed.writer()
        writer.begin_unit(timeout=0.0)
    except Exception:
        return None
    try:
        body, nbytes = offload_open_unit(obj, writer, installed.threshold)
        span = writer.commit_unit()
    except Exception as exc:
        writer.abort_unit()
        _log.debug("torch_arena reducer fell back to torch's path: %s", exc)
        return None
    return (_receive, (writer.token, pack_envelope(writer.token, span, body, installed.threshold), nbytes))


def _reduce_storage(storage: Any) -> Any:
    installed = _stack[-1] if _stack else None
    if (
        installed is not None
        and storage.device.type == "cpu"
        and storage.nbytes() >= max(installed.threshold, 1)
    ):
        reduced = _try_offload(storage)
        if reduced is not None:
            return reduced
    return _original[torch.UntypedStorage](storage)


def _reduce_ndarray(array: Any) -> Any:
    installed = _stack[-1] if _stack else None
    if installed is not None and _NUMPY.matches(array, max(installed.threshold, 1)):
        reduced = _try_offload(array)
        if reduced is not None:
            return reduced
    return array.__reduce_ex__(4)


def install(arena: Any, *, threshold: int = DEFAULT_THRESHOLD) -> None:
    """Route large CPU tensors and numpy arrays pickled by ForkingPickler in
    this process through ``arena``, and restore ones received from it.

    Installs stack: the latest one sends; every installed arena can receive.
    """
    if not isinstance(arena, Arena):
        raise ValueError(f"install() needs a torch_arena arena instance, got {arena!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ValueError(f"threshold must be an int >= 0, got {threshold!r}")
    with _stack_lock:
        if not _stack:
            _original[torch.UntypedStorage] = ForkingPickler._extra_reducers.get(
                torch.UntypedStorage, torch_reductions.reduce_storage
            )
            _original[np.ndarray] = ForkingPickler._extra_reducers.get(np.ndarray)
            ForkingPickler.register(torch.UntypedStorage, _reduce_storage)
            ForkingPickler.register(np.ndarray, _reduce_ndarray)
        _stack.append(_Installed(arena, threshold))


def uninstall(arena: Any = None) -> None:
    """Undo the latest :func:`install` (or the latest one of ``arena``)."""
    with _stack_lock:
        for i in range(len(_stack) - 1, -1, -1):
            if arena is None or _stack[i].arena is arena:
                installed = _stack.pop(i)
                break
        else:
            raise ValueError("uninstall(): no matching arena_reducer is installed")
        installed.session.close()
        if not _stack:
            ForkingPickler._extra_reducers[torch.UntypedStorage] = _original.pop(torch.UntypedStorage)
            previous = _original.pop(np.ndarray)
            if previous is None:
                ForkingPickler._extra_reducers.pop(np.ndarray, None)
            else:
                ForkingPickler._extra_reducers[np.ndarray] = previous


@contextlib.contextmanager
def arena_reducer(arena: Any, *, threshold: int = DEFAULT_THRESHOLD) -> Iterator[Any]:
    """While active, tensors/arrays pickled by ForkingPickler travel through ``arena``.

    Example::

        pool = torch_arena.SharedMemorySegmentPool(64 << 20, 8)
        with torch_arena.arena_reducer(pool):     # in the producer and the consumer
            queue.put(torch.randn(4096, 4096))
    """
    install(arena, threshold=threshold)
    try:
        yield arena
    finally:
        uninstall(arena)
