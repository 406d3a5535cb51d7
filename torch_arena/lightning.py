"""Lightning integration: an arena switch for your ``LightningDataModule``.

.. code-block:: python

    import lightning as L
    from torch_arena.lightning import ArenaDataModuleMixin

    class MyData(ArenaDataModuleMixin, L.LightningDataModule):
        def __init__(self, batch_size: int = 32, **kwargs):
            super().__init__(**kwargs)          # arena=..., arena_budget=...
            self.batch_size = batch_size

        def train_dataloader(self):
            return self.arena_dataloader(self.train_set, batch_size=self.batch_size, num_workers=4)

    dm = MyData(arena="pool")     # or: python train.py fit --data.arena pool

This module imports no Lightning package: the mixin works with
``lightning.pytorch`` and with the older ``pytorch_lightning`` alike, whichever
``LightningDataModule`` you put after it.

How it holds up under Lightning:

* **Re-instantiation.** Under DDP (and always in ``predict``) Lightning
  rebuilds every loader as ``type(loader)(*args, **kwargs)`` to inject its
  sampler. A loader made inside a ``*_dataloader`` hook has its constructor
  call recorded and replayed, and :meth:`~ArenaDataModuleMixin.arena_dataloader`
  passes every arena setting as a keyword; a loader made elsewhere (cached in
  ``setup()``, passed to ``fit``) is rebuilt from its public attributes, where
  :class:`~torch_arena.ArenaDataLoader` keeps the arena settings under their
  ``__init__`` names. Either way the copy is an ``ArenaDataLoader`` with the
  same settings and its own (not yet made) arena.
* **Teardown.** The DataModule keeps weak references to the loaders it made,
  and at ``teardown(stage)`` and ``on_exception`` it releases those and every
  :class:`~torch_arena.ArenaDataLoader` reachable from its trainer (which is
  where Lightning's re-created copies live). The arena memory is an anonymous
  memory file, so a process that dies without either hook (a crashed
  ``ddp_spawn`` rank) leaves nothing behind: the kernel frees it.
* **Ranks.** Each rank builds its own loaders and so its own arenas; a
  pickled DataModule or loader (``ddp_spawn``) carries no arena and no
  tracking state.
"""

import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Literal, Optional, Union

from torch.utils.data import DataLoader

from torch_arena._codec.envelope import DEFAULT_THRESHOLD
from torch_arena._loader.dataloader import ArenaDataLoader
from torch_arena._loader.loader_arena import arena_state, release_all
from torch_arena._loader.settings import DEFAULT_ARENA_TIMEOUT_S, SETTING_NAMES, ArenaName, ArenaSettings

__all__ = ["ArenaDataModuleMixin", "ArenaName", "release_trainer_arenas"]

_TRACKED = "_arena_loaders"


class ArenaDataModuleMixin:
    """Adds an arena switch to a ``LightningDataModule``.

    Put it *before* the DataModule base class and forward ``**kwargs`` from
    your ``__init__`` to ``super().__init__`` (other arguments pass through to
    the next base class); build loaders with
    :meth:`arena_dataloader`. With LightningCLI the keywords appear as
    ``--data.arena``, ``--data.arena_budget`` ... and in the YAML config.

    The mixin defines no ``*_dataloader`` hook. It defines ``teardown`` and
    ``on_exception`` (releasing the arenas, then calling the base class's
    hook): if you override them, call ``super()``.

    Attributes:
        default_arena: The arena used when ``arena`` is not given (or is
            ``None``). Override it in a subclass, e.g. ``default_arena = "ring"``.
    """

    default_arena: ClassVar[Optional[str]] = "pool"

    def __init__(
        self,
        *args: Any,
        arena: Optional[ArenaName] = None,
        arena_budget: Optional[Union[int, str]] = None,
        arena_overflow: Literal["fallback", "raise"] = "fallback",
        arena_timeout: float = DEFAULT_ARENA_TIMEOUT_S,
        arena_threshold: int = DEFAULT_THRESHOLD,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            arena: How batches travel from the loaders' workers: ``pool``
                (an elastic shared-memory pool, zero-copy views), ``ring`` (a ring
                buffer, private copies) or ``none`` (torch's stock transport).
                Not given (``null``): the class attribute ``default_arena``.
            arena_budget: The most memory each loader's arena may commit
                (default half of the memory available; nothing is committed
                until batches need it). An int or a string such as ``4GiB``.
            arena_overflow: A batch that does not fit: ``fallback`` sends it
                the stock way (with one warning), ``raise`` fails.
            arena_timeout: Seconds a worker waits for arena space.
            arena_threshold: Tensors and arrays smaller than this many bytes
                travel inline.
        """
        chosen = type(self).default_arena if arena is None else arena
        settings = ArenaSettings.from_arguments(
            chosen, arena_budget, arena_overflow, arena_timeout, arena_threshold,
            where=type(self).__name__, allow_instance=False,
        )
        # Public, under the __init__ names (LightningCLI and hparams read them).
        self.arena: Optional[str] = settings.arena
        self.arena_budget = arena_budget
        self.arena_overflow = settings.overflow
        self.arena_timeout = settings.timeout
        self.arena_threshold = settings.threshold
        super().__init__(*args, **kwargs)

    # -- loaders ---------------------------------------------------------------

    def arena_dataloader(self, dataset: Any, **dataloader_kwargs: Any) -> DataLoader:
        """A loader for ``dataset`` with this DataModule's arena settings.

        ``dataloader_kwargs`` are :class:`~torch.utils.data.DataLoader`'s
        arguments; ``arena``, ``arena_budget``, ``arena_overflow``,
        ``arena_timeout`` and ``arena_threshold`` given here override the
        DataModule's for this loader only (``arena`` may also be an arena
        instance you own).

        Returns an :class:`~torch_arena.ArenaDataLoader` when an arena is
        chosen (with ``num_workers=0`` it behaves exactly like the stock
        loader), and a plain :class:`~torch.utils.data.DataLoader` when the
        arena is ``"none"``.
        """
        chosen = {key: dataloader_kwargs.pop(key, getattr(self, key)) for key in SETTING_NAMES}
        settings = ArenaSettings.from_arguments(where=f"{type(self).__name__}.arena_dataloader", **chosen)
        if not settings.enabled:
            return DataLoader(dataset, **dataloader_kwargs)
        loader = ArenaDataLoader(dataset, **dataloader_kwargs, **settings.as_kwargs())
        self._arena_tracked().add(loader)
        return loader

    def release_arenas(self) -> None:
        """Free every arena held by this DataModule's loaders and by the
        ArenaDataLoaders its trainer holds (Lightning's re-created copies).

        Stops those loaders' workers first. Batches already delivered stay
        valid; a loader iterated again makes a fresh arena. Called at
        ``teardown`` and ``on_exception``; safe to call any time no epoch is
        running.
        """
        loaders = list(self._arena_tracked())
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            loaders.extend(_trainer_arena_loaders(trainer))
        release_all(loaders)

    # -- hooks -------------------------------------------------------------------

    def teardown(self, stage: str) -> None:
        """Release the arenas (:meth:`release_arenas`), then the base class's hook."""
        try:
            self.release_arenas()
        finally:
            base = getattr(super(), "teardown", None)
            if base is not None:
                base(stage)

    def on_exception(self, exception: BaseException) -> None:
        """Release the arenas (:meth:`release_arenas`), then the base class's hook.

        A failure to release is reported as a warning, never raised: it must
        not hide the exception that stopped the run.
        """
        try:
            self.release_arenas()
        except Exception as exc:
            warnings.warn(
                f"torch_arena: releasing the arenas after {type(exception).__name__} failed: {exc!r}",
                RuntimeWarning,
                stacklevel=2,
            )
        base = getattr(super(), "on_exception", None)
        if base is not None:
            base(exception)

    # -- tracking ------------------------------------------------------------------

    def _arena_tracked(self) -> "weakref.WeakSet[ArenaDataLoader]":
        # Weak: the DataModule must not keep loaders (and their workers) alive.
        # Made lazily, so an unpickled or copied DataModule starts with none.
        tracked = self.__dict__.get(_TRACKED)
        if tracked is None:
            tracked = weakref.WeakSet()
            self.__dict__[_TRACKED] = tracked
        return tracked

    def __getstate__(self) -> Any:
        # A WeakSet cannot be pickled (ddp_spawn pickles the DataModule), and a
        # copy of the DataModule has no loaders yet anyway.
        base = getattr(super(), "__getstate__", None)
        state = base() if base is not None else self.__dict__
        if isinstance(state, dict) and _TRACKED in state:
            state = {k: v for k, v in state.items() if k != _TRACKED}
        return state


def release_trainer_arenas(trainer: Any) -> None:
    """Free the arenas of every :class:`~torch_arena.ArenaDataLoader` a
    Lightning ``Trainer`` holds (train, val, test and predict loaders,
    including the copies Lightning made to inject a sampler).

    For loaders that do not come from an :class:`ArenaDataModuleMixin`
    (passed straight to ``fit``, or made in a ``LightningModule`` hook): call
    it from your own ``teardown``/``on_exception`` hook or callback.
    """
    release_all(_trainer_arena_loaders(trainer))


def _trainer_arena_loaders(trainer: Any) -> "list[DataLoader]":
    """Loaders with an arena reachable from a trainer of either Lightning package."""
    found: list[DataLoader] = []
    sources: list[Any] = []
    # The loops hold the loaders in use (both fit's and validate's val loaders).
    for path in (
        ("fit_loop",),
        ("fit_loop", "epoch_loop", "val_loop"),
        ("validate_loop",),
        ("test_loop",),
        ("predict_loop",),
    ):
        obj = trainer
        for name in path:
            obj = getattr(obj, name, None)
        combined = getattr(obj, "_combined_loader", None)
        if combined is not None:
            sources.append(combined)
    # The public properties, in case a future version moves the loops' state.
    for name in ("train_dataloader", "val_dataloaders", "test_dataloaders", "predict_dataloaders"):
        try:
            value = getattr(trainer, name, None)
        except Exception:
            continue
        if value is not None and not callable(value):
            sources.append(value)
    for source in sources:
        found.extend(_walk(source, depth=0))
    return found


def _walk(obj: Any, depth: int) -> Iterator[DataLoader]:
    if depth > 8:
        return
    if isinstance(obj, DataLoader):
        if arena_state(obj) is not None:
            yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _walk(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _walk(value, depth + 1)
    else:
        # CombinedLoader (either package): its flat list of iterables.
        flattened: Union[list[Any], None] = getattr(obj, "flattened", None)
        if isinstance(flattened, list):
            for value in flattened:
                yield from _walk(value, depth + 1)
