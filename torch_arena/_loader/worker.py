"""The worker side: collate a batch into the arena and send a small envelope.

:class:`ArenaCollate` replaces the loader's collate function inside each
worker (torch pickles exactly what the collate function returns). It opens a
unit, collates (straight into the unit for ``default_collate``; otherwise
runs the user's function and lets the codec copy the result in once),
commits, and returns an :class:`ArenaBatch` of ~100 bytes. Unpickling that
object in the training process restores the batch (:mod:`torch_arena._loader.session`).

When a batch cannot go through the arena (it is larger than a segment, the
ring is full, or every segment is held by the training loop past the
timeout) it either raises, or falls back to torch's own transport: the batch
is wrapped in a :class:`FallbackBatch`, pickled by torch's reducers as
usual, and counted in the training process.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch._C import _error_if_any_worker_fails
from torch._utils import ExceptionWrapper
from torch.utils.data._utils.collate import default_collate

from torch_arena._arena.base import ArenaSpaceTimeout
from torch_arena._codec.codec import offload_open_unit, pack_envelope
from torch_arena._arena.elastic import SharedMemoryElasticPool
from torch_arena._loader.collate import arena_default_collate, collating_into
from torch_arena._os.sizes import format_bytes
from torch_arena._loader.session import describe_arena, session_for
from torch_arena._os.sync import current_pid

__all__ = ["ArenaBatch", "ArenaCollate", "FallbackBatch"]


_RESTORE_WHERE = "in the training process, restoring a batch from the arena"


def _failed_restore() -> ExceptionWrapper:
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
        return _failed_restore()


def _receive_fallback(token: int, batch: Any, reason: str, wait_seconds: float) -> Any:
    try:
        return session_for(token).receive_fallback(batch, reason, wait_seconds)
    except Exception:  # noqa: BLE001 - re-raised for this batch by torch
        return _failed_restore()


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


def payload_bytes(obj: Any) -> int:
    """Bytes of tensors, arrays and bytes-likes in a (nested) batch, for messages."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, memoryview):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 0


class ArenaCollate:
    """Collate function run in each worker: batch into the arena, envelope out.

    Holds no reference to the loader or its iterator (a cycle there would
    delay worker shutdown until the garbage collector runs).
    """

    def __init__(
        self,
        collate_fn: Callable[[Any], Any],
        arena: Any,
        *,
        threshold: int,
        overflow: str,
        timeout: float,
        slots_hint: int,
    ) -> None:
        self.collate_fn = collate_fn
        self.arena = arena
        self.threshold = threshold
        self.overflow = overflow
        self.timeout = timeout
        self.slots_hint = slots_hint
        self._into_arena = collate_fn is default_collate
        self._writer: Any = None
        self._writer_pid = -1
        self._next_timeout = timeout

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_writer"], state["_writer_pid"] = None, -1
        return state

    def _open_writer(self) -> Any:
        if self._writer is None or self._writer_pid != current_pid():
            self._writer = self.arena.open_writer()
            self._writer_pid = current_pid()
        return self._writer

    def __call__(self, data: Any) -> Any:
        writer = self._open_writer()
        token = writer.token
        started = time.monotonic()
        try:
            writer.begin_unit(timeout=self._next_timeout)
        except BufferError as exc:
            self._next_timeout = 0.0
            return self._fall_back(data, None, exc, time.monotonic() - started)
        batch = None
        try:
            if self._into_arena:
                with collating_into(writer, self.threshold):
                    batch = arena_default_collate(data)
            else:
                batch = self.collate_fn(data)
            body, nbytes = offload_open_unit(batch, writer, self.threshold)
            span = writer.commit_unit()
        except (BufferError, MemoryError) as exc:
            writer.reset()
            if isinstance(exc, ArenaSpaceTimeout):
                # The arena is full of batches the loop keeps: wait no more until
                # one fits again, so the loop does not pay the timeout per batch.
                self._next_timeout = 0.0
            if self._into_arena:
                batch = None  # its tensors pointed into the aborted unit
            return self._fall_back(data, batch, exc, writer.last_wait_seconds)
        except BaseException:
            writer.reset()
            raise
        self._next_timeout = self.timeout
        return ArenaBatch(token, pack_envelope(token, span, body, self.threshold), nbytes, writer.last_wait_seconds)

    def _advice(self, exc: BaseException, need: int) -> str:
        """What to change, in the loader's own terms where the loader made the arena."""
        arena, slots = self.arena, self.slots_hint
        elastic = isinstance(arena, SharedMemoryElasticPool)
        if isinstance(exc, MemoryError):
            return (
                "; the kernel refused more shared memory: free memory, lower num_workers or "
                "prefetch_factor, or set a smaller arena_budget"
            )
        if isinstance(exc, ArenaSpaceTimeout) and elastic:
            return (
                f"; the arena is at its budget (arena_budget={format_bytes(arena.max_bytes)}) with "
                "batches in flight or still alive in the training loop, and none was released "
                f"within arena_timeout={self.timeout:g} s: keep fewer batches alive (copy what you "
                f"keep with .clone()), raise arena_budget (e.g. arena_budget='"
                f"{-(-2 * arena.max_bytes // (1 << 20))}MiB'), or raise arena_timeout"
            )
        if isinstance(exc, ArenaSpaceTimeout):
            return (
                "; the training loop keeps batches alive (or the pool has fewer segments than "
                f"the {slots} batches torch keeps in flight), so keep fewer of them (or "
                "copy what you keep), or pass a pool with a segment for each: "
                f"arena=SharedMemorySegmentPool(segment_size={need + (64 << 10)}, "
                f"count={slots} + batches kept), or arena='pool' (an elastic pool)"
            )
        return (
            f"; give it room for every batch in flight, e.g. arena_budget >= "
            f"{format_bytes(need * slots)} ({slots} × the batch)"
        )

    def _fall_back(self, data: Any, batch: Any, exc: BaseException, waited: float) -> Any:
        if batch is None:
            batch = self.collate_fn(data)
        need = payload_bytes(batch)
        reason = (
            f"{str(exc).rstrip('.')}. The batch holds {format_bytes(need)}; the loader's arena is "
            f"{describe_arena(self.arena)}"
        )
        advice = self._advice(exc, need)
        if self.overflow == "raise":
            raise BufferError(
                f"torch_arena: batch did not fit the arena: {reason}{advice}, or pass "
                "arena_overflow='fallback' to send such batches through torch's default path"
            )
        return FallbackBatch(self._writer.token, batch, reason + advice, waited)
