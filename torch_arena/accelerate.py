"""HF Accelerate integration: prepared loaders keep their arena.

``accelerator.prepare(loader)`` never keeps your loader: it reads its settings
and builds its own ``DataLoaderShard`` / ``DataLoaderDispatcher`` around a new
plain ``DataLoader`` (a torchdata ``StatefulDataLoader`` with
``use_stateful_dataloader=True``), with its own sharded sampler. The loader it
builds from an :class:`~torch_arena.ArenaDataLoader` takes that loader's arena
settings as it is built (see :mod:`torch_arena._loader.hooks`), so plain
``accelerator.prepare(...)`` keeps the arena, with Accelerate's own sharding,
device placement, ``set_epoch``, ``even_batches``, ``split_batches``,
``dispatch_batches`` and ``use_stateful_dataloader`` behaviour.
``prepared.arena_stats`` and ``prepared.release_arena()`` reach the loader
inside.

This module is for what plain ``prepare`` cannot know:

* :func:`attach` makes one accelerator give plain loaders an arena too (the
  HF Trainer builds plain loaders and prepares them with its own accelerator),
  keep arenas through its ``skip_first_batches``, and release them in
  ``free_memory()`` / ``clear()`` / ``end_training()``::

      trainer = Trainer(model=model, args=args, train_dataset=train_set)
      torch_arena.accelerate.attach(trainer.accelerator, arena="pool")
      trainer.train()

  (``TORCH_ARENA=pool`` in the environment does the same with no code at all.)
* :func:`prepare` = :func:`attach` + ``accelerator.prepare``;
  :func:`skip_first_batches` is Accelerate's module-level function, keeping
  the arena.

Requires ``accelerate`` (``pip install torch-arena[accelerate]``).
"""

from __future__ import annotations

import types
import warnings
import weakref
from typing import Any

from torch.utils.data import DataLoader

from torch_arena._codec.envelope import DEFAULT_THRESHOLD
from torch_arena._loader.hooks import adopting
from torch_arena._loader.loader_arena import arena_state, release_all
from torch_arena._loader.settings import DEFAULT_ARENA_TIMEOUT_S, ArenaSettings
from torch_arena.errors import ArenaDroppedWarning

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
    """``accelerator.prepare(*objects)`` after :func:`attach` (settings of an
    earlier ``attach`` stay): exactly what ``accelerator.prepare`` returns, one
    object or a tuple in the order given, every arena loader keeping its arena."""
    if _ATTACHMENT not in accelerator.__dict__:
        attach(accelerator)
    return accelerator.prepare(*objects, device_placement=device_placement)


def attach(
    accelerator: Accelerator,
    *,
    arena: Any = None,
    arena_budget: int | str | None = None,
    arena_overflow: str = "fallback",
    arena_timeout: float = DEFAULT_ARENA_TIMEOUT_S,
    arena_threshold: int = DEFAULT_THRESHOLD,
) -> Accelerator:
    """Make ``accelerator`` give arenas to the loaders it prepares, and release them.

    After this, on this accelerator (and only on it):

    * ``prepare`` / ``prepare_data_loader`` keep the arena of every loader
      that has one, and, with ``arena=``, give plain loaders one;
    * ``skip_first_batches`` of a loader that has an arena keeps it;
    * ``free_memory()``, ``clear()`` and ``end_training()`` release the arenas
      of every loader it prepared (stopping their workers) first.

    Args:
        accelerator: The ``Accelerator`` (e.g. ``trainer.accelerator``).
        arena: ``None`` (default): plain loaders stay plain. ``"pool"`` or
            ``"ring"``: plain loaders this accelerator prepares get an arena
            too, with the settings below (the HF Trainer's case). An arena
            instance is refused: each loader needs its own.
        arena_budget, arena_overflow, arena_timeout, arena_threshold: As for
            :class:`~torch_arena.ArenaDataLoader`, for those plain loaders.

    Returns:
        ``accelerator``. Calling ``attach`` again only changes the settings
        for plain loaders.
    """
    settings = ArenaSettings.from_arguments(
        arena, arena_budget, arena_overflow, arena_timeout, arena_threshold,
        where="torch_arena.accelerate.attach", allow_instance=False,
    )
    attachment = accelerator.__dict__.get(_ATTACHMENT)
    if attachment is None:
        attachment = _Attachment(accelerator)
        accelerator.__dict__[_ATTACHMENT] = attachment
        for name, method in _WRAPPERS.items():
            setattr(accelerator, name, types.MethodType(method, accelerator))
    attachment.defaults = settings if settings.enabled else None
    return accelerator


def skip_first_batches(dataloader: Any, num_batches: int = 0) -> Any:
    """``accelerate.skip_first_batches``, keeping the arena of ``dataloader``.

    For code that calls Accelerate's module-level function (an attached
    accelerator's ``skip_first_batches`` method keeps the arena by itself).
    """
    return _kept(dataloader, _own_settings(dataloader), _accelerate_skip_first_batches, num_batches=num_batches)


def arena_loaders(accelerator: Accelerator) -> list[DataLoader]:
    """The loaders with an arena inside what ``accelerator`` prepared (and those
    its attached ``skip_first_batches`` made): what an attached
    ``free_memory()`` releases."""
    found: dict[int, DataLoader] = {}
    attachment = accelerator.__dict__.get(_ATTACHMENT)
    candidates = [*(attachment.loaders if attachment is not None else ()), *getattr(accelerator, "_dataloaders", ())]
    for prepared in candidates:
        loader = _loader_of(prepared)
        if arena_state(loader) is not None:
            found.setdefault(id(loader), loader)
    return list(found.values())


class _Attachment:
    """What :func:`attach` keeps on an accelerator."""

    def __init__(self, accelerator: Accelerator) -> None:
        # The accelerator's methods as they were (bound; maybe already wrapped by someone else).
        self.originals = {name: getattr(accelerator, name) for name in _WRAPPERS}
        self.defaults: ArenaSettings | None = None
        self.loaders: weakref.WeakSet[Any] = weakref.WeakSet()

    def settings_for(self, obj: Any) -> ArenaSettings | None:
        """Arena settings for what Accelerate builds from ``obj``, or None to leave it."""
        own = _own_settings(obj)
        if own is not None:
            return own
        if self.defaults is not None and isinstance(_loader_of(obj), DataLoader):
            return self.defaults
        return None


def _loader_of(obj: Any) -> Any:
    """The loader inside an Accelerate adapter (``obj`` itself otherwise)."""
    # type(), not isinstance(): an adapter's __class__ claims to be its base loader's class.
    return obj.__dict__.get("base_dataloader") if issubclass(type(obj), DataLoaderAdapter) else obj


def _own_settings(obj: Any) -> ArenaSettings | None:
    """The arena settings of ``obj`` (a loader, or an adapter around one), if it uses an arena."""
    state = arena_state(_loader_of(obj))
    return state.settings if state is not None and state.settings.enabled else None


def _kept(source: Any, settings: ArenaSettings | None, build: Any, *args: Any, **kwargs: Any) -> Any:
    """``build(source, ...)``, whose loader adopts ``settings``; warns if Accelerate
    returned something torch_arena could not find the new loader in."""
    if settings is None:
        return build(source, *args, **kwargs)
    with adopting(settings, dataset=getattr(_loader_of(source), "dataset", None)):
        built = build(source, *args, **kwargs)
    if built is not source and arena_state(_loader_of(built)) is None:
        warnings.warn(
            f"torch_arena: accelerate {accelerate.__version__} returned a {type(built).__name__} whose "
            "loader torch_arena could not give an arena: its batches use torch's default transport",
            ArenaDroppedWarning,
            stacklevel=3,
        )
    return built


# -- the attached accelerator's methods (first argument: the accelerator) ------------------


def _arena_prepare_data_loader(
    accelerator: Accelerator, data_loader: Any, device_placement: Any = None, slice_fn_for_dispatch: Any = None
) -> Any:
    attachment: _Attachment = accelerator.__dict__[_ATTACHMENT]
    return _kept(
        data_loader,
        attachment.settings_for(data_loader),
        attachment.originals["prepare_data_loader"],
        device_placement=device_placement,
        slice_fn_for_dispatch=slice_fn_for_dispatch,
    )


def _arena_skip_first_batches(accelerator: Accelerator, dataloader: Any, num_batches: int = 0) -> Any:
    attachment: _Attachment = accelerator.__dict__[_ATTACHMENT]
    skipped = _kept(dataloader, _own_settings(dataloader), attachment.originals["skip_first_batches"],
                    num_batches=num_batches)
    if skipped is not dataloader:
        attachment.loaders.add(skipped)
    return skipped


def _arena_free_memory(accelerator: Accelerator, *objects: Any) -> Any:
    release_all(arena_loaders(accelerator))
    return accelerator.__dict__[_ATTACHMENT].originals["free_memory"](*objects)


def _arena_end_training(accelerator: Accelerator) -> Any:
    release_all(arena_loaders(accelerator))
    return accelerator.__dict__[_ATTACHMENT].originals["end_training"]()


# The accelerator methods attach() wraps (on the instance, not the class).
_WRAPPERS = {
    "prepare_data_loader": _arena_prepare_data_loader,
    "skip_first_batches": _arena_skip_first_batches,
    "free_memory": _arena_free_memory,
    "end_training": _arena_end_training,
}
