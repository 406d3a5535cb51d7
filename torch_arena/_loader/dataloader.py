"""ArenaDataLoader: torch's DataLoader, with batches crossing through an arena.

Only two things differ from the stock loader, both at iterator time (see
:mod:`torch_arena._loader.iterators`): each worker's collate function writes
the batch into the arena and returns a small envelope, and the loader's
session restores it when torch unpickles it in this process. Everything else
is torch's own multi-process iterator. Nothing is allocated in ``__init__``:
Lightning builds and discards copies of loaders and pickles them under
ddp_spawn. The arena is made when the first iterator starts and kept for the
loader's later iterators.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _BaseDataLoaderIter

from torch_arena._codec.envelope import DEFAULT_THRESHOLD
from torch_arena._loader.hooks import offer_within_caller
from torch_arena._loader.iterators import ArenaMultiProcessingDataLoaderIter, track
from torch_arena._loader.loader_arena import ATTRIBUTE, LoaderArena
from torch_arena._loader.settings import DEFAULT_ARENA_TIMEOUT_S, SETTING_NAMES, ArenaSettings
from torch_arena._loader.stats import ArenaStats

__all__ = ["ArenaDataLoader"]

T_co = TypeVar("T_co", covariant=True)
#: Loader keyword argument -> :class:`ArenaSettings` field.
_FIELDS = dict(zip(SETTING_NAMES, (f.name for f in dataclasses.fields(ArenaSettings))))


class ArenaDataLoader(DataLoader[T_co]):
    """A drop-in :class:`torch.utils.data.DataLoader` whose workers send batches
    through a shared-memory arena.

    Every DataLoader argument keeps its meaning, and like ``DataLoader`` it is
    generic in the batch type (``ArenaDataLoader[Batch]``). The extra
    keyword-only arguments (see :class:`~torch_arena.ArenaSettings`):

    Args:
        arena: ``"pool"`` (the default: an elastic pool, zero-copy views, sized
            by the batches themselves), ``"ring"`` (the same memory, restores
            copied into recycled private memory), an arena instance you own
            (shared by all the loader's iterators), or ``None`` / ``"none"``
            for exactly the stock transport (the A side of an A/B comparison).
            Ignored with ``num_workers=0``.
        arena_budget: The most memory an arena the loader makes (``"pool"`` or
            ``"ring"``) may commit. Default: half of the memory available when
            the first iterator starts; nothing is committed until batches need
            it, and memory above the recent working set goes back.
            Bytes as an int, an integral float (``1.5e9``) or a string
            (``"4GiB"``, ``"512MB"``).
        arena_overflow: ``"fallback"`` (default): a batch that does not fit
            travels by torch's default path, with one warning and a count in
            :attr:`arena_stats`; ``"raise"``: a :class:`BufferError` that says
            what to change.
        arena_timeout: Seconds a worker waits for space (the arena at its
            budget with batches the training loop keeps) before falling back
            or raising.
        arena_threshold: Tensors, arrays and bytes smaller than this travel
            inline in the envelope.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        num_workers: int = 0,
        collate_fn: Callable[[Any], Any] | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: Any = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        arena: Any = "pool",
        arena_budget: int | float | str | None = None,
        arena_overflow: str = "fallback",
        arena_timeout: float = DEFAULT_ARENA_TIMEOUT_S,
        arena_threshold: int = DEFAULT_THRESHOLD,
        **kwargs: Any,
    ) -> None:
        settings = ArenaSettings(arena, arena_budget, arena_overflow, arena_timeout, arena_threshold)
        self.__dict__[ATTRIBUTE] = LoaderArena(settings)
        super().__init__(
            dataset,
            batch_size,
            shuffle,
            sampler,
            batch_sampler,
            num_workers,
            collate_fn,
            pin_memory,
            drop_last,
            timeout,
            worker_init_fn,
            multiprocessing_context,
            generator,
            prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers,
            pin_memory_device=pin_memory_device,
            in_order=in_order,
            **kwargs,
        )
        # Public, under the __init__ names: Lightning rebuilds a loader made
        # outside a *_dataloader hook from the attributes that match them.
        self.__dict__.update(settings.as_kwargs())

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FIELDS and ATTRIBUTE in self.__dict__:
            state: LoaderArena = self.__dict__[ATTRIBUTE]
            state.settings = dataclasses.replace(state.settings, **{_FIELDS[name]: value})  # validated
            value = getattr(state.settings, _FIELDS[name])
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        # A live iterator never travels with a pickled loader (ddp_spawn
        # pickles DataModules and their loaders); the LoaderArena keeps only
        # its settings.
        state = self.__dict__.copy()
        state["_iterator"] = None
        return state

    @property
    def arena_settings(self) -> ArenaSettings:
        """The loader's arena settings."""
        return self.__dict__[ATTRIBUTE].settings

    @property
    def uses_arena(self) -> bool:
        """Whether batches will cross processes through an arena."""
        return self.__dict__[ATTRIBUTE].uses_arena(self)

    @property
    def arena_stats(self) -> ArenaStats:
        """Batches and bytes moved through the arena, fallbacks, producer wait
        time and memory, over all of this loader's iterators."""
        return self.__dict__[ATTRIBUTE].stats()

    def release_arena(self) -> None:
        """Stop this loader's workers and free the arena it made.

        Batches already restored stay valid (their memory goes when they do).
        An arena instance passed in by the user is not closed. The next
        iteration makes a fresh arena.
        """
        self.__dict__[ATTRIBUTE].release()
        self._iterator = None

    def _get_iterator(self) -> _BaseDataLoaderIter:
        state: LoaderArena = self.__dict__[ATTRIBUTE]
        if not state.uses_arena(self):
            return super()._get_iterator()
        self.check_worker_number_rationality()
        return track(self._arena_iterator(state), state)

    def _arena_iterator(self, state: LoaderArena) -> _BaseDataLoaderIter:
        """A new multi-process iterator whose workers write into the arena
        (a subclass with its own iterator, e.g. torchdata's, overrides it)."""
        return ArenaMultiProcessingDataLoaderIter(self, state)

    # Accelerate reads this flag right before it rebuilds a loader as its own
    # plain loader: the loader it builds next, over this dataset, within that
    # call, adopts this loader's arena settings (see torch_arena._loader.hooks).
    @property
    def _is_accelerate_prepared(self) -> bool:
        prepared = bool(self.__dict__.get("_is_accelerate_prepared", False))
        if not prepared and self.uses_arena:
            offer_within_caller(self.arena_settings, self.dataset)
        return prepared

    @_is_accelerate_prepared.setter
    def _is_accelerate_prepared(self, value: bool) -> None:
        self.__dict__["_is_accelerate_prepared"] = value
