"""HF Accelerate integration: prepared loaders that keep their arena.

``accelerator.prepare(loader)`` never keeps your loader: it reads its settings
and builds its own ``DataLoaderShard`` / ``DataLoaderDispatcher`` around a new
plain ``DataLoader`` (a torchdata ``StatefulDataLoader`` with
``use_stateful_dataloader=True``), with its own sharded sampler. An
:class:`~torch_arena.ArenaDataLoader` prepared that way warns
(:class:`ArenaDroppedWarning`), because its batches would no longer go through
the arena. The fix is one line:

.. code-block:: python

    import torch_arena.accelerate

    model, optimizer, loader = torch_arena.accelerate.prepare(accelerator, model, optimizer, loader)

It returns what ``accelerator.prepare`` returns (the same sharding, device
placement, ``set_epoch``, ``even_batches``, ``split_batches``,
``dispatch_batches`` and ``use_stateful_dataloader`` behaviour), except that
inside each prepared loader built from an arena loader, the plain loader
Accelerate made is replaced by an arena loader built with the same arguments
(same dataset, sampler, batch sampler, collate function ...) and the original
loader's arena settings.

``prepare`` first calls :func:`attach`, which makes that ``accelerator`` keep
arenas from then on: in ``accelerator.prepare`` / ``prepare_data_loader`` and
``accelerator.skip_first_batches``, and releases them in
``accelerator.free_memory()`` / ``clear()`` / ``end_training()``. With an
``arena=`` argument, :func:`attach` also gives plain loaders an arena: that is
the one line for the HF Trainer, which builds plain loaders and prepares them
with its own accelerator::

    trainer = Trainer(model=model, args=args, train_dataset=train_set)
    torch_arena.accelerate.attach(trainer.accelerator, arena="pool")
    trainer.train()

Requires ``accelerate`` (``pip install torch-arena[accelerate]``).
"""

from __future__ import annotations

import contextlib
import types
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from torch_arena._codec.codec import DEFAULT_THRESHOLD
from torch_arena._loader.dataloader import ArenaDataLoader
from torch_arena.lightning import _release_all  # imports no Lightning package
from torch_arena._loader.rebuild import (
    ArenaDroppedWarning,
    arena_settings,
    handled_here,
    rebuildable,
    rebuild_with_arena,
    stop_iterator,
)

try:
    import accelerate
    from accelerate import Accelerator
    from accelerate.data_loader import DataLoaderAdapter
    from accelerate.data_loader import skip_first_batches as _accelerate_skip_first_batches
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "torch_arena.accelerate needs HF Accelerate: pip install 'torch-arena[accelerate]'"
    ) from exc

__all__ = ["ArenaDroppedWarning", "arena_loaders", "attach", "prepare", "skip_first_batches"]

_ATTACHMENT = "_torch_arena_attachment"


def prepare(accelerator: Accelerator, *objects: Any, device_placement: list[bool] | None = None) -> Any:
    """``accelerator.prepare(*objects)``, with every arena loader's batches
    still going through its arena.

    Args:
        accelerator: The ``Accelerator`` to prepare with. It is
            :func:`attach`-ed first (settings of an earlier ``attach`` stay).
        objects: What ``accelerator.prepare`` takes: models, optimizers,
            schedulers and loaders, in any order.
        device_placement: As for ``accelerator.prepare``.

    Returns:
        Exactly what ``accelerator.prepare(*objects)`` returns: one object,
        or a tuple in the order given. A prepared loader built from an
        :class:`~torch_arena.ArenaDataLoader` (or a
        :class:`~torch_arena.torchdata.ArenaStatefulDataLoader`) is
        Accelerate's own ``DataLoaderShard`` / ``DataLoaderDispatcher`` whose
        ``base_dataloader`` is an arena loader with the original's arena
        settings; ``loader.arena_stats`` and ``loader.release_arena()``
        reach it.
    """
    if _ATTACHMENT not in accelerator.__dict__:
        attach(accelerator)
    return accelerator.prepare(*objects, device_placement=device_placement)


def attach(
    accelerator: Accelerator,
    *,
    arena: Any = None,
    arena_budget: int | None = None,
    arena_overflow: str = "fallback",
    arena_timeout: float = 2.0,
    arena_threshold: int = DEFAULT_THRESHOLD,
) -> Accelerator:
    """Make ``accelerator`` keep arenas in the loaders it prepares.

    After this, on this accelerator (and only on it):

    * ``prepare`` / ``prepare_data_loader`` keep the arena of every
      :class:`~torch_arena.ArenaDataLoader`, as :func:`prepare` does;
    * ``skip_first_batches`` of a loader that has an arena keeps it;
    * ``free_memory()``, ``clear()`` and ``end_training()`` release the arenas
      of every loader it prepared (stopping their workers) before doing what
      they do.

    Args:
        accelerator: The ``Accelerator`` (e.g. ``trainer.accelerator``).
        arena: ``None`` (default): plain loaders stay plain. ``"pool"`` or
            ``"ring"``: plain loaders this accelerator prepares get an arena
            too, with the settings below (the HF Trainer's case).
        arena_budget, arena_overflow, arena_timeout, arena_threshold: As for
            :class:`~torch_arena.ArenaDataLoader`, for those plain loaders.

    Returns:
        ``accelerator``. Calling ``attach`` again only changes the settings
        for plain loaders.
    """
    if arena is not None and arena != "none" and not isinstance(arena, str):
        raise ValueError(
            "torch_arena.accelerate.attach: arena must be 'pool', 'ring', 'none' or None: every loader "
            f"needs its own arena, so an arena instance cannot be shared here (got {arena!r})"
        )
    # The constructor validates the settings (and maps "none" to None).
    probe = ArenaDataLoader(
        [],
        arena=arena,
        arena_budget=arena_budget,
        arena_overflow=arena_overflow,
        arena_timeout=arena_timeout,
        arena_threshold=arena_threshold,
    )
    attachment = accelerator.__dict__.get(_ATTACHMENT)
    if attachment is None:
        attachment = _Attachment(accelerator)
        accelerator.__dict__[_ATTACHMENT] = attachment
        for name, method in _WRAPPERS.items():
            setattr(accelerator, name, types.MethodType(method, accelerator))
    attachment.defaults = arena_settings(probe) if probe.arena is not None else None
    return accelerator


def skip_first_batches(dataloader: Any, num_batches: int = 0) -> Any:
    """``accelerate.skip_first_batches``, keeping the arena of ``dataloader``.

    For code that calls Accelerate's module-level function (an attached
    accelerator's ``skip_first_batches`` method keeps the arena by itself).
    """
    settings = _own_settings(dataloader)
    with handled_here():
        skipped = _accelerate_skip_first_batches(dataloader, num_batches=num_batches)
    if settings is None or skipped is dataloader:
        return skipped
    return _keep_arena(skipped, settings, None)


def arena_loaders(accelerator: Accelerator) -> list[ArenaDataLoader]:
    """The arena loaders inside what ``accelerator`` prepared (and the arena
    loaders it returned as they were): what :func:`attach`-ed
    ``free_memory()`` releases."""
    found: dict[int, ArenaDataLoader] = {}
    attachment = accelerator.__dict__.get(_ATTACHMENT)
    if attachment is not None:
        found.update((id(loader), loader) for loader in list(attachment.loaders))
    for prepared in getattr(accelerator, "_dataloaders", ()):
        loader = _base_of(prepared) if _is_adapter(prepared) else prepared
        if isinstance(loader, ArenaDataLoader):
            found.setdefault(id(loader), loader)
    return list(found.values())


class _Attachment:
    """What :func:`attach` keeps on an accelerator."""

    def __init__(self, accelerator: Accelerator) -> None:
        # The accelerator's methods as they were (bound; maybe already wrapped by someone else).
        self.originals = {name: getattr(accelerator, name) for name in _WRAPPERS}
        self.defaults: dict[str, Any] | None = None
        self.loaders: weakref.WeakSet[ArenaDataLoader] = weakref.WeakSet()

    def settings_for(self, obj: Any) -> dict[str, Any] | None:
        """Arena settings for what Accelerate builds from ``obj``, or None to leave it."""
        own = _own_settings(obj)
        if own is not None:
            return own
        if self.defaults is not None and isinstance(obj, DataLoader):
            return dict(self.defaults)
        return None


def _is_adapter(obj: Any) -> bool:
    # type(), not isinstance(): an adapter's __class__ claims to be its base loader's class.
    return issubclass(type(obj), DataLoaderAdapter)


def _base_of(adapter: Any) -> Any:
    return adapter.__dict__.get("base_dataloader")


def _own_settings(obj: Any) -> dict[str, Any] | None:
    """The arena settings ``obj`` (an arena loader, or an adapter around one) carries."""
    loader = _base_of(obj) if _is_adapter(obj) else obj
    if isinstance(loader, ArenaDataLoader):
        return arena_settings(loader)
    return None


class _RandomState:
    """The torch random state that preparing a loader may consume: the global
    generator and the generators of the loader and its (batch) samplers."""

    def __init__(self, loader: Any) -> None:
        self.global_state = torch.get_rng_state()
        self.generators = {id(g): g.get_state() for g in _generators(loader)}

    @contextlib.contextmanager
    def replayed(self, loader: Any) -> Iterator[None]:
        """Within the block, the random state is as it was when this was taken
        (a generator made since: as just seeded); afterwards, as before the block."""
        after = torch.get_rng_state()
        for generator in _generators(loader):
            before = self.generators.get(id(generator))
            if before is not None:
                generator.set_state(before)
            else:  # made by Accelerate (seeded, then used only by the iterator we replace)
                generator.manual_seed(generator.initial_seed())
        torch.set_rng_state(self.global_state)
        try:
            yield
        finally:
            torch.set_rng_state(after)


def _generators(loader: Any) -> list[torch.Generator]:
    """The torch.Generator objects of ``loader`` and its samplers, nested ones included."""
    found: dict[int, torch.Generator] = {}
    pending, seen = [loader], set()
    while pending:
        obj = pending.pop()
        if obj is None or id(obj) in seen or len(seen) > 16:
            continue
        seen.add(id(obj))
        generator = getattr(obj, "generator", None)
        if isinstance(generator, torch.Generator):
            found[id(generator)] = generator
        pending.extend(getattr(obj, name, None) for name in ("sampler", "batch_sampler"))
    return list(found.values())


def _keep_arena(
    prepared: Any, settings: dict[str, Any], attachment: _Attachment | None, before: _RandomState | None = None
) -> Any:
    """Give what Accelerate built an arena loader in place of its plain one.

    ``before``: the random state before Accelerate prepared it. A stateful
    adapter's ``__init__`` starts an iterator (for its first ``state_dict()``)
    that draws seeds and the first shuffle; the arena loader's first iterator
    then starts from that iterator's state with the same random state, so it
    yields what Accelerate's would have yielded.
    """
    if _is_adapter(prepared) and isinstance(_base_of(prepared), DataLoader):
        base = _base_of(prepared)
        loader = rebuild_with_arena(base, settings)
        started = getattr(base, "_iterator", None) is not None
        stop_iterator(base)  # a StatefulDataLoader's state_dict() started workers
        prepared.base_dataloader = loader
        if hasattr(loader, "state_dict"):  # as DataLoaderAdapter.__init__ does
            if started and before is not None and getattr(prepared, "dl_state_dict", None):
                loader.load_state_dict(prepared.dl_state_dict)  # the same base and shared seeds
                with before.replayed(base):
                    prepared.dl_state_dict = loader.state_dict()
            else:
                prepared.dl_state_dict = loader.state_dict()
        result = prepared
    elif rebuildable(prepared):
        loader = rebuild_with_arena(prepared, settings)  # skip_first_batches of an unprepared loader
        result = loader
    else:
        warnings.warn(
            f"torch_arena: accelerate {accelerate.__version__} returned a {type(prepared).__name__} "
            "that torch_arena cannot give an arena: its batches use torch's default transport",
            ArenaDroppedWarning,
            stacklevel=3,
        )
        return prepared
    if attachment is not None:
        attachment.loaders.add(loader)
    return result


def _release(accelerator: Accelerator) -> None:
    _release_all(arena_loaders(accelerator))


# -- the attached accelerator's methods (first argument: the accelerator) ------------------


def _arena_prepare_data_loader(
    accelerator: Accelerator, data_loader: Any, device_placement: Any = None, slice_fn_for_dispatch: Any = None
) -> Any:
    attachment: _Attachment = accelerator.__dict__[_ATTACHMENT]
    settings = attachment.settings_for(data_loader)
    before = _RandomState(data_loader) if settings is not None else None
    with handled_here():
        prepared = attachment.originals["prepare_data_loader"](
            data_loader, device_placement=device_placement, slice_fn_for_dispatch=slice_fn_for_dispatch
        )
    if settings is None or prepared is data_loader:
        return prepared  # not ours, or already prepared (Accelerate returns it as it is)
    return _keep_arena(prepared, settings, attachment, before)


def _arena_skip_first_batches(accelerator: Accelerator, dataloader: Any, num_batches: int = 0) -> Any:
    attachment: _Attachment = accelerator.__dict__[_ATTACHMENT]
    settings = _own_settings(dataloader)
    with handled_here():
        skipped = attachment.originals["skip_first_batches"](dataloader, num_batches=num_batches)
    if settings is None or skipped is dataloader:
        return skipped
    return _keep_arena(skipped, settings, attachment)


def _arena_free_memory(accelerator: Accelerator, *objects: Any) -> Any:
    _release(accelerator)
    return accelerator.__dict__[_ATTACHMENT].originals["free_memory"](*objects)


def _arena_end_training(accelerator: Accelerator) -> Any:
    _release(accelerator)
    return accelerator.__dict__[_ATTACHMENT].originals["end_training"]()


# The accelerator methods attach() wraps (on the instance, not the class).
_WRAPPERS = {
    "prepare_data_loader": _arena_prepare_data_loader,
    "skip_first_batches": _arena_skip_first_batches,
    "free_memory": _arena_free_memory,
    "end_training": _arena_end_training,
}
