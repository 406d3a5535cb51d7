"""What failed when an intact envelope could not be restored.

An envelope carries a checksum, so once it matches, the stream is exactly
what :func:`torch_arena.offload` wrote: an exception while unpickling it is an
object's own reconstruction failing in this process (a class that changed or
cannot be imported here, a ``__setstate__`` that raises, a user handler's
``from_buffer``), not corruption. :class:`~torch_arena.RestoreError` says which object,
which backend and which threshold. The C unpickler does not say which step
raised, so the failing load is replayed once with pickle's Python unpickler,
whose steps can be watched.
"""

from __future__ import annotations

import pickle
from typing import Any

__all__ = ["TracingUnpickler", "failure_message"]


class StepFailed(Exception):
    """Raised by :class:`TracingUnpickler`: ``args[0]`` names what was being rebuilt."""


def _name(obj: Any) -> str:
    if isinstance(obj, type) or callable(obj):
        module = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
        return f"{module}.{qualname}" if module and module != "builtins" else str(qualname)
    return type(obj).__name__


def _describe_call(func: Any, args: Any) -> str:
    """``func(*args)`` rebuilds an object: name its class, and how."""
    if isinstance(func, type):
        return _name(func)
    first = args[0] if isinstance(args, tuple) and args else None
    if isinstance(first, type):
        return f"{_name(first)} (rebuilt by {_name(func)})"
    return f"an object made by {_name(func)}"


def _container(self: Any) -> str:
    """The container under the topmost mark (SETITEMS, APPENDS, ADDITEMS)."""
    meta = self.metastack[-1] if self.metastack else []
    return f"the items of a {_name(type(meta[-1]))}" if meta else "a container"


_TARGETS: dict[bytes, Any] = {
    pickle.REDUCE: lambda self: _describe_call(self.stack[-2], self.stack[-1]),
    pickle.NEWOBJ: lambda self: _name(self.stack[-2]),
    pickle.NEWOBJ_EX: lambda self: _name(self.stack[-3]),
    pickle.BUILD: lambda self: f"the state of a {_name(type(self.stack[-2]))}",
    pickle.SETITEM: lambda self: f"an item of a {_name(type(self.stack[-3]))}",
    pickle.SETITEMS: _container,
    pickle.APPEND: lambda self: f"an item of a {_name(type(self.stack[-2]))}",
    pickle.APPENDS: _container,
    pickle.ADDITEMS: _container,
    pickle.FROZENSET: lambda self: "a frozenset",
    pickle.STACK_GLOBAL: lambda self: f"{self.stack[-2]}.{self.stack[-1]}",
}


def _traced(opcode: bytes, step: Any) -> Any:
    target = _TARGETS.get(opcode)

    def run(self: Any) -> None:
        try:
            what = target(self) if target is not None else None
        except Exception:  # noqa: BLE001 - a description must never hide the failure
            what = None
        try:
            step(self)
        except StepFailed:
            raise
        except Exception as exc:
            raise StepFailed(what or f"the pickle step {opcode!r}") from exc

    return run


class TracingUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """pickle's Python unpickler, raising :class:`StepFailed` naming what it was rebuilding."""

    dispatch = {
        key: _traced(bytes([key]), step)
        for key, step in pickle._Unpickler.dispatch.items()  # type: ignore[attr-defined]
    }


def failure_message(what: str | None, exc: BaseException, backend: str, threshold: int) -> str:
    """The text of a :class:`~torch_arena.RestoreError`."""
    at = f"threshold {threshold}" if threshold >= 0 else "threshold unknown"
    return (
        f"torch_arena: could not rebuild {what or 'an object of the batch'} restored from {backend} "
        f"({at}): {type(exc).__name__}: {exc}. The envelope is intact: this is that object's own "
        "unpickling failing in this process. Check that pickle.loads(pickle.dumps(obj)) works for it "
        "here; if it does, offload with a threshold above its largest buffer to keep it inline, and "
        "report the type to torch_arena."
    )
