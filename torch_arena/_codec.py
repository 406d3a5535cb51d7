"""offload / restore: one item as a small envelope plus binaries in an arena.

:func:`offload` pickles the item (protocol 5) with a ``persistent_id`` that
diverts every large leaf a handler claims (see :mod:`torch_arena._handlers`)
into the writer's open unit and leaves a small reference in the stream.
Everything else, nested containers, dataclasses, namedtuples, ints and short
strings, is pickled inline, so any picklable structure round-trips.

The envelope is ``header + pickle``; the header carries a magic number, the
arena's token (so an envelope restored against the wrong arena is refused)
and the unit's span. :func:`restore` validates all of it, and every
``(offset, nbytes)`` a reference names is checked against the bounds of its
unit before any memory is touched: a corrupt or truncated envelope is a
``ValueError``, never an out-of-bounds read.

Both functions also accept endpoints of any arena that follows SPDL's
protocol (``write_binary`` / ``read_binary`` / ``end_unit``); torch_arena's own
endpoints add ``allocate`` / ``locate`` / ``open_unit`` for the zero-copy
paths.
"""

from __future__ import annotations

import io
import pickle
import struct
from typing import Any

import numpy as np

from . import _handlers

__all__ = ["offload", "restore", "DEFAULT_THRESHOLD"]

DEFAULT_THRESHOLD = 4096
_MAGIC = b"TAE1"
_HEADER = struct.Struct("<4sQQ")  # magic, arena token, span
_PID_TAG = "torch_arena"
_INLINE_TYPES = frozenset((int, float, str, bool, type(None), tuple, list, dict, complex, type))


class _OffloadPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, writer: Any, threshold: int) -> None:
        super().__init__(file, protocol=5)
        self._writer = writer
        self._threshold = threshold
        self._fast = hasattr(writer, "allocate")
        self._placed: dict[tuple[int, int], int] = {}
        self.binary_bytes = 0

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) in _INLINE_TYPES:
            return None
        handler = _handlers.handler_for(obj, self._threshold)
        if handler is None:
            return None
        buf, meta = handler.get_buffer(obj)
        src = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
        nbytes = src.nbytes
        address = src.ctypes.data if nbytes else 0
        offset = self._placed.get((address, nbytes))
        if offset is None:
            offset = self._place(src, address, nbytes)
            self._placed[(address, nbytes)] = offset
        return (_PID_TAG, handler.kind, offset, nbytes, meta)

    def _place(self, src: np.ndarray, address: int, nbytes: int) -> int:
        writer = self._writer
        if not self._fast:
            offset, _ = writer.write_binary(memoryview(src))
            self.binary_bytes += nbytes
            return offset
        offset = writer.locate(address, nbytes)
        if offset is None:
            offset, dst = writer.allocate(nbytes)
            np.copyto(dst, src)
        self.binary_bytes += nbytes
        return offset


def offload_open_unit(obj: object, writer: Any, threshold: int) -> tuple[bytes, int]:
    """Pickle ``obj`` into the writer's already open unit; ``(body, binary bytes)``."""
    buf = io.BytesIO()
    pickler = _OffloadPickler(buf, writer, threshold)
    pickler.dump(obj)
    return buf.getvalue(), pickler.binary_bytes


def pack_envelope(token: int, span: int, body: bytes) -> bytes:
    """Prefix ``body`` with the envelope header."""
    return _HEADER.pack(_MAGIC, token, span) + body


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
        A small ``bytes`` envelope for :func:`restore`.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ValueError(f"threshold must be an int >= 0, got {threshold!r}")
    writer.begin_unit()
    try:
        body, _ = offload_open_unit(obj, writer, threshold)
        span = writer.commit_unit()
    except BaseException:
        writer.abort_unit()
        raise
    return pack_envelope(getattr(writer, "token", 0), span, body)


class _ProtocolUnit:
    """Adapter that reads a unit through SPDL's reader protocol."""

    def __init__(self, reader: Any, span: int) -> None:
        self._reader, self._span = reader, span
        self.zero_copy = bool(reader.zero_copy)
        self._pinned: list[object] = []

    def view(self, offset: int, nbytes: int) -> Any:
        view = self._reader.read_binary(offset, nbytes)
        if self.zero_copy:
            self._pinned.append(view)
        return view

    def finish(self, pinned: Any = ()) -> None:
        self._reader.end_unit(self._span, [*self._pinned, *pinned])


_TENSOR_REBUILDERS = {
    "_rebuild_tensor_v2": _handlers.StorageHandler.rebuild_tensor_v2,
    "_rebuild_tensor_v3": _handlers.StorageHandler.rebuild_tensor_v3,
}


class _RestoreUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, unit: Any) -> None:
        super().__init__(file)
        self._unit = unit
        self._memo: dict[tuple[str, int, int], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in _TENSOR_REBUILDERS:
            return _TENSOR_REBUILDERS[name]
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == _PID_TAG):
            raise ValueError(f"corrupt envelope: unexpected reference {pid!r}")
        _, kind, offset, nbytes, meta = pid
        if not (isinstance(offset, int) and isinstance(nbytes, int)) or offset < 0 or nbytes < 0:
            raise ValueError(f"corrupt envelope: bad offset/size {offset!r}/{nbytes!r}")
        handler = _handlers.handler_of_kind(kind)
        wrap = getattr(handler, "wrap", None)
        # Handlers without ``wrap`` rebuild from ``meta``: two objects over the same
        # bytes (an array and a reshape or dtype view of it) must not come back as one.
        key: Any = (kind, offset, nbytes) if wrap is not None else (kind, offset, nbytes, meta)
        try:
            restored = self._memo.get(key)
        except TypeError:  # unhashable meta from a user handler: nothing to share
            key, restored = None, None
        if restored is None:
            view = self._unit.view(offset, nbytes)
            zero_copy = self._unit.zero_copy
            if not zero_copy and not getattr(handler, "copies_out", False):
                view = memoryview(bytearray(view))  # user handlers get a private copy
            restored = handler.from_buffer(view, meta, zero_copy)
            if key is not None:
                self._memo[key] = restored
        return wrap(restored, meta) if wrap is not None else restored


def parse_envelope(envelope: Any) -> tuple[int, int, memoryview]:
    """``(token, span, body)`` of an envelope; ValueError if it is not one."""
    if not isinstance(envelope, (bytes, bytearray, memoryview)):
        raise TypeError(f"restore expects the bytes returned by offload(), got {type(envelope).__name__}")
    data = memoryview(envelope)
    if len(data) < _HEADER.size:
        raise ValueError(f"corrupt envelope: {len(data)} bytes is shorter than its {_HEADER.size}-byte header")
    magic, token, span = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise ValueError("corrupt envelope: not written by torch_arena.offload (bad magic)")
    return token, span, data[_HEADER.size :]


def restore(envelope: bytes, reader: Any) -> Any:
    """Rebuild the object :func:`offload` wrote, from ``reader``'s arena.

    The pool gives zero-copy views (the unit stays reserved while any of them
    lives); the ring gives private copies and frees the unit at once.

    Raises:
        ValueError: the envelope is corrupt, truncated, already restored, or
            from another arena. The arena is left consistent.
    """
    token, span, body = parse_envelope(envelope)
    reader_token = getattr(reader, "token", 0)
    if token and reader_token and token != reader_token:
        raise ValueError(
            f"envelope belongs to arena {token:#x}, but the reader is of arena {reader_token:#x}"
        )
    open_unit = getattr(reader, "open_unit", None)
    unit = open_unit(span) if open_unit is not None else _ProtocolUnit(reader, span)
    try:
        return _RestoreUnpickler(io.BytesIO(body), unit).load()
    except MemoryError:
        raise
    except Exception as exc:
        # Whatever a damaged pickle stream makes the unpickler or a rebuild
        # function raise (UnicodeDecodeError, "unsupported pickle protocol",
        # torch's "storage that is not resizable", ...) is one clear error.
        if isinstance(exc, ValueError) and "envelope" in str(exc):
            raise
        raise ValueError(f"corrupt envelope: {type(exc).__name__}: {exc}") from exc
    finally:
        unit.finish()
