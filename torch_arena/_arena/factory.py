"""The arenas a loader makes by name: what ``arena="pool"`` and ``arena="ring"`` mean.

The loader names an arena; this is the one place that turns the name into a
backend, so the loader layer imports no backend class.
"""

from __future__ import annotations

from torch_arena._arena.elastic import SharedMemoryElasticPool, SharedMemoryElasticRing, default_max_bytes
from torch_arena._arena.protocol import Arena

__all__ = ["default_max_bytes", "make_arena"]


def make_arena(name: str, budget: int | None, timeout: float) -> Arena:
    """``"pool"``: an elastic pool (zero-copy); ``"ring"``: an elastic ring
    (copy-out); capped at ``budget`` bytes (default: half the memory available)."""
    if name == "pool":
        return SharedMemoryElasticPool(budget, acquire_timeout=timeout)
    if name == "ring":
        return SharedMemoryElasticRing(budget, acquire_timeout=timeout)
    raise ValueError(f"no arena is named {name!r}: use 'pool' or 'ring'")
