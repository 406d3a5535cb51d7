"""Endpoints of any arena, as the codec uses them.

The codec works on :class:`~torch_arena._arena.protocol.ArenaWriter` and
:class:`~torch_arena._arena.protocol.ArenaReader`. torch_arena's own endpoints
implement them; an arena that follows only SPDL's protocol (SPDL's own pool or
ring, passed to :func:`torch_arena.offload` / :func:`torch_arena.restore` or
to a loader) is adapted here, once per call: its writer copies each binary in
with ``write_binary``, its reader reads through ``read_binary`` / ``end_unit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from torch_arena._arena.protocol import PROTOCOL, ArenaReader, ArenaUnit, ArenaWriter, is_native

__all__ = ["as_reader", "as_writer"]


class ForeignWriter:
    """An SPDL-protocol writer as an :class:`ArenaWriter` (copies every binary in)."""

    torch_arena_protocol = PROTOCOL
    direct = False
    last_wait_seconds = 0.0

    def __init__(self, writer: Any) -> None:
        self._writer = writer
        self.token = int(getattr(writer, "token", 0))

    def begin_unit(self, timeout: float | None = None) -> None:
        self._writer.begin_unit()

    def allocate(self, nbytes: int) -> tuple[int, np.ndarray]:
        raise TypeError(f"{type(self._writer).__name__} cannot hand out memory to write into; use place()")

    def place(self, src: np.ndarray) -> int:
        offset, _ = self._writer.write_binary(memoryview(src.reshape(-1).view(np.uint8)))
        return int(offset)

    def write_binary(self, data: Any) -> tuple[int, int]:
        return self._writer.write_binary(data)

    def commit_unit(self) -> int:
        return int(self._writer.commit_unit())

    def abort_unit(self) -> None:
        self._writer.abort_unit()

    def reset(self) -> None:
        self._writer.reset()


class ForeignUnit:
    """A unit read through SPDL's reader protocol."""

    def __init__(self, reader: Any, span: int) -> None:
        self._reader, self._span = reader, span
        self.zero_copy = bool(reader.zero_copy)
        self._pinned: list[object] = []

    def view(self, offset: int, nbytes: int) -> Any:
        view = self._reader.read_binary(offset, nbytes)
        if self.zero_copy:
            self._pinned.append(view)
        return view

    @staticmethod
    def private_copy(view: Any) -> np.ndarray:
        return np.array(np.frombuffer(view, dtype=np.uint8), copy=True)

    def finish(self, pinned: Sequence[object] = ()) -> None:
        self._reader.end_unit(self._span, [*self._pinned, *pinned])


class ForeignReader:
    """An SPDL-protocol reader as an :class:`ArenaReader`."""

    torch_arena_protocol = PROTOCOL

    def __init__(self, reader: Any) -> None:
        self._reader = reader
        self.token = int(getattr(reader, "token", 0))
        self.zero_copy = bool(reader.zero_copy)

    def open_unit(self, span: int) -> ArenaUnit:
        return ForeignUnit(self._reader, span)

    def hold_unread(self, span: int, anchor: object) -> None:
        pass  # SPDL's readers have no leases: its units wait for end_unit

    def read_binary(self, offset: int, nbytes: int) -> Any:
        return self._reader.read_binary(offset, nbytes)

    def end_unit(self, span: int, pinned: list[object]) -> None:
        self._reader.end_unit(span, pinned)

    def reset(self) -> None:
        self._reader.reset()

    def describe(self) -> str:
        kind = "zero-copy" if self.zero_copy else "copying"
        return f"a {kind} {type(self._reader).__name__}"


def as_writer(writer: Any) -> ArenaWriter:
    """``writer`` itself if it is torch_arena's, else an adapter."""
    return writer if is_native(writer) else ForeignWriter(writer)  # type: ignore[return-value]


def as_reader(reader: Any) -> ArenaReader:
    """``reader`` itself if it is torch_arena's, else an adapter."""
    return reader if is_native(reader) else ForeignReader(reader)  # type: ignore[return-value]
