"""torch_arena: pre-allocated shared-memory arenas for the PyTorch data path.

Workers write each batch once into recycled shared memory; the training
process gets zero-copy views (the elastic pool, which sizes itself, or the
fixed segment pool) or cheap private copies (ring buffer) instead of
unpickling or mapping fresh memory for every batch.
"""

from ._base import ArenaSpaceTimeout
from ._codec import DEFAULT_THRESHOLD, RestoreError, offload, restore
from ._dataloader import ArenaDataLoader
from ._elastic import SharedMemoryElasticPool, SharedMemoryElasticRing
from ._handlers import PayloadHandler, register_handler, unregister_handler
from ._pool import SharedMemorySegmentPool
from ._reducer import arena_reducer
from ._reducer import install as install_reducer
from ._reducer import uninstall as uninstall_reducer
from ._ring import SharedMemoryRingBuffer
from ._session import ArenaFallbackWarning, ArenaStats

__all__ = [
    "DEFAULT_THRESHOLD",
    "ArenaDataLoader",
    "ArenaFallbackWarning",
    "ArenaSpaceTimeout",
    "ArenaStats",
    "PayloadHandler",
    "RestoreError",
    "arena_reducer",
    "install_reducer",
    "uninstall_reducer",
    "SharedMemoryElasticPool",
    "SharedMemoryElasticRing",
    "SharedMemoryRingBuffer",
    "SharedMemorySegmentPool",
    "offload",
    "register_handler",
    "restore",
    "unregister_handler",
]

__version__ = "0.1.0"
