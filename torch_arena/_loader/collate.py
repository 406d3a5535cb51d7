"""default_collate that stacks straight into the arena.

torch's ``default_collate`` stacks a batch's tensors with
``torch.stack(batch, 0, out=out)`` where, in a worker, ``out`` is a fresh
shared-memory storage (a new segment, zero-filled and page-faulted for every
batch). Here ``out`` is a view over the unit being written in the arena:
recycled, already-faulted memory. The batch is then written exactly once, by
the collate itself, and the codec finds its storage already in the unit and
copies nothing.

Everything else is torch's own collate machinery (``collate`` with a
``collate_fn_map``), so batch structure, types and error messages are the
stock ones. Small tensors (below the offload threshold) are stacked into
ordinary memory: they travel inline in the envelope.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data._utils.collate import collate, collate_tensor_fn, default_collate_fn_map

__all__ = ["arena_default_collate", "collating_into"]

_current = threading.local()


@contextlib.contextmanager
def collating_into(writer: Any, threshold: int) -> Iterator[None]:
    """Within the block, :func:`arena_default_collate` stacks into ``writer``'s open unit."""
    _current.writer, _current.threshold = writer, threshold
    try:
        yield
    finally:
        _current.writer = None


def _collate_tensor_into_unit(batch: Any, *, collate_fn_map: Any = None) -> torch.Tensor:
    writer = getattr(_current, "writer", None)
    elem = batch[0]
    if (
        writer is None
        or not writer.direct
        or elem.layout is not torch.strided
        or elem.is_nested
        or elem.device.type != "cpu"
        or elem.is_quantized
    ):
        return collate_tensor_fn(batch, collate_fn_map=collate_fn_map)
    shape = (len(batch), *elem.shape)
    nbytes = math.prod(shape) * elem.element_size()
    if nbytes < _current.threshold:
        return torch.stack(batch, 0)
    _, view = writer.allocate(nbytes)
    out = torch.from_numpy(view).view(elem.dtype).view(shape)
    return torch.stack(batch, 0, out=out)


_ARENA_COLLATE_FN_MAP = {**default_collate_fn_map, torch.Tensor: _collate_tensor_into_unit}


def arena_default_collate(batch: Any) -> Any:
    """``default_collate``, with large tensors stacked into the open arena unit."""
    return collate(batch, collate_fn_map=_ARENA_COLLATE_FN_MAP)
