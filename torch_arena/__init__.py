"""torch_arena: recycled shared-memory arenas for the PyTorch data path.

Workers write each batch once into recycled shared memory; the training
process gets zero-copy views (the elastic pool, which sizes itself, or the
fixed segment pool) or cheap private copies (the rings) instead of
unpickling or mapping fresh memory for every batch.

Three ways in: the class (``ArenaDataLoader`` for ``DataLoader``), the switch
(``TORCH_ARENA=pool`` in the environment, or :func:`enable` in code: every
DataLoader of the process), and the integrations' helpers
(:mod:`torch_arena.lightning`, :mod:`torch_arena.accelerate`,
:mod:`torch_arena.torchdata`).

The layers, each importing only those below it: ``_os`` (memory files,
locks) → ``_arena`` (one unit machinery, the backends) → ``_codec``
(objects as envelopes plus binaries) → ``_loader`` (the DataLoader
integration) → the integrations → ``_tools`` (doctor, demo, bench). Names are
imported on first use, so ``import torch_arena`` (and the start-up hook that
reads ``TORCH_ARENA``) costs next to nothing until one is.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> the module that defines it.
_EXPORTS = {
    "SharedMemoryElasticPool": "torch_arena._arena.elastic",
    "SharedMemoryElasticRing": "torch_arena._arena.elastic",
    "default_max_bytes": "torch_arena._arena.elastic",
    "SharedMemoryRingBuffer": "torch_arena._arena.ring_buffer",
    "SharedMemorySegmentPool": "torch_arena._arena.segment_pool",
    "register_handler": "torch_arena._codec.handlers",
    "unregister_handler": "torch_arena._codec.handlers",
    "DEFAULT_THRESHOLD": "torch_arena._codec.envelope",
    "offload": "torch_arena._codec.offload",
    "PayloadHandler": "torch_arena._codec.payloads",
    "restore": "torch_arena._codec.restore",
    "ArenaDataLoader": "torch_arena._loader.dataloader",
    "arena_reducer": "torch_arena._loader.reducer",
    "install_reducer": "torch_arena._loader.reducer",
    "uninstall_reducer": "torch_arena._loader.reducer",
    "ArenaSettings": "torch_arena._loader.settings",
    "ArenaStats": "torch_arena._loader.stats",
    "disable": "torch_arena._loader.switch",
    "enable": "torch_arena._loader.switch",
    "enabled": "torch_arena._loader.switch",
    "ArenaDroppedWarning": "torch_arena.errors",
    "ArenaFallbackWarning": "torch_arena.errors",
    "ArenaSpaceTimeout": "torch_arena.errors",
    "ArenaUnitTooLarge": "torch_arena.errors",
    "RestoreError": "torch_arena.errors",
}
#: What differs between a name here and the name in its module.
_RENAMED = {"install_reducer": "install", "uninstall_reducer": "uninstall"}

__all__ = sorted(_EXPORTS)

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torch_arena' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from torch_arena._arena.elastic import SharedMemoryElasticPool, SharedMemoryElasticRing, default_max_bytes
    from torch_arena._arena.ring_buffer import SharedMemoryRingBuffer
    from torch_arena._arena.segment_pool import SharedMemorySegmentPool
    from torch_arena._codec.handlers import register_handler, unregister_handler
    from torch_arena._codec.envelope import DEFAULT_THRESHOLD
    from torch_arena._codec.offload import offload
    from torch_arena._codec.payloads import PayloadHandler
    from torch_arena._codec.restore import restore
    from torch_arena._loader.dataloader import ArenaDataLoader
    from torch_arena._loader.reducer import arena_reducer
    from torch_arena._loader.reducer import install as install_reducer
    from torch_arena._loader.reducer import uninstall as uninstall_reducer
    from torch_arena._loader.settings import ArenaSettings
    from torch_arena._loader.stats import ArenaStats
    from torch_arena._loader.switch import disable, enable, enabled
    from torch_arena.errors import (
        ArenaDroppedWarning,
        ArenaFallbackWarning,
        ArenaSpaceTimeout,
        ArenaUnitTooLarge,
        RestoreError,
    )
