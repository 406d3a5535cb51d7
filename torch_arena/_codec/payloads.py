"""The payload handlers: which objects travel through the arena, and how they come back.

A handler claims one family of objects (:meth:`PayloadHandler.matches`),
exposes its bytes without copying (:meth:`PayloadHandler.get_buffer`) and
rebuilds it from arena memory (:meth:`PayloadHandler.from_buffer`). The codec
(:mod:`torch_arena._codec.offload`) does the single copy in between, and skips even
that when the bytes already sit in the unit being written (a batch collated
straight into the arena).

Restore rules (SPDL's, plus what SPDL gets wrong):

* bytes / bytearray / memoryview that are the user's own values (the item
  itself, or held by its dicts, lists, tuples, namedtuples, dataclasses and
  other objects pickled attribute by attribute): the pool gives a writable
  ``memoryview`` over shared memory for all three; the ring gives back the
  original type.
* bytes inside another object's pickled state (what an ``array.array``, a
  masked array, a numpy scalar or a ``datetime`` reduces to), dict keys and
  set members: always the original type, copied out of the arena, because
  their reconstructor or their hash needs it (:class:`StateBytesHandler`;
  :mod:`torch_arena._codec.ownership` tells the two apart).
* numpy arrays: a view on the pool, a private copy on the ring; any dtype
  numpy can describe without Python objects (structured dtypes keep their
  fields), Fortran order kept, other layouts made C-contiguous.
* torch: handled at the *storage* level, under torch's own tensor pickling, so
  every dtype (bfloat16 too), ``requires_grad``, subclasses such as
  ``Parameter`` and storage sharing between tensors of one item all survive.
* spdl.io packets: duck-typed by class name, bytes from ``__getstate__()``,
  rebuilt with ``deserialize_view`` (pool) or ``deserialize`` (ring).
"""

from __future__ import annotations

import threading
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.storage import TypedStorage, UntypedStorage

__all__ = [
    "BytesHandler",
    "Handler",
    "NumpyHandler",
    "PacketsHandler",
    "PayloadHandler",
    "StateBytesHandler",
    "StorageHandler",
    "INLINE_STORAGE",
    "inline_storage",
    "storage_from_inline",
]


@runtime_checkable
class PayloadHandler(Protocol):
    """Teaches the codec to move one family of objects through an arena.

    ``kind`` must be unique; the process that restores must have the same
    handler registered as the one that offloads (register it at import time
    of the module that defines your type, so spawn workers get it too).
    """

    kind: str

    def matches(self, obj: object, threshold: int) -> bool:
        """Whether to offload ``obj`` (only called for objects of at least some size)."""
        ...

    def get_buffer(self, obj: object) -> tuple[Any, Any]:
        """``(contiguous bytes-like or uint8 ndarray, picklable hashable meta)``, no copy."""
        ...

    def from_buffer(self, buf: memoryview, meta: Any, zero_copy: bool) -> object:
        """Rebuild the object. With ``zero_copy`` the buffer is live shared memory
        (keep views of it); otherwise it is already a private copy."""
        ...


class Handler:
    """What the codec asks of every handler: the :class:`PayloadHandler`
    methods, and three hooks with the defaults a user's handler gets."""

    kind: str
    copies_out = False
    """``from_buffer`` copies by itself when ``zero_copy`` is False, so a
    copy-out restore need not hand it a private copy first."""
    wrap: Any = None
    """``wrap(restored, meta)``, for objects that may share their bytes with
    others of the same item: one object is rebuilt per binary and shared, and
    each reference gets ``wrap(shared, its meta)`` (a storage typed as asked).
    None: each reference is rebuilt from its own meta, so two objects over the
    same bytes (an array and a reshape of it) never come back as one."""

    def into_private(self, meta: Any) -> bool:
        """Whether a copy-out restore may put this object in a recycled private
        buffer (it must not own its memory, as ``bytes`` does)."""
        return False

    def matches(self, obj: object, threshold: int) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_buffer(self, obj: Any) -> tuple[Any, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def from_buffer(self, buf: Any, meta: Any, zero_copy: bool) -> object:  # pragma: no cover - abstract
        raise NotImplementedError


def _uint8(buf: Any) -> np.ndarray:
    """A flat uint8 array over a C-contiguous buffer (no copy)."""
    return buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)


class BytesHandler(Handler):
    """bytes, bytearray and memoryview."""

    kind = "bytes"
    copies_out = True

    def matches(self, obj: object, threshold: int) -> bool:
        if isinstance(obj, memoryview):
            return True  # pickle cannot inline a memoryview: it always travels in the arena
        # Exact types: a subclass (numpy.bytes_, a user's) reduces to its class
        # and plain bytes, which then travel as another object's state.
        return type(obj) in (bytes, bytearray) and len(obj) >= threshold  # type: ignore[arg-type]

    def get_buffer(self, obj: Any) -> tuple[Any, Any]:
        if isinstance(obj, memoryview):
            meta = (memoryview, obj.format, tuple(obj.shape or ()))
            src = obj if obj.c_contiguous else memoryview(obj.tobytes())
            return src.cast("B") if src.ndim != 1 or src.format != "B" else src, meta
        return obj, (type(obj), "B", (len(obj),))

    def into_private(self, meta: Any) -> bool:
        """A memoryview can wrap a recycled private buffer; bytes and bytearray
        own their memory, so a copy-out restore copies them anew."""
        return meta[0] is memoryview

    def from_buffer(self, buf: Any, meta: Any, zero_copy: bool) -> object:
        original, fmt, shape = meta
        if not zero_copy and original is bytes:
            return bytes(buf)
        if not zero_copy and original is bytearray:
            return bytearray(buf)
        view = memoryview(buf if zero_copy else bytearray(buf))
        if original is memoryview and (fmt != "B" or len(shape) != 1):
            try:
                return view.cast(fmt, shape)
            except (TypeError, ValueError):
                return view
        return view


class StateBytesHandler(BytesHandler):
    """bytes that another object's reconstructor (or a hash) needs as such.

    Never chosen by :func:`handler_for`: the codec hands it the bytes-likes it
    finds inside other objects' pickled state. They still travel through the
    arena (no copy into the pickle stream, none through the worker queue) and
    come back as their own type, which costs one copy out of the arena: a
    ``bytes`` object cannot point into shared memory.
    """

    kind = "state-bytes"

    def matches(self, obj: object, threshold: int) -> bool:
        return False

    def from_buffer(self, buf: Any, meta: Any, zero_copy: bool) -> object:
        original = meta[0]
        if original is bytes or original is bytearray:
            return original(_uint8(buf))
        return super().from_buffer(buf, meta, zero_copy)  # a memoryview stays one


class NumpyHandler(Handler):
    """numpy.ndarray of any dtype without Python objects."""

    kind = "numpy"
    copies_out = True

    def matches(self, obj: object, threshold: int) -> bool:
        return type(obj) is np.ndarray and obj.nbytes >= threshold and not obj.dtype.hasobject  # type: ignore[attr-defined]

    def get_buffer(self, obj: Any) -> tuple[Any, Any]:
        if obj.flags.c_contiguous:
            order, flat = "C", obj.reshape(-1)
        elif obj.flags.f_contiguous:
            order, flat = "F", obj.ravel(order="F")
        else:
            order, flat = "C", np.ascontiguousarray(obj).reshape(-1)
        return flat.view(np.uint8), (obj.dtype, obj.shape, order)

    def into_private(self, meta: Any) -> bool:
        """A copy-out restore can wrap a recycled private buffer (see _private)."""
        return True

    def from_buffer(self, buf: Any, meta: Any, zero_copy: bool) -> object:
        dtype, shape, order = meta
        flat = _uint8(buf)
        if not zero_copy:
            flat = flat.copy()
        return flat.view(dtype).reshape(shape, order=order)


class StorageHandler(Handler):
    """torch CPU storages, reached through torch's own tensor pickling."""

    kind = "torch"
    copies_out = True

    def matches(self, obj: object, threshold: int) -> bool:
        if type(obj) is TypedStorage:
            untyped = obj._untyped_storage  # type: ignore[attr-defined]
        elif type(obj) is UntypedStorage:
            # Tensors of the dtypes without a typed storage (uint16/32/64, float8,
            # complex32) pickle a bare UntypedStorage, which torch itself cannot
            # unpickle: offload those at any size.
            return obj.device.type == "cpu"
        else:
            return False
        return untyped.device.type == "cpu" and untyped.nbytes() >= threshold

    def get_buffer(self, obj: Any) -> tuple[Any, Any]:
        if type(obj) is TypedStorage:
            untyped, dtype = obj._untyped_storage, obj.dtype
        else:
            untyped, dtype = obj, None
        flat = torch.empty(0, dtype=torch.uint8).set_(untyped)
        return flat.numpy(), dtype

    def into_private(self, meta: Any) -> bool:
        """A copy-out restore can wrap a recycled private buffer (see _private)."""
        return True

    def from_buffer(self, buf: Any, meta: Any, zero_copy: bool) -> object:
        flat = _uint8(buf)
        if zero_copy:
            untyped = torch.from_numpy(flat).untyped_storage()
        else:
            private = torch.empty(flat.nbytes, dtype=torch.uint8)
            private.numpy()[...] = flat
            untyped = private.untyped_storage()
        return untyped

    @staticmethod
    def rebuild_tensor_v3(storage: Any, *args: Any) -> object:
        """torch's ``_rebuild_tensor_v3``, which expects the storage it is given to
        have ``_untyped_storage``; what comes back from the arena for the dtypes
        without a typed storage is a plain UntypedStorage."""
        if isinstance(storage, UntypedStorage):
            storage = TypedStorage(wrap_storage=storage, dtype=torch.uint8, _internal=True)
        return torch._utils._rebuild_tensor_v3(storage, *args)

    @staticmethod
    def rebuild_tensor_v2(
        storage: Any,
        storage_offset: int,
        size: Any,
        stride: Any,
        requires_grad: bool,
        backward_hooks: Any,
        metadata: Any = None,
    ) -> object:
        """torch's ``_rebuild_tensor_v2`` for the storages the arena hands back.

        Same result, minus torch's fake-tensor-mode probe, which walks the
        pytree machinery on every call (about half of a restore's time) and
        only matters for tensors pickled from a fake device, which never
        reach an arena.
        """
        untyped = storage._untyped_storage
        tensor = torch.empty((0,), dtype=storage.dtype, device=untyped.device)
        tensor.set_(untyped, storage_offset, size, stride)
        tensor.requires_grad = requires_grad
        if metadata:
            torch._utils.set_tensor_metadata(tensor, metadata)
        tensor._backward_hooks = backward_hooks
        return tensor

    @staticmethod
    def wrap(untyped: Any, meta: Any) -> object:
        """The storage type torch's pickling asked for (typed or untyped)."""
        if meta is None:
            return untyped
        return TypedStorage(wrap_storage=untyped, dtype=meta, _internal=True)


class PacketsHandler(Handler):
    """spdl.io Audio/Video/ImagePackets, without importing spdl."""

    kind = "packets"
    copies_out = True
    _NAMES = frozenset(("AudioPackets", "VideoPackets", "ImagePackets"))

    def __init__(self) -> None:
        self._serialized = threading.local()

    def matches(self, obj: object, threshold: int) -> bool:
        cls = type(obj)
        if cls.__name__ not in self._NAMES or not hasattr(cls, "deserialize_view"):
            return False
        data = obj.__getstate__()  # type: ignore[attr-defined]
        if not isinstance(data, (bytes, bytearray)) or len(data) < threshold:
            return False
        self._serialized.last = (id(obj), data)  # reused by get_buffer just below
        return True

    def get_buffer(self, obj: Any) -> tuple[Any, Any]:
        last = getattr(self._serialized, "last", None)
        self._serialized.last = None
        data = last[1] if last is not None and last[0] == id(obj) else obj.__getstate__()
        return data, type(obj)

    def from_buffer(self, buf: Any, meta: Any, zero_copy: bool) -> object:
        if zero_copy:
            return meta.deserialize_view(memoryview(buf))
        return meta.deserialize(bytes(buf))


#: Reference kind of a small CPU storage carried inline in the envelope.
INLINE_STORAGE = "torch-inline"


def inline_storage(obj: object) -> tuple[int, Any] | None:
    """``(address, meta)`` for a CPU ``TypedStorage`` below the threshold, else None.

    torch pickles a storage through ``torch.save`` into a zip archive and back
    through ``torch.load``: about 0.4 ms for a 2 KiB label tensor, most of a
    batch's restore. Its raw bytes inline in the envelope cost one small copy.
    """
    if type(obj) is not TypedStorage:
        return None
    untyped = obj._untyped_storage  # type: ignore[attr-defined]
    if untyped.device.type != "cpu":
        return None
    raw = torch.empty(0, dtype=torch.uint8).set_(untyped).numpy().tobytes()
    return untyped.data_ptr(), (obj.dtype, raw)


def storage_from_inline(meta: Any) -> object:
    """The private ``TypedStorage`` an :func:`inline_storage` reference describes."""
    dtype, raw = meta
    if not isinstance(dtype, torch.dtype) or not isinstance(raw, (bytes, bytearray)):
        raise ValueError(f"corrupt envelope: bad inline storage {type(dtype).__name__}/{type(raw).__name__}")
    flat = torch.empty(len(raw), dtype=torch.uint8)
    if raw:
        flat.numpy()[...] = np.frombuffer(raw, dtype=np.uint8)
    return TypedStorage(wrap_storage=flat.untyped_storage(), dtype=dtype, _internal=True)
