"""A small training loop on synthetic images, with the transport as a flag.

    python examples/train.py --arena pool    # or ring, or none (torch's default)

The only change from a stock script is ``ArenaDataLoader`` in place of
``DataLoader``. It prints the loss, throughput and what the arena moved.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import Dataset

from torch_arena import ArenaDataLoader


class SyntheticImages(Dataset):
    """Deterministic 3×H×W images whose class is encoded in their mean."""

    def __init__(self, size: int, resolution: int, classes: int) -> None:
        self.size, self.resolution, self.classes = size, resolution, classes

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = index % self.classes
        generator = torch.Generator().manual_seed(index)
        image = torch.randn(3, self.resolution, self.resolution, generator=generator) + label / self.classes
        return image, label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arena", choices=["pool", "ring", "none"], default="pool")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    classes = 10
    loader = ArenaDataLoader(
        SyntheticImages(args.samples, args.resolution, classes),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        arena=None if args.arena == "none" else args.arena,
    )
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(3 * 16, classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = nn.CrossEntropyLoss()

    for epoch in range(args.epochs):
        start, seen, total = time.perf_counter(), 0, 0.0
        for images, labels in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
            seen += len(labels)
            total += loss.detach().item() * len(labels)
        elapsed = time.perf_counter() - start
        print(f"epoch {epoch}: loss {total / seen:.3f}, {seen / elapsed:.0f} samples/s")
    stats = loader.arena_stats
    print(f"arena={args.arena}: {stats.batches} batches ({stats.bytes / 2**20:.1f} MiB) through the arena, "
          f"{stats.fallbacks} by torch's path, producers waited {stats.wait_seconds:.3f} s")


if __name__ == "__main__":
    main()
