"""Data-parallel training with torchrun and ArenaDataLoader, no Lightning.

    torchrun --nproc_per_node 2 examples/ddp_train.py          # 2 CPU ranks (gloo)
    python examples/ddp_train.py                                # one process

Each rank builds its own ArenaDataLoader (so its own arena) over its
DistributedSampler shard, and calls ``sampler.set_epoch(epoch)`` each epoch
as with a stock DataLoader. Nothing else differs from a stock DDP script.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from torch_arena import ArenaDataLoader


class IndexedImages(Dataset):
    """Sample ``i``: an image whose mean encodes its class, its class, and ``i``."""

    def __init__(self, size: int, resolution: int = 32, classes: int = 10) -> None:
        self.size, self.resolution, self.classes = size, resolution, classes

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        label = index % self.classes
        generator = torch.Generator().manual_seed(index)
        image = torch.randn(3, self.resolution, self.resolution, generator=generator) + label / self.classes
        return image, label, index


def training_arguments(description: str) -> argparse.ArgumentParser:
    """The command-line options this example shares with accelerate_train.py."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--arena", choices=["pool", "ring", "none"], default="pool")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; return what this rank saw (sample indices per epoch) and what its arena moved."""
    args = training_arguments(__doc__.splitlines()[0]).parse_args(argv)

    distributed = "RANK" in os.environ  # started by torchrun
    own_group = distributed and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    dataset = IndexedImages(args.samples)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = ArenaDataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        arena=None if args.arena == "none" else args.arena,
    )
    model: nn.Module = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(3 * 16, dataset.classes))
    if distributed:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = nn.CrossEntropyLoss()

    seen: list[list[int]] = []
    try:
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
            seen.append([])
            total, count = 0.0, 0
            for images, labels, indices in loader:
                optimizer.zero_grad()
                loss = loss_fn(model(images), labels)
                loss.backward()
                optimizer.step()
                seen[-1].extend(indices.tolist())
                total, count = total + loss.item() * len(labels), count + len(labels)
            print(f"rank {rank}/{world} epoch {epoch}: loss {total / count:.3f} over {count} samples")
        stats = loader.arena_stats
        print(f"rank {rank}: {stats.batches} batches through the arena, {stats.fallbacks} by torch's path")
        return {"rank": rank, "world": world, "seen": seen, "batches": stats.batches, "fallbacks": stats.fallbacks}
    finally:
        loader.release_arena()  # stop the persistent workers, free the arena
        if own_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
