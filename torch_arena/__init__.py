"""torch_arena: recycled shared-memory arenas for the PyTorch data path.

Workers write each batch once into recycled shared memory; the training
process gets zero-copy views (the elastic pool, which sizes itself, or the
fixed segment pool) or cheap private copies (the rings) instead of
unpickling or mapping fresh memory for every batch.

The layers, each importing only those below it: ``_os`` (memory files,
locks) → ``_arena`` (one unit machinery, the backends) → ``_codec``
(objects as envelopes plus binaries) → ``_loader`` (the DataLoader
integration) → the integrations (:mod:`torch_arena.lightning`,
:mod:`torch_arena.accelerate`, :mod:`torch_arena.torchdata`) → ``_tools``
(doctor, demo, bench).
"""

from torch_arena._arena.elastic import SharedMemoryElasticPool, SharedMemoryElasticRing, default_max_bytes
from torch_arena._arena.ring_buffer import SharedMemoryRingBuffer
from torch_arena._arena.segment_pool import SharedMemorySegmentPool
from torch_arena._codec.handlers import register_handler, unregister_handler
from torch_arena._codec.offload import DEFAULT_THRESHOLD, offload
from torch_arena._codec.payloads import PayloadHandler
from torch_arena._codec.restore import restore
from torch_arena._loader.dataloader import ArenaDataLoader
from torch_arena._loader.reducer import arena_reducer
from torch_arena._loader.reducer import install as install_reducer
from torch_arena._loader.reducer import uninstall as uninstall_reducer
from torch_arena._loader.settings import ArenaSettings
from torch_arena._loader.stats import ArenaStats
from torch_arena.errors import (
    ArenaDroppedWarning,
    ArenaFallbackWarning,
    ArenaSpaceTimeout,
    ArenaUnitTooLarge,
    RestoreError,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "ArenaDataLoader",
    "ArenaDroppedWarning",
    "ArenaFallbackWarning",
    "ArenaSettings",
    "ArenaSpaceTimeout",
    "ArenaStats",
    "ArenaUnitTooLarge",
    "PayloadHandler",
    "RestoreError",
    "SharedMemoryElasticPool",
    "SharedMemoryElasticRing",
    "SharedMemoryRingBuffer",
    "SharedMemorySegmentPool",
    "arena_reducer",
    "default_max_bytes",
    "install_reducer",
    "offload",
    "register_handler",
    "restore",
    "uninstall_reducer",
    "unregister_handler",
]

__version__ = "0.1.0"
