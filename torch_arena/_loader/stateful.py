"""Arena iterators for torchdata's ``StatefulDataLoader``.

torchdata's loader has its own iterator classes and worker loop but torch's
plumbing (a ``torch.multiprocessing`` result queue, the collate function run
in the worker, torch's pin-memory loop); workers put ``(idx, (data, worker_id,
delta_state))``. So torch_arena's iterator mixin applies as it does to
torch's: the collate function writes the batch into the arena, and the
worker's state delta rides beside the envelope, as torchdata sends it.
Batches that ``load_state_dict`` makes the next iterator fetch and discard
while fast-forwarding are restored and dropped at once, so their space comes
back before the next one is needed. Importing this module imports torchdata.
"""

from __future__ import annotations

from typing import Any

# From the module itself, not the package: this may run right after the module
# was imported, while the package is still importing it (see hooks.py).
from torchdata.stateful_dataloader.stateful_dataloader import (
    StatefulDataLoader,
    _StatefulMultiProcessingDataLoaderIter,
)

from torch_arena._loader.iterators import ArenaIteratorMixin
from torch_arena._loader.loader_arena import LoaderArena

__all__ = ["StatefulDataLoader", "forget_iterator", "stateful_iterator"]


class ArenaStatefulMultiProcessingDataLoaderIter(ArenaIteratorMixin, _StatefulMultiProcessingDataLoaderIter):
    """torchdata's multi-process iterator; workers run an ArenaCollate."""


def stateful_iterator(loader: Any, state: LoaderArena) -> Any:
    """The arena iterator of a ``StatefulDataLoader``, resuming from the state
    ``load_state_dict`` left (consumed, as torchdata's own ``_get_iterator`` does)."""
    iterator = ArenaStatefulMultiProcessingDataLoaderIter(loader, state, loader.next_iter_state)
    loader.next_iter_state = None
    return iterator


def forget_iterator(loader: Any) -> None:
    """The loader's iterator is gone (its arena released): forget it, and that
    a ``state_dict()`` call had started it."""
    loader._iterator = None
    loader._initial_iter_for_state_dict = False
