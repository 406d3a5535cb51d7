"""restore: rebuild an offloaded object from its envelope and its arena.

:func:`restore` validates the envelope (:mod:`torch_arena._codec.envelope`),
opens its unit through the reader (:class:`~torch_arena._arena.protocol.ArenaReader`),
and unpickles the body; each reference's ``(offset, nbytes)`` is checked
against the bounds of its unit before any memory is touched, so a corrupt or
truncated envelope is a ``ValueError`` saying "corrupt envelope", never an
out-of-bounds read. Zero-copy units give views (the unit stays held while any
lives); copy-out units give private copies and release the unit at once. An
intact envelope whose object fails to rebuild (its reconstructor raises) is a
:class:`~torch_arena.RestoreError` naming the object's type, the backend and
the threshold (:mod:`torch_arena._codec.diagnose`).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from torch_arena._arena.protocol import ArenaUnit
from torch_arena._codec import diagnose as _diagnose
from torch_arena._codec import handlers as _handlers
from torch_arena._codec import payloads
from torch_arena._codec.endpoints import as_reader
from torch_arena._codec.envelope import PID_TAG, read_envelope
from torch_arena.errors import RestoreError

__all__ = ["restore"]


_TENSOR_REBUILDERS = {
    "_rebuild_tensor_v2": payloads.StorageHandler.rebuild_tensor_v2,
    "_rebuild_tensor_v3": payloads.StorageHandler.rebuild_tensor_v3,
}


#: Globals a batch's stream names over and over (numpy's dtype and array
#: rebuilders, torch's): looked up once per process, not once per batch.
_CLASSES: dict[tuple[str, str], Any] = {}
_CACHED_PACKAGES = frozenset(("numpy", "torch", "builtins", "collections", "copyreg", "_codecs"))


class _Restoring:
    """find_class / persistent_load of both unpicklers (C for speed, Python to diagnose)."""

    def _start(self, unit: ArenaUnit) -> None:
        self._unit = unit
        self._memo: dict[tuple[Any, ...], Any] = {}
        self.reference_error: BaseException | None = None

    def find_class(self, module: str, name: str) -> Any:
        found = _CLASSES.get((module, name))
        if found is None:
            if module == "torch._utils" and name in _TENSOR_REBUILDERS:
                found = _TENSOR_REBUILDERS[name]
            else:
                found = super().find_class(module, name)  # type: ignore[misc]
                if module.partition(".")[0] in _CACHED_PACKAGES:
                    _CLASSES[(module, name)] = found
        return found

    def persistent_load(self, pid: Any) -> Any:
        try:
            return self._load_reference(pid)
        except BaseException as exc:
            self.reference_error = exc  # ours: corrupt references, missing handlers
            raise

    def _load_reference(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == PID_TAG):
            raise ValueError(f"corrupt envelope: unexpected reference {pid!r}")
        _, kind, offset, nbytes, meta = pid
        if not (isinstance(offset, int) and isinstance(nbytes, int)) or offset < 0 or nbytes < 0:
            raise ValueError(f"corrupt envelope: bad offset/size {offset!r}/{nbytes!r}")
        if kind == payloads.INLINE_STORAGE:  # index ``offset`` of this envelope's inline storages
            key = (kind, offset)
            if key not in self._memo:
                self._memo[key] = payloads.storage_from_inline(meta)
            return self._memo[key]
        handler = _handlers.handler_of_kind(kind)
        wrap = handler.wrap
        # Handlers without ``wrap`` rebuild from ``meta``: two objects over the same
        # bytes (an array and a reshape or dtype view of it) must not come back as one.
        key: Any = (kind, offset, nbytes) if wrap is not None else (kind, offset, nbytes, meta)
        try:
            restored = self._memo.get(key)
        except TypeError:  # unhashable meta from a user handler: nothing to share
            key, restored = None, None
        if restored is None:
            unit = self._unit
            view, zero_copy = unit.view(offset, nbytes), unit.zero_copy
            if not zero_copy and handler.into_private(meta):
                # Copy-out into recycled private memory; the handler then wraps it
                # as it would a zero-copy view (it is private, and stays valid).
                view, zero_copy = unit.private_copy(view), True
            elif not zero_copy and not handler.copies_out:
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
    def __init__(self, file: io.BytesIO, unit: ArenaUnit) -> None:
        super().__init__(file)
        self._start(unit)


class _TracingRestoreUnpickler(_Restoring, _diagnose.TracingUnpickler):
    def __init__(self, file: io.BytesIO, unit: ArenaUnit) -> None:
        super().__init__(file)
        self._start(unit)


def restore(envelope: bytes, reader: Any) -> Any:
    """Rebuild the object :func:`~torch_arena.offload` wrote, from ``reader``'s arena.

    The pools give zero-copy views (the unit stays held while any of them
    lives); the rings give private copies and release the unit at once.

    Raises:
        ValueError: the envelope is corrupt, truncated, already restored, or
            from another arena. The arena is left consistent.
        RestoreError: the envelope is intact but an object in it could not be
            rebuilt here (its reconstructor raised; the cause is chained).
    """
    token, span, threshold, body = read_envelope(envelope)
    endpoint = as_reader(reader)
    if token and endpoint.token and token != endpoint.token:
        raise ValueError(
            f"envelope belongs to arena {token:#x}, but the reader is of arena {endpoint.token:#x}"
        )
    unit = endpoint.open_unit(span)
    unpickler = _RestoreUnpickler(io.BytesIO(body), unit)
    try:
        return unpickler.load()
    except MemoryError:
        raise
    except Exception as exc:
        if exc is unpickler.reference_error or isinstance(exc, RestoreError):
            raise
        raise RestoreError(
            _diagnose.failure_message(_failing_step(body, unit), exc, endpoint.describe(), threshold)
        ) from exc
    finally:
        unit.finish()


def _failing_step(body: memoryview, unit: ArenaUnit) -> str | None:
    """Replay a failed load step by step; what it was rebuilding when it raised."""
    try:
        _TracingRestoreUnpickler(io.BytesIO(body), unit).load()
    except _diagnose.StepFailed as failed:
        return str(failed.args[0])
    except Exception:  # noqa: BLE001 - the replay failed elsewhere: no better name
        return None
    return None
