"""Checkpoint a loader mid-epoch, resume it in a new loader, get the same batches.

    python examples/stateful_resume.py --stop-at 5

Runs one epoch without interruption (the reference), then the same epoch
again, saving ``loader.state_dict()`` with ``torch.save`` after ``--stop-at``
batches, and resumes a brand-new ArenaStatefulDataLoader from that file. The
resumed batches must equal the reference's batches from there on.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from torch_arena.torchdata import ArenaStatefulDataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_train import IndexedImages  # noqa: E402  (the same synthetic dataset)


def make_loader(args: argparse.Namespace) -> ArenaStatefulDataLoader:
    """A shuffled, checkpointable loader through a pool arena."""
    return ArenaStatefulDataLoader(
        IndexedImages(args.samples),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        num_workers=args.workers,
        snapshot_every_n_steps=args.snapshot_every,
        arena="pool",
    )


def main(argv: list[str] | None = None) -> bool:
    """Return whether the resumed batches equal the uninterrupted ones."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stop-at", type=int, default=5, help="batches before the checkpoint")
    parser.add_argument("--snapshot-every", type=int, default=4, help="snapshot_every_n_steps")
    args = parser.parse_args(argv)

    reference = [indices.tolist() for _, _, indices in make_loader(args)]

    loader = make_loader(args)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint.pt")
        for step, (_, _, indices) in enumerate(loader):
            if step + 1 == args.stop_at:
                torch.save({"loader": loader.state_dict()}, path)
                break
        loader.release_arena()  # the run "crashes" here

        resumed_loader = make_loader(args)  # e.g. in a new process
        resumed_loader.load_state_dict(torch.load(path)["loader"])
        resumed = [indices.tolist() for _, _, indices in resumed_loader]
    same = resumed == reference[args.stop_at :]
    stats = resumed_loader.arena_stats
    print(f"resumed after {args.stop_at} batches: {len(resumed)} batches, same as uninterrupted: {same}")
    print(f"resumed loader: {stats.batches} batches through the arena (fast-forward included), "
          f"{stats.fallbacks} by torch's path")
    resumed_loader.release_arena()
    return same


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
