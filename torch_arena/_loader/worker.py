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

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data._utils.collate import default_collate

from torch_arena._arena.protocol import Arena, ArenaWriter
from torch_arena._codec.envelope import pack_envelope
from torch_arena._codec.offload import offload_open_unit
from torch_arena._loader.collate import arena_default_collate, collating_into
from torch_arena._loader.settings import ArenaSettings
from torch_arena._loader.wire import ArenaBatch, FallbackBatch
from torch_arena._os.sizes import format_bytes
from torch_arena._os.sync import current_pid
from torch_arena.errors import ArenaSpaceTimeout

__all__ = ["ArenaCollate", "payload_bytes"]


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

    def __init__(self, collate_fn: Callable[[Any], Any], arena: Arena, settings: ArenaSettings, slots: int) -> None:
        self.collate_fn = collate_fn
        self.arena = arena
        self.settings = settings
        self.slots = slots
        self._into_arena = collate_fn is default_collate
        self._writer: ArenaWriter | None = None
        self._writer_pid = -1
        self._next_timeout = settings.timeout

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_writer"], state["_writer_pid"] = None, -1
        return state

    def _open_writer(self) -> ArenaWriter:
        if self._writer is None or self._writer_pid != current_pid():
            self._writer = self.arena.open_writer()
            self._writer_pid = current_pid()
        return self._writer

    def __call__(self, data: Any) -> Any:
        writer = self._open_writer()
        threshold = self.settings.threshold
        started = time.monotonic()
        try:
            writer.begin_unit(timeout=self._next_timeout)  # a pool's segment is waited for here
        except (BufferError, MemoryError) as exc:
            if isinstance(exc, ArenaSpaceTimeout):
                self._next_timeout = 0.0
            return self._fall_back(data, None, exc, time.monotonic() - started)
        batch = None
        try:
            if self._into_arena:
                with collating_into(writer, threshold):
                    batch = arena_default_collate(data)
            else:
                batch = self.collate_fn(data)
            body, nbytes = offload_open_unit(batch, writer, threshold)
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
        self._next_timeout = self.settings.timeout
        token = writer.token
        return ArenaBatch(token, pack_envelope(token, span, body, threshold), nbytes, writer.last_wait_seconds)

    def _fall_back(self, data: Any, batch: Any, exc: BaseException, waited: float) -> Any:
        if batch is None:
            batch = self.collate_fn(data)
        need = payload_bytes(batch)
        reason = (
            f"{str(exc).rstrip('.')}. The batch holds {format_bytes(need)}; the loader's arena is "
            f"{self.arena.describe()}; {self.arena.advice(exc, need, self.slots)}"
        )
        if self.settings.overflow == "raise":
            raise BufferError(
                f"torch_arena: batch did not fit the arena: {reason}, or pass "
                "arena_overflow='fallback' to send such batches through torch's default path"
            )
        return FallbackBatch(self.arena.token, batch, reason, waited)
