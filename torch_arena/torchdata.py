"""torchdata integration: :class:`ArenaStatefulDataLoader`, a checkpointable
loader whose batches cross through an arena.

.. code-block:: python

    from torch_arena.torchdata import ArenaStatefulDataLoader

    loader = ArenaStatefulDataLoader(dataset, batch_size=32, num_workers=4, arena="pool")
    for step, batch in enumerate(loader):
        ...
        if step == 99:
            checkpoint = {"loader": loader.state_dict(), ...}

    # later, in a new process
    loader = ArenaStatefulDataLoader(dataset, batch_size=32, num_workers=4, arena="pool")
    loader.load_state_dict(checkpoint["loader"])
    for batch in loader:          # batch 100 onwards, exactly as StatefulDataLoader
        ...

It is torchdata's ``StatefulDataLoader`` (its ``state_dict``, worker loop,
snapshots and fast-forward) with :class:`~torch_arena.ArenaDataLoader`'s
transport (see :mod:`torch_arena._loader.stateful` for how the two meet).

Requires ``torchdata`` (``pip install torch-arena[torchdata]``).
"""

from __future__ import annotations

from typing import Any

from torch_arena._loader.dataloader import ArenaDataLoader, T_co
from torch_arena._loader.loader_arena import LoaderArena

try:
    from torch_arena._loader.stateful import StatefulDataLoader, forget_iterator, stateful_iterator
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "torch_arena.torchdata needs torchdata's StatefulDataLoader (torchdata >= 0.10): "
        "pip install 'torch-arena[torchdata]'"
    ) from exc

__all__ = ["ArenaStatefulDataLoader"]


class ArenaStatefulDataLoader(ArenaDataLoader[T_co], StatefulDataLoader[T_co]):
    """torchdata's :class:`~torchdata.stateful_dataloader.StatefulDataLoader`
    whose workers send batches through a shared-memory arena.

    Takes every ``StatefulDataLoader`` argument (``snapshot_every_n_steps``
    included) and :class:`~torch_arena.ArenaDataLoader`'s ``arena``,
    ``arena_budget``, ``arena_overflow``, ``arena_timeout`` and
    ``arena_threshold``. ``state_dict()`` / ``load_state_dict()`` are
    torchdata's: a state taken from this loader resumes a
    ``StatefulDataLoader`` and the other way round, with the same batches.

    :meth:`release_arena` forgets the iterator, and with it the position in
    the current epoch: take ``state_dict()`` first if you need it.
    """

    def __init__(self, dataset: Any, *args: Any, snapshot_every_n_steps: int | None = 1, **kwargs: Any) -> None:
        super().__init__(dataset, *args, snapshot_every_n_steps=snapshot_every_n_steps, **kwargs)

    def _arena_iterator(self, state: LoaderArena) -> Any:
        return stateful_iterator(self, state)

    def release_arena(self) -> None:
        """Stop this loader's workers and free the arena it made (see
        :meth:`ArenaDataLoader.release_arena`)."""
        super().release_arena()
        forget_iterator(self)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_initial_iter_for_state_dict"] = False  # no iterator travels
        return state
