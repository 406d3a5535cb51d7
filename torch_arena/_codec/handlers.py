"""The registry of payload handlers: torch_arena's own, and the ones users register.

The codec asks :func:`handler_for` which handler claims an object being
offloaded (the user's first, so they can take over a built-in type), and
:func:`handler_of_kind` which one rebuilds a reference being restored. A
user's handler is registered as a :class:`~torch_arena._codec.payloads.Handler`
with the default hooks, so the codec reads every hook directly.
"""

from __future__ import annotations

from typing import Any

from torch_arena._codec.payloads import (
    BytesHandler,
    Handler,
    NumpyHandler,
    PacketsHandler,
    PayloadHandler,
    StateBytesHandler,
    StorageHandler,
)

__all__ = ["BYTES", "STATE_BYTES", "handler_for", "handler_of_kind", "is_builtin", "register_handler", "unregister_handler"]


class _UserHandler(Handler):
    """A registered :class:`PayloadHandler` with the default hooks."""

    def __init__(self, handler: PayloadHandler) -> None:
        self.handler = handler
        self.kind = handler.kind
        self.matches = handler.matches  # type: ignore[method-assign]
        self.get_buffer = handler.get_buffer  # type: ignore[method-assign]
        self.from_buffer = handler.from_buffer  # type: ignore[method-assign]


BYTES = BytesHandler()
STATE_BYTES = StateBytesHandler()
_BUILTIN: tuple[Handler, ...] = (StorageHandler(), NumpyHandler(), BYTES, PacketsHandler())
_user_handlers: list[Handler] = []
_by_kind: dict[str, Handler] = {h.kind: h for h in (*_BUILTIN, STATE_BYTES)}
_order: tuple[Handler, ...] = _BUILTIN


def register_handler(handler: PayloadHandler) -> None:
    """Route objects ``handler`` matches through arenas (tried before the built-ins).

    Raises ValueError if ``handler`` lacks the :class:`PayloadHandler` methods
    or its ``kind`` is already taken.
    """
    global _order
    if not isinstance(handler, PayloadHandler) or not isinstance(getattr(handler, "kind", None), str):
        raise ValueError(
            f"{handler!r} is not a payload handler: it needs a str 'kind' and the methods "
            "matches(obj, threshold), get_buffer(obj) and from_buffer(buf, meta, zero_copy)"
        )
    if handler.kind in _by_kind:
        raise ValueError(f"a payload handler of kind {handler.kind!r} is already registered")
    registered = _UserHandler(handler)
    _user_handlers.insert(0, registered)
    _by_kind[handler.kind] = registered
    _order = (*_user_handlers, *_BUILTIN)


def unregister_handler(kind: str) -> None:
    """Remove the user handler registered under ``kind`` (built-ins stay)."""
    global _order
    handler = _by_kind.get(kind)
    if handler is None or handler in _BUILTIN or handler is STATE_BYTES:
        raise ValueError(f"no user payload handler of kind {kind!r} is registered")
    _user_handlers.remove(handler)
    del _by_kind[kind]
    _order = (*_user_handlers, *_BUILTIN)


def handler_for(obj: object, threshold: int) -> Any:
    """The first handler (user ones first) that wants ``obj``, else None."""
    for handler in _order:
        if handler.matches(obj, threshold):
            return handler
    return None


def handler_of_kind(kind: str) -> Any:
    """The handler registered under ``kind``; ValueError names the fix if missing."""
    try:
        return _by_kind[kind]
    except (KeyError, TypeError):
        raise ValueError(
            f"the envelope needs a payload handler of kind {kind!r}, which is not registered "
            "in this process; call torch_arena.register_handler() here too (at import time)"
        ) from None


def is_builtin(handler: Any) -> bool:
    """Whether ``handler`` is one of torch_arena's own (whose failures mean a bad reference)."""
    return handler in _BUILTIN or handler is STATE_BYTES
