"""offload / restore: one item as a small envelope plus binaries in an arena.

:func:`offload` pickles the item (protocol 5) with a ``persistent_id`` that
diverts every large leaf a handler claims (see :mod:`torch_arena._codec.handlers`)
into the writer's open unit and leaves a small reference in the stream.
Everything else, nested containers, dataclasses, namedtuples, ints and short
strings, is pickled inline, so any picklable structure round-trips.

The envelope is ``header + pickle``; the header carries a magic number, the
arena's token (so an envelope restored against the wrong arena is refused),
the unit's span, the threshold it was offloaded with and a CRC-32 of all of
it. :func:`restore` validates all of it, and every ``(offset, nbytes)`` a
reference names is checked against the bounds of its unit before any memory
is touched: a corrupt or truncated envelope is a ``ValueError`` saying
"corrupt envelope", never an out-of-bounds read. An intact envelope whose
object fails to rebuild (its reconstructor raises) is a
:class:`~torch_arena.RestoreError` naming the object's type, the backend and
the threshold.

Bytes-likes follow SPDL's rule only where they are the user's own values; in
another object's pickled state they come back as their own type (see
:mod:`torch_arena._codec.ownership`).

Both functions also accept endpoints of any arena that follows SPDL's
protocol (``write_binary`` / ``read_binary`` / ``end_unit``); torch_arena's own
endpoints add ``allocate`` / ``locate`` / ``open_unit`` for the zero-copy
paths.
"""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from typing import Any

import numpy as np

from torch_arena._codec import diagnose as _diagnose
from torch_arena._codec import handlers as _handlers
from torch_arena._codec.diagnose import RestoreError
from torch_arena._codec.ownership import OwnershipPickler

__all__ = ["offload", "restore", "DEFAULT_THRESHOLD", "RestoreError"]

DEFAULT_THRESHOLD = 4096
#: Smallest bytes inside another object's state worth an arena reference. They
#: are copied out on restore anyway, and below ~4-8 KiB a reference (allocate,
#: copy in, look up, copy out: ~10 us) costs more than inlining them in the
#: envelope (measured: 200 array.array of 4 KiB, 2.2 ms through the arena, 1.5 ms
#: inline; of 16 KiB, 2.8 ms and 4.3 ms).
STATE_BYTES_MIN = 4096
_MAGIC = b"TAE2"
_HEADER = struct.Struct("<4sQQqI")  # magic, arena token, span, threshold, CRC-32 of the rest
_CHECKED = _HEADER.size - 4  # the CRC covers the header before it, and the body
_PID_TAG = "torch_arena"
_SCALARS = frozenset((int, float, str, bool, type(None), complex, type))
_CONTAINERS = frozenset((tuple, list, dict, set, frozenset))


class _OffloadPickler(OwnershipPickler):
    def __init__(self, file: io.BytesIO, writer: Any, threshold: int) -> None:
        super().__init__(file, protocol=5)
        self._writer = writer
        self._threshold = threshold
        self._state_min = max(threshold, STATE_BYTES_MIN)
        self.mark_min = threshold
        self._fast = hasattr(writer, "allocate")
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
        src = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
        nbytes = src.nbytes
        address = src.ctypes.data if nbytes else 0
        offset = self._placed.get((address, nbytes))
        if offset is None:
            offset = self._place(src, address, nbytes)
            self._placed[(address, nbytes)] = offset
        return (_PID_TAG, handler.kind, offset, nbytes, meta)

    def _inline_storage(self, obj: Any) -> Any:
        """A small CPU storage as raw bytes in the stream (see
        :func:`~torch_arena._codec.handlers.inline_storage`); the same storage twice
        (two views of one tensor) gets one reference, so it comes back shared."""
        found = _handlers.inline_storage(obj)
        if found is None:
            return None
        address, meta = found
        index = self._inlined.setdefault((address, len(meta[1]), meta[0]), len(self._inlined))
        return (_PID_TAG, _handlers.INLINE_STORAGE, index, len(meta[1]), meta)

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


def pack_envelope(token: int, span: int, body: bytes, threshold: int = -1) -> bytes:
    """Prefix ``body`` with the envelope header (``threshold`` -1: not recorded)."""
    head = _HEADER.pack(_MAGIC, token, span, threshold, 0)[:_CHECKED]
    return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body


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
    return pack_envelope(getattr(writer, "token", 0), span, body, threshold)


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


class _Restoring:
    """find_class / persistent_load of both unpicklers (C for speed, Python to diagnose)."""

    def _start(self, unit: Any) -> None:
        self._unit = unit
        self._memo: dict[tuple[Any, ...], Any] = {}
        self.reference_error: BaseException | None = None

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in _TENSOR_REBUILDERS:
            return _TENSOR_REBUILDERS[name]
        return super().find_class(module, name)  # type: ignore[misc]

    def persistent_load(self, pid: Any) -> Any:
        try:
            return self._load_reference(pid)
        except BaseException as exc:
            self.reference_error = exc  # ours: corrupt references, missing handlers
            raise

    def _load_reference(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == _PID_TAG):
            raise ValueError(f"corrupt envelope: unexpected reference {pid!r}")
        _, kind, offset, nbytes, meta = pid
        if not (isinstance(offset, int) and isinstance(nbytes, int)) or offset < 0 or nbytes < 0:
            raise ValueError(f"corrupt envelope: bad offset/size {offset!r}/{nbytes!r}")
        if kind == _handlers.INLINE_STORAGE:  # index ``offset`` of this envelope's inline storages
            key = (kind, offset)
            if key not in self._memo:
                self._memo[key] = _handlers.storage_from_inline(meta)
            return self._memo[key]
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
            private_copy = getattr(self._unit, "private_copy", None)
            if not zero_copy and private_copy is not None and _handlers.restores_into_private(handler, meta):
                # Copy-out into recycled private memory; the handler then wraps it
                # as it would a zero-copy view (it is private, and stays valid).
                view, zero_copy = private_copy(view), True
            elif not zero_copy and not getattr(handler, "copies_out", False):
                view = memoryview(bytearray(view))  # user handlers get a private copy
            restored = self._from_buffer(handler, view, meta, zero_copy, offset, nbytes)
            if key is not None:
                self._memo[key] = restored
        return wrap(restored, meta) if wrap is not None else restored

    @staticmethod
    def _from_buffer(handler: Any, view: Any, meta: Any, zero_copy: bool, offset: int, nbytes: int) -> Any:
        try:
            return handler.from_buffer(view, meta, zero_copy)
        except MemoryError:
            raise
        except Exception as exc:
            if _handlers.is_builtin(handler):  # our rebuild of our own meta: the reference lies
                raise ValueError(
                    f"corrupt envelope: {handler.kind} reference at offset {offset} (+{nbytes} bytes) "
                    f"does not match its description {meta!r}: {type(exc).__name__}: {exc}"
                ) from exc
            raise RestoreError(
                f"torch_arena: the payload handler of kind {handler.kind!r} could not rebuild its "
                f"object: from_buffer raised {type(exc).__name__}: {exc}"
            ) from exc


class _RestoreUnpickler(_Restoring, pickle.Unpickler):
    def __init__(self, file: io.BytesIO, unit: Any) -> None:
        super().__init__(file)
        self._start(unit)


class _TracingRestoreUnpickler(_Restoring, _diagnose.TracingUnpickler):
    def __init__(self, file: io.BytesIO, unit: Any) -> None:
        super().__init__(file)
        self._start(unit)


def _read_envelope(envelope: Any) -> tuple[int, int, int, memoryview]:
    """``(token, span, threshold, body)``; ValueError if ``envelope`` is not intact."""
    if not isinstance(envelope, (bytes, bytearray, memoryview)):
        raise TypeError(f"restore expects the bytes returned by offload(), got {type(envelope).__name__}")
    data = memoryview(envelope).cast("B")
    if len(data) < _HEADER.size:
        raise ValueError(f"corrupt envelope: {len(data)} bytes is shorter than its {_HEADER.size}-byte header")
    magic, token, span, threshold, checksum = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise ValueError("corrupt envelope: not written by torch_arena.offload (bad magic)")
    body = data[_HEADER.size :]
    if zlib.crc32(body, zlib.crc32(data[:_CHECKED])) != checksum:
        raise ValueError(
            f"corrupt envelope: its checksum does not match its {len(data)} bytes (damaged or truncated)"
        )
    return token, span, threshold, body


def parse_envelope(envelope: Any) -> tuple[int, int, memoryview]:
    """``(token, span, body)`` of an envelope; ValueError if it is not an intact one."""
    token, span, _, body = _read_envelope(envelope)
    return token, span, body


def _backend(reader: Any) -> str:
    """The arena a reader reads, for messages."""
    for name in ("arena", "_arena", "_pool", "_ring"):
        arena = getattr(reader, name, None)
        if arena is not None:
            return f"a {type(arena).__name__}"
    kind = "zero-copy" if getattr(reader, "zero_copy", False) else "copying"
    return f"a {kind} {type(reader).__name__}"


def restore(envelope: bytes, reader: Any) -> Any:
    """Rebuild the object :func:`offload` wrote, from ``reader``'s arena.

    The pool gives zero-copy views (the unit stays reserved while any of them
    lives); the ring gives private copies and frees the unit at once.

    Raises:
        ValueError: the envelope is corrupt, truncated, already restored, or
            from another arena. The arena is left consistent.
        RestoreError: the envelope is intact but an object in it could not be
            rebuilt here (its reconstructor raised; the cause is chained).
    """
    token, span, threshold, body = _read_envelope(envelope)
    reader_token = getattr(reader, "token", 0)
    if token and reader_token and token != reader_token:
        raise ValueError(
            f"envelope belongs to arena {token:#x}, but the reader is of arena {reader_token:#x}"
        )
    open_unit = getattr(reader, "open_unit", None)
    unit = open_unit(span) if open_unit is not None else _ProtocolUnit(reader, span)
    unpickler = _RestoreUnpickler(io.BytesIO(body), unit)
    try:
        return unpickler.load()
    except MemoryError:
        raise
    except Exception as exc:
        if exc is unpickler.reference_error or isinstance(exc, RestoreError):
            raise
        raise RestoreError(
            _diagnose.failure_message(_failing_step(body, unit), exc, _backend(reader), threshold)
        ) from exc
    finally:
        unit.finish()


def _failing_step(body: memoryview, unit: Any) -> str | None:
    """Replay a failed load step by step; what it was rebuilding when it raised."""
    try:
        _TracingRestoreUnpickler(io.BytesIO(body), unit).load()
    except _diagnose.StepFailed as failed:
        return str(failed.args[0])
    except Exception:  # noqa: BLE001 - the replay failed elsewhere: no better name
        return None
    return None
