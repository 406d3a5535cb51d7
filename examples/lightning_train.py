"""Train a small CNN on synthetic images with LightningCLI, batches through an arena.

    python examples/lightning_train.py fit --data.arena pool --trainer.max_epochs 1
    python examples/lightning_train.py fit --data.arena ring
    python examples/lightning_train.py fit --data.arena none     # torch's stock transport
    python examples/lightning_train.py fit --data.arena pool --trainer.strategy ddp_spawn --trainer.devices 2
    python examples/lightning_train.py fit --print_config        # the YAML config, arena settings included

The defaults are small (512 images of 3x64x64, one epoch) so it runs in seconds
on a laptop CPU; raise ``--data.num_samples`` / ``--data.image_size`` to see
the transport matter. At the end each rank prints what its loaders moved
through their arenas. Needs ``lightning`` and ``jsonargparse[signatures]``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from torch_arena import ArenaDataLoader
from torch_arena.lightning import ArenaDataModuleMixin


class SyntheticImages(Dataset):
    """Deterministic noisy images whose mean brightness depends on the label."""

    def __init__(self, num_samples: int, image_size: int, num_classes: int, seed: int) -> None:
        self.num_samples = num_samples
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = index % self.num_classes
        size = self.image_size
        image = torch.randn(3, size, size, generator=generator) * 0.5 + label / self.num_classes
        return image, label


class SyntheticImageData(ArenaDataModuleMixin, L.LightningDataModule):
    """Synthetic train/val images; ``--data.arena`` picks the transport."""

    def __init__(
        self,
        batch_size: int = 32,
        num_workers: int = 2,
        num_samples: int = 512,
        image_size: int = 64,
        num_classes: int = 10,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            batch_size: Images per batch.
            num_workers: DataLoader worker processes per loader (0: no arena).
            num_samples: Training images (validation gets a quarter as many).
            image_size: Height and width of the images.
            num_classes: Number of labels.
        """
        super().__init__(**kwargs)  # arena, arena_budget, arena_overflow, ...
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.num_samples = num_samples
        self.image_size = image_size
        self.num_classes = num_classes

    def setup(self, stage: str) -> None:
        self.train_set = SyntheticImages(self.num_samples, self.image_size, self.num_classes, seed=0)
        self.val_set = SyntheticImages(max(1, self.num_samples // 4), self.image_size, self.num_classes, seed=1)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return self.arena_dataloader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,  # one arena for the whole run
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def teardown(self, stage: str) -> None:
        trainer = self.trainer
        if trainer is not None:
            for name, loader in (("train", trainer.train_dataloader), ("val", trainer.val_dataloaders)):
                if isinstance(loader, ArenaDataLoader) and loader.uses_arena:
                    stats = loader.arena_stats
                    print(
                        f"[rank {trainer.global_rank}] {name} loader: {loader.arena} arena, "
                        f"{stats.batches} batches, {stats.bytes / 2**20:.1f} MiB moved, "
                        f"{stats.fallbacks} fallbacks, producers waited {stats.wait_seconds:.2f} s",
                        flush=True,
                    )
                elif isinstance(loader, DataLoader):
                    print(f"[rank {trainer.global_rank}] {name} loader: stock transport", flush=True)
        super().teardown(stage)  # releases the arenas: keep this call


class SmallCNN(L.LightningModule):
    """Two strided convolutions and a linear classifier."""

    def __init__(self, num_classes: int = 10, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("val_loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.log("val_acc", (logits.argmax(dim=1) == labels).float().mean(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    LightningCLI(
        SmallCNN,
        SyntheticImageData,
        trainer_defaults={
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
        },
        save_config_callback=None,
    )


if __name__ == "__main__":  # required: ddp_spawn and spawn workers re-import this file
    main()
