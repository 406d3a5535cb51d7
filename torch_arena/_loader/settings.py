"""The one settings object every integration validates through.

:class:`ArenaSettings` holds how a loader's batches travel: which arena, its
budget, what to do with a batch that does not fit, how long a worker waits for
space, and which leaves go through the arena. ``ArenaDataLoader``,
``ArenaStatefulDataLoader``, the Lightning mixin and ``torch_arena.accelerate``
all build one from their arguments (:meth:`ArenaSettings.from_arguments`),
and the ``TORCH_ARENA`` variable from its text, so a setting means the same
thing and fails with the same message everywhere. The module imports nothing
heavy: the interpreter's start-up hook validates ``TORCH_ARENA`` with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from torch_arena._codec.envelope import DEFAULT_THRESHOLD
from torch_arena._os.sizes import parse_bytes

__all__ = ["ARENA_NAMES", "ArenaName", "ArenaSettings", "DEFAULT_ARENA_TIMEOUT_S", "OVERFLOW_MODES", "SETTING_NAMES"]

#: The arenas a loader makes by name (see :mod:`torch_arena._arena.factory`).
ARENA_NAMES = ("pool", "ring")
ArenaName = Literal["pool", "ring", "none"]
"""The arenas a loader makes by name; ``"none"`` is torch's stock transport."""
#: Seconds a worker waits for arena space before the batch falls back (or
#: raises): short, because a full arena means the training loop keeps
#: batches, and waiting longer only delays the batch.
DEFAULT_ARENA_TIMEOUT_S = 2.0
OVERFLOW_MODES = ("fallback", "raise")
#: The loader keyword arguments, in :class:`ArenaSettings` field order.
SETTING_NAMES = ("arena", "arena_budget", "arena_overflow", "arena_timeout", "arena_threshold")


@dataclasses.dataclass(frozen=True)
class ArenaSettings:
    """How a loader's batches travel (validated when made).

    Attributes:
        arena: ``"pool"`` (an elastic pool, zero-copy views), ``"ring"``
            (elastic, private copies), an arena instance the user owns, or
            None for torch's stock transport (``"none"`` is accepted as None).
        budget: The most memory an arena the loader makes may commit, in bytes
            (None: half of the memory available when it is made).
        overflow: ``"fallback"``: a batch that does not fit travels by torch's
            path (one warning, counted); ``"raise"``: a BufferError.
        timeout: Seconds a worker waits for space before that.
        threshold: Leaves smaller than this many bytes travel inline.
    """

    arena: Any = "pool"
    budget: int | None = None
    overflow: str = "fallback"
    timeout: float = DEFAULT_ARENA_TIMEOUT_S
    threshold: int = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # frozen: normalised once, here
        set_field(self, "arena", _arena_value(self.arena, allow_instance=True))
        if self.budget is not None:
            set_field(self, "budget", parse_bytes(self.budget, "arena_budget"))
        if self.overflow not in OVERFLOW_MODES:
            raise ValueError(f"arena_overflow must be 'fallback' or 'raise', got {self.overflow!r}")
        timeout = self.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ValueError(f"arena_timeout must be a number of seconds >= 0, got {timeout!r}")
        set_field(self, "timeout", float(timeout))
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise ValueError(f"arena_threshold must be an int >= 0, got {threshold!r}")

    @classmethod
    def from_arguments(
        cls,
        arena: Any = "pool",
        arena_budget: Any = None,
        arena_overflow: str = "fallback",
        arena_timeout: float = DEFAULT_ARENA_TIMEOUT_S,
        arena_threshold: int = DEFAULT_THRESHOLD,
        *,
        where: str = "",
        allow_instance: bool = True,
    ) -> "ArenaSettings":
        """Settings from the loader arguments (their names, or in that order).
        Errors start with ``where`` (the class or function the user called)
        when given; ``allow_instance``: whether an arena instance is accepted."""
        try:
            _arena_value(arena, allow_instance=allow_instance)
            return cls(arena, arena_budget, arena_overflow, arena_timeout, arena_threshold)
        except ValueError as exc:
            if not where:
                raise
            raise ValueError(f"{where}: {exc}") from None

    def as_kwargs(self) -> dict[str, Any]:
        """The loader keyword arguments that give these settings."""
        return dict(zip(SETTING_NAMES, (self.arena, self.budget, self.overflow, self.timeout, self.threshold)))

    @property
    def enabled(self) -> bool:
        """Whether batches go through an arena (not torch's stock transport)."""
        return self.arena is not None


def _arena_value(arena: Any, *, allow_instance: bool) -> Any:
    """``arena`` as a setting: a name, an arena instance, or None for stock."""
    if arena is None or (isinstance(arena, str) and arena == "none"):
        return None
    if isinstance(arena, str) and arena in ARENA_NAMES:
        return arena
    if allow_instance and not isinstance(arena, str):
        from torch_arena._arena.protocol import Arena  # here: the name check above must stay light

        if isinstance(arena, Arena):
            return arena
    if allow_instance:
        extra = ", or a torch_arena arena instance such as SharedMemorySegmentPool(...)"
    elif not isinstance(arena, str):
        extra = " (an arena instance cannot be shared here: each loader needs its own)"
    else:
        extra = ""
    raise ValueError(f"arena must be 'pool', 'ring', 'none' or None (torch's stock transport){extra}; got {arena!r}")
