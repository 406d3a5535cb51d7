"""offload: one item as a small envelope plus binaries in an arena.

:func:`offload` pickles the item (protocol 5) with a ``persistent_id`` that
diverts every large leaf a handler claims (see :mod:`torch_arena._codec.handlers`)
into the writer's open unit and leaves a small reference in the stream
(:mod:`torch_arena._codec.envelope`). Everything else, nested containers,
dataclasses, namedtuples, ints and short strings, is pickled inline, so any
picklable structure round-trips. Bytes-likes follow SPDL's rule only where
they are the user's own values; in another object's pickled state they come
back as their own type (see :mod:`torch_arena._codec.ownership`).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from torch_arena._arena.protocol import ArenaWriter
from torch_arena._codec import handlers as _handlers
from torch_arena._codec import payloads
from torch_arena._codec.endpoints import as_writer
from torch_arena._codec.envelope import DEFAULT_THRESHOLD, PID_TAG, pack_envelope
from torch_arena._codec.ownership import OwnershipPickler

__all__ = ["DEFAULT_THRESHOLD", "offload", "offload_open_unit"]

#: Smallest bytes inside another object's state worth an arena reference. They
#: are copied out on restore anyway, and below ~4-8 KiB a reference (allocate,
#: copy in, look up, copy out: ~10 us) costs more than inlining them in the
#: envelope (measured: 200 array.array of 4 KiB, 2.2 ms through the arena, 1.5 ms
#: inline; of 16 KiB, 2.8 ms and 4.3 ms).
STATE_BYTES_MIN = 4096
_SCALARS = frozenset((int, float, str, bool, type(None), complex, type))
_CONTAINERS = frozenset((tuple, list, dict, set, frozenset))


class _OffloadPickler(OwnershipPickler):
    def __init__(self, file: io.BytesIO, writer: ArenaWriter, threshold: int) -> None:
        super().__init__(file, protocol=5)
        self._writer = writer
        self._threshold = threshold
        self._state_min = max(threshold, STATE_BYTES_MIN)
        self.mark_min = threshold
        self._placed: dict[tuple[int, int], int] = {}
        self._inlined: dict[tuple[Any, ...], int] = {}
        self.binary_bytes = 0

    def persistent_id(self, obj: Any) -> Any:
        cls = type(obj)
        if cls in _SCALARS:
            return None
        if cls in _CONTAINERS:
            self.visit_container(obj, cls)
            return None
        handler = _handlers.handler_for(obj, self._threshold)
        if handler is None:
            return self._inline_storage(obj)
        if handler is _handlers.BYTES and self.in_state(obj):
            if cls is not memoryview and len(obj) < self._state_min:
                return None  # cheaper inline than through the arena and back out
            handler = _handlers.STATE_BYTES  # its reconstructor (or its hash) needs the type
        buf, meta = handler.get_buffer(obj)
        src = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
        nbytes = src.nbytes
        key = (src.ctypes.data if nbytes else 0, nbytes)
        offset = self._placed.get(key)
        if offset is None:
            offset = self._placed[key] = self._writer.place(src)
            self.binary_bytes += nbytes
        return (PID_TAG, handler.kind, offset, nbytes, meta)

    def _inline_storage(self, obj: Any) -> Any:
        """A small CPU storage as raw bytes in the stream (see
        :func:`~torch_arena._codec.handlers.inline_storage`); the same storage
        twice (two views of one tensor) gets one reference, so it comes back shared."""
        found = payloads.inline_storage(obj)
        if found is None:
            return None
        address, meta = found
        index = self._inlined.setdefault((address, len(meta[1]), meta[0]), len(self._inlined))
        return (PID_TAG, payloads.INLINE_STORAGE, index, len(meta[1]), meta)


def offload_open_unit(obj: object, writer: ArenaWriter, threshold: int) -> tuple[bytes, int]:
    """Pickle ``obj`` into the writer's already open unit; ``(body, binary bytes)``."""
    buf = io.BytesIO()
    pickler = _OffloadPickler(buf, writer, threshold)
    pickler.dump(obj)
    return buf.getvalue(), pickler.binary_bytes


def offload(obj: object, writer: Any, *, threshold: int = DEFAULT_THRESHOLD) -> bytes:
    """Write ``obj``'s large leaves into a new unit of ``writer``; return the envelope.

    Leaves of at least ``threshold`` bytes that a handler claims (bytes-likes,
    numpy arrays, torch CPU tensors, spdl.io packets, your own registered
    types) are copied into the arena once; the rest is pickled inline. On any
    error the unit is aborted and the error re-raised, so the writer is ready
    for the next item.

    Args:
        obj: Any picklable object.
        writer: From ``arena.open_writer()`` (torch_arena's, or any arena that
            follows SPDL's writer protocol).
        threshold: Smallest leaf, in bytes, worth moving through the arena.

    Returns:
        A small ``bytes`` envelope for :func:`~torch_arena.restore`.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ValueError(f"threshold must be an int >= 0, got {threshold!r}")
    endpoint = as_writer(writer)
    endpoint.begin_unit()
    try:
        body, _ = offload_open_unit(obj, endpoint, threshold)
        span = endpoint.commit_unit()
    except BaseException:
        endpoint.abort_unit()
        raise
    return pack_envelope(endpoint.token, span, body, threshold)
