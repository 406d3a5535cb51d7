"""Rebuilding a loader that a framework made as an arena loader.

Frameworks that shard data (HF Accelerate, and so the HF Trainer) do not keep
the loader you give them: they read its settings and construct their own plain
``DataLoader`` (or torchdata ``StatefulDataLoader``). The helpers here turn
such a freshly built loader back into an arena loader with exactly the same
arguments, and warn when an arena would be dropped without that.

Nothing here imports Accelerate or torchdata unless the loader at hand is one
of torchdata's.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from torch_arena._loader.dataloader import ArenaDataLoader

__all__ = [
    "ArenaDroppedWarning",
    "arena_settings",
    "handled_here",
    "rebuild_with_arena",
    "rebuildable",
    "stop_iterator",
    "warn_arena_dropped",
]

#: ArenaDataLoader's own keyword arguments, stored under these names.
ARENA_KEYS = ("arena", "arena_budget", "arena_overflow", "arena_timeout", "arena_threshold")

# Attributes an arena loader has that the loader it replaces need not have.
_OWN_ATTRIBUTES = frozenset(ARENA_KEYS) | {
    "_arena_session",
    "_arena_session_key",
    "_arena_iterators",
    "_is_accelerate_prepared",
}

_handling: contextvars.ContextVar[bool] = contextvars.ContextVar("torch_arena_rebuild", default=False)
_warned: "weakref.WeakSet[DataLoader]" = weakref.WeakSet()


class ArenaDroppedWarning(UserWarning):
    """A framework rebuilt an :class:`~torch_arena.ArenaDataLoader` as a plain
    loader, so its batches no longer go through the arena."""


@contextlib.contextmanager
def handled_here() -> Iterator[None]:
    """Within this block torch_arena itself restores the arena of what a
    framework rebuilds: no :class:`ArenaDroppedWarning`."""
    token = _handling.set(True)
    try:
        yield
    finally:
        _handling.reset(token)


def warn_arena_dropped(loader: DataLoader) -> None:
    """Called when Accelerate is about to rebuild ``loader`` as a plain loader."""
    if _handling.get() or loader in _warned:
        return
    _warned.add(loader)
    warnings.warn(
        "torch_arena: accelerator.prepare() rebuilds this ArenaDataLoader as a plain torch DataLoader, "
        "so its batches will not go through the arena. Prepare it with "
        "torch_arena.accelerate.prepare(accelerator, ...) instead (or call "
        "torch_arena.accelerate.attach(accelerator) once before accelerator.prepare).",
        ArenaDroppedWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside torch_arena and accelerate (the user's call)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None:
        package = frame.f_globals.get("__name__", "").partition(".")[0]
        if package not in ("torch_arena", "accelerate"):
            return level
        level, frame = level + 1, frame.f_back
    return level


def arena_settings(loader: ArenaDataLoader) -> dict[str, Any]:
    """The arena keyword arguments ``loader`` was built with."""
    return {key: getattr(loader, key) for key in ARENA_KEYS}


def _stateful_class() -> Any:
    """torchdata's StatefulDataLoader if torchdata is already imported, else None."""
    module = sys.modules.get("torchdata.stateful_dataloader")
    return getattr(module, "StatefulDataLoader", None)


def rebuildable(loader: Any) -> bool:
    """Whether ``loader`` is a plain DataLoader or StatefulDataLoader (not a subclass)."""
    return type(loader) is DataLoader or (_stateful_class() is not None and type(loader) is _stateful_class())


def rebuild_with_arena(base: DataLoader, settings: Mapping[str, Any]) -> ArenaDataLoader:
    """An arena loader built with the arguments ``base`` was built with.

    ``base`` must be a plain :class:`~torch.utils.data.DataLoader` or a
    torchdata ``StatefulDataLoader`` (then the result is an
    :class:`~torch_arena.torchdata.ArenaStatefulDataLoader`). The sampler,
    batch sampler, dataset, collate function and generator are the same
    objects. ``base`` is left as it is (stop its iterator if it has one).
    """
    kwargs: dict[str, Any] = dict(
        num_workers=base.num_workers,
        collate_fn=base.collate_fn,
        pin_memory=base.pin_memory,
        timeout=base.timeout,
        worker_init_fn=base.worker_init_fn,
        multiprocessing_context=base.multiprocessing_context,
        generator=base.generator,
        prefetch_factor=base.prefetch_factor,
        persistent_workers=base.persistent_workers,
        pin_memory_device=base.pin_memory_device,
        in_order=base.in_order,
    )
    if base.batch_size is None and base.batch_sampler is not None:
        kwargs["batch_sampler"] = base.batch_sampler  # one the caller gave
    else:
        kwargs.update(batch_size=base.batch_size, drop_last=base.drop_last)
        if not isinstance(base.dataset, IterableDataset):
            kwargs["sampler"] = base.sampler
    stateful = _stateful_class()
    if stateful is not None and type(base) is stateful:
        from torch_arena.torchdata import ArenaStatefulDataLoader

        cls: type[ArenaDataLoader] = ArenaStatefulDataLoader
        kwargs["snapshot_every_n_steps"] = base.snapshot_every_n_steps
    elif type(base) is DataLoader:
        cls = ArenaDataLoader
    else:
        raise TypeError(
            f"torch_arena: cannot rebuild a {type(base).__module__}.{type(base).__qualname__} with an "
            "arena (only torch's DataLoader and torchdata's StatefulDataLoader)"
        )
    loader = cls(base.dataset, **kwargs, **settings)
    missing = sorted(set(vars(base)) - set(vars(loader)) - _OWN_ATTRIBUTES)
    if missing:
        # Someone set attributes on the loader after building it: they would be lost.
        warnings.warn(
            f"torch_arena: the arena copy of {type(base).__name__} lacks the attributes {missing} set on "
            "it after construction; report this with your Accelerate / torchdata versions.",
            RuntimeWarning,
            stacklevel=3,
        )
    return loader


def stop_iterator(loader: DataLoader) -> None:
    """Stop the workers of ``loader``'s kept iterator (persistent workers, or
    one a ``state_dict()`` call started), and forget it."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None
