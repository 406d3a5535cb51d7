"""What a loader's arena has moved: :class:`ArenaStats` (``loader.arena_stats``)."""

from __future__ import annotations

import dataclasses

__all__ = ["ArenaStats"]


@dataclasses.dataclass
class ArenaStats:
    """What a loader's arena has moved so far (all iterators, all epochs)."""

    batches: int = 0
    """Batches that travelled through the arena."""
    bytes: int = 0
    """Binary payload bytes moved through the arena."""
    fallbacks: int = 0
    """Batches that went through torch's default path instead."""
    spilled: int = 0
    """Batches of a copy-out arena (a ring) restored zero-copy instead, because
    their private copy would not have fit in memory (they hold ring space while
    the loop keeps them)."""
    wait_seconds: float = 0.0
    """Time producers spent waiting for arena space."""
    high_water_units: int = 0
    """Most units (batches) in the arena at once."""
    high_water_bytes: int = 0
    """Most bytes in the arena at once (batches in flight plus those the loop holds)."""
    bytes_in_flight: int = 0
    """Bytes in the arena now: batches in flight plus those the loop still holds."""
    committed_bytes: int = 0
    """Memory the arena holds now (an elastic arena's grows and shrinks with the
    batches; a fixed pool's or ring's is its whole size)."""
    committed_high_water: int = 0
    """The most memory the arena has held at once."""
    last_fallback_reason: str = ""
    """Why the latest fallback happened."""
