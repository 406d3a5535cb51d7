"""Training with HF Accelerate, batches through an arena.

    torchrun --nproc_per_node 2 examples/accelerate_train.py      # 2 CPU ranks (MULTI_CPU)
    accelerate launch --cpu examples/accelerate_train.py           # one CPU process
    python examples/accelerate_train.py                            # one process

The one line that differs from a stock Accelerate script is
``torch_arena.accelerate.prepare(accelerator, ...)`` in place of
``accelerator.prepare(...)``: Accelerate rebuilds every loader it prepares,
and this keeps the ArenaDataLoader's arena in the rebuilt one.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn

import torch_arena.accelerate
from torch_arena import ArenaDataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_train import IndexedImages, training_arguments  # noqa: E402  (the same data and options)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; return what this rank saw (sample indices per epoch) and what its arena moved."""
    parser = training_arguments(__doc__.splitlines()[0])
    parser.add_argument("--split-batches", action="store_true")
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=args.split_batches))
    dataset = IndexedImages(args.samples)
    loader = ArenaDataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        arena=None if args.arena == "none" else args.arena,
    )
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(3 * 16, dataset.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    # The only torch_arena line: accelerator.prepare(...) would drop the arena.
    model, optimizer, loader = torch_arena.accelerate.prepare(accelerator, model, optimizer, loader)
    loss_fn = nn.CrossEntropyLoss()

    seen: list[list[int]] = []
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        seen.append([])
        for images, labels, indices in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(images), labels)
            accelerator.backward(loss)
            optimizer.step()
            seen[-1].extend(indices.tolist())
        accelerator.print(f"epoch {epoch}: last loss {loss.item():.3f}")
    stats = loader.arena_stats
    print(
        f"rank {accelerator.process_index}/{accelerator.num_processes} ({accelerator.distributed_type}): "
        f"{stats.batches} batches through the arena, {stats.fallbacks} by torch's path"
    )
    summary = {
        "rank": accelerator.process_index,
        "world": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "seen": seen,
        "batches": stats.batches,
        "fallbacks": stats.fallbacks,
    }
    accelerator.end_training()  # releases the arena (and the process group)
    summary["released"] = loader.arena_stats.batches == 0
    return summary


if __name__ == "__main__":
    main()
