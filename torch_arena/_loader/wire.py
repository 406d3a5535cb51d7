"""What crosses the worker queue for a batch, and what unpickling it does in the training process.

:class:`ArenaBatch` (~100 bytes: the arena's token and the envelope) and
:class:`FallbackBatch` (a batch that took torch's path, tagged so it is
counted) are made in a worker by :class:`~torch_arena._loader.worker.ArenaCollate`.
Their ``__reduce__`` names a function of this module, so unpickling them in
the training process, in whichever thread reads torch's queue, restores the
batch through the loader's session (:mod:`torch_arena._loader.session`).
"""

from __future__ import annotations

import sys
from typing import Any

from torch._C import _error_if_any_worker_fails
from torch._utils import ExceptionWrapper

from torch_arena._loader.session import session_for

__all__ = ["ArenaBatch", "FallbackBatch", "failed_restore"]


_RESTORE_WHERE = "in the training process, restoring a batch from the arena"


def failed_restore() -> ExceptionWrapper:
    """The current exception, to be raised by torch for this batch.

    Runs inside torch's queue read. An exception escaping from there would lose
    the batch: torch would re-raise it once, then wait forever for that batch
    index. As an ExceptionWrapper it is raised for this batch with its type and
    message, and iteration can go on, as with a worker exception. One exception
    must escape, though: torch's SIGCHLD handler raises "DataLoader worker …
    is killed by signal" wherever the main thread happens to be, here too, and
    torch's own queue-read error handling must see it.
    """
    cause = sys.exc_info()[1]
    while cause is not None:
        if isinstance(cause, RuntimeError) and str(cause).startswith("DataLoader worker"):
            raise cause  # the restore was only where the main thread happened to be
        cause = cause.__cause__ or cause.__context__
    _error_if_any_worker_fails()
    return ExceptionWrapper(where=_RESTORE_WHERE)


def _receive_batch(token: int, envelope: bytes, nbytes: int, wait_seconds: float) -> Any:
    try:
        return session_for(token).receive(envelope, nbytes, wait_seconds)
    except Exception:  # noqa: BLE001 - re-raised for this batch by torch
        return failed_restore()


def _receive_fallback(token: int, batch: Any, reason: str, wait_seconds: float) -> Any:
    try:
        return session_for(token).receive_fallback(batch, reason, wait_seconds)
    except Exception:  # noqa: BLE001 - re-raised for this batch by torch
        return failed_restore()


class ArenaBatch:
    """What crosses the worker queue for a batch in the arena."""

    __slots__ = ("token", "envelope", "nbytes", "wait_seconds")

    def __init__(self, token: int, envelope: bytes, nbytes: int, wait_seconds: float) -> None:
        self.token, self.envelope, self.nbytes, self.wait_seconds = token, envelope, nbytes, wait_seconds

    def __reduce__(self) -> tuple[Any, ...]:
        return (_receive_batch, (self.token, self.envelope, self.nbytes, self.wait_seconds))


class FallbackBatch:
    """A batch sent by torch's default path, tagged so the consumer counts it."""

    __slots__ = ("token", "batch", "reason", "wait_seconds")

    def __init__(self, token: int, batch: Any, reason: str, wait_seconds: float) -> None:
        self.token, self.batch, self.reason, self.wait_seconds = token, batch, reason, wait_seconds

    def __reduce__(self) -> tuple[Any, ...]:
        return (_receive_fallback, (self.token, self.batch, self.reason, self.wait_seconds))
