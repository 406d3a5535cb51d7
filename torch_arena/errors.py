"""Every exception and warning torch_arena raises on purpose, in one place.

All are importable from :mod:`torch_arena` as well. Errors about bad input
(a setting of the wrong type, a corrupt envelope) are plain ``ValueError`` /
``TypeError`` whose message says what was wrong and what to change.
"""

from __future__ import annotations

__all__ = [
    "ArenaDroppedWarning",
    "ArenaFallbackWarning",
    "ArenaSpaceTimeout",
    "ArenaUnitTooLarge",
    "RestoreError",
]


class ArenaSpaceTimeout(BufferError):
    """A producer waited its whole timeout for arena space that never came.

    Raised by every backend (a non-blocking ring waits zero seconds); the
    message says how full the arena was and what to change. A loader that
    sees it stops waiting for space until a batch fits again, so a training
    loop that keeps its batches does not pay the timeout for every batch.
    """


class ArenaUnitTooLarge(BufferError):
    """A unit (an item, a batch) is larger than the arena could ever hold: a
    fixed pool's segment, a ring's capacity or an elastic arena's cap.
    Waiting cannot help; the message names the size to raise."""


class RestoreError(Exception):
    """An intact envelope whose object could not be rebuilt in this process.

    The message names the object's type, the arena backend and the threshold
    the batch was offloaded with; the reconstructor's own exception is the
    ``__cause__``.
    """


class ArenaFallbackWarning(UserWarning):
    """A batch travelled through torch's default path instead of the arena."""


class ArenaDroppedWarning(UserWarning):
    """A framework rebuilt an arena loader as a plain loader, so its batches
    would no longer go through the arena."""
