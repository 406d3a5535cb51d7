"""``python -m torch_arena demo``: the quick A/B transport comparison, told to a newcomer.

The transport benchmark of :mod:`torch_arena._tools.bench` on a short matrix (32 MiB
batches of bytes, numpy arrays, tensors and collated tensor samples; stock vs
ring vs pool, plus SPDL's pool where installed): a few minutes on 2 cores.

Who runs the demo is deciding whether to use torch_arena, so it prints what
that decision rests on: the summary in words and the per-payload table
(throughput, main-process and worker CPU per batch, peak memory, each against
torch's own transport), then where the figure and the files went. The full
engineering table stays in ``<out>/demo.txt`` (``--full`` prints it too); the
acceptance targets are judged only with ``--targets``.
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
        full=False,
    )
    return 0 if all(not r.skipped for r in results) else 1
