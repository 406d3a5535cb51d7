"""``python -m torch_arena demo``: the quick A/B transport comparison.

The transport benchmark of :mod:`torch_arena._tools.bench` on a short matrix (32 MiB
batches of bytes, numpy arrays, tensors and collated tensor samples; stock vs
ring vs pool, plus SPDL's pool where installed): a minute or two on 2 cores.
Prints the table and where the figure went.
"""

from __future__ import annotations

from torch_arena._tools import bench as _bench

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the quick matrix; returns the exit status."""
    results, _ = _bench.cli(
        ["--quick", "--retries", "0", *(argv or [])],  # a demo reports what it gets
        prog="python -m torch_arena demo",
        name="demo",
        description="Quick stock vs ring vs pool comparison on synthetic data",
    )
    return 0 if all(not r.skipped for r in results) else 1
