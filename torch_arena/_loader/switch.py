"""The switch: every DataLoader of the process through an arena, with no code changed.

``TORCH_ARENA=pool`` in the environment (read when the interpreter starts, see
:mod:`torch_arena._startup`) or :func:`enable` in code turns it on. From then
on, a DataLoader whose first multi-process iterator starts while the switch
is on adopts the switch's settings and sends its batches through an arena
exactly as :class:`~torch_arena.ArenaDataLoader` does (same settings, same
fallback, ``loader.arena_stats``): torch's ``DataLoader`` and its subclasses
that keep torch's iterator, and torchdata's ``StatefulDataLoader``, so also
the loaders that HF Accelerate, the HF Trainer and Lightning build. A loader
with arena settings of its own (an ``ArenaDataLoader``, ``arena=None``
included) keeps them; a loader keeps what it adopted for its later iterators.

:func:`enable` and :func:`disable` return an object that, used as a context
manager, puts the switch back as it was on exit::

    with torch_arena.enable("pool", arena_budget="4GiB"):
        trainer.fit(model, datamodule)
"""

from __future__ import annotations

from typing import Any

from torch_arena._codec.envelope import DEFAULT_THRESHOLD
from torch_arena._loader import hooks
from torch_arena._loader.settings import DEFAULT_ARENA_TIMEOUT_S, ArenaSettings

__all__ = ["Switched", "disable", "enable", "enabled", "source"]

_source = ""


class Switched:
    """What :func:`enable` and :func:`disable` return: a context manager that
    restores the switch as it was before the call."""

    def __init__(self, previous: tuple[ArenaSettings | None, str]) -> None:
        self._previous = previous

    def __enter__(self) -> ArenaSettings | None:
        return enabled()

    def __exit__(self, *exc_info: object) -> None:
        _set(*self._previous)


def _set(settings: ArenaSettings | None, where: str) -> Switched:
    global _source
    previous = Switched((hooks._default, _source))
    hooks.set_default(settings)
    _source = where if settings is not None else ""
    return previous


def enable(
    arena: Any = "pool",
    *,
    arena_budget: int | float | str | None = None,
    arena_overflow: str = "fallback",
    arena_timeout: float = DEFAULT_ARENA_TIMEOUT_S,
    arena_threshold: int = DEFAULT_THRESHOLD,
    _where: str = "torch_arena.enable",
) -> Switched:
    """Send the batches of every DataLoader of this process through an arena.

    Takes :class:`~torch_arena.ArenaDataLoader`'s arena arguments (``arena``
    ``"pool"`` or ``"ring"``; ``"none"`` or None turns the switch off); every
    loader that adopts them gets an arena of its own. Returns a
    :class:`Switched` (a context manager that puts the switch back on exit).
    """
    settings = ArenaSettings.from_arguments(
        arena, arena_budget, arena_overflow, arena_timeout, arena_threshold, where=_where, allow_instance=False
    )
    return _set(settings if settings.enabled else None, _where)


def disable() -> Switched:
    """Loaders that have not started an iterator yet stay stock; those that
    adopted settings keep them."""
    return _set(None, "")


def enabled() -> ArenaSettings | None:
    """The switch's settings, or None when it is off."""
    return hooks._default


def source() -> str:
    """Who turned the switch on (``"TORCH_ARENA"`` or ``"torch_arena.enable"``), or ``""``."""
    return _source
