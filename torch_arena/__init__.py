"""torch_arena: pre-allocated shared-memory arenas for the PyTorch data path.

Workers write each batch once into recycled shared memory; the training
process gets zero-copy views (the elastic pool, which sizes itself, or the
fixed segment pool) or cheap private copies (ring buffer) instead of
unpickling or mapping fresh memory for every batch.
"""

from torch_arena._arena.base import ArenaSpaceTimeout
from torch_arena._codec.codec import DEFAULT_THRESHOLD, RestoreError, offload, restore
from torch_arena._loader.dataloader import ArenaDataLoader
from torch_arena._arena.elastic import SharedMemoryElasticPool, SharedMemoryElasticRing
from torch_arena._codec.handlers import PayloadHandler, register_handler, unregister_handler
from torch_arena._arena.segment_pool import SharedMemorySegmentPool
from torch_arena._loader.reducer import arena_reducer
from torch_arena._loader.reducer import install as install_reducer
from torch_arena._loader.reducer import uninstall as uninstall_reducer
from torch_arena._arena.ring_buffer import SharedMemoryRingBuffer
from torch_arena._loader.session import ArenaFallbackWarning, ArenaStats

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
