"""The HF Trainer with its batches through an arena: no code, or one added line.

    TORCH_ARENA=pool python examples/hf_trainer.py            # nothing in the script
    TORCH_ARENA=pool torchrun --nproc_per_node 2 examples/hf_trainer.py
    python examples/hf_trainer.py --attach pool                # the one line instead

A tiny BERT classifier built from a config in code (nothing downloaded) trains
for a few steps on synthetic token sequences. The Trainer builds plain
DataLoaders and hands them to its ``accelerator``. With ``TORCH_ARENA`` set,
every DataLoader of the process goes through an arena and the script needs no
torch_arena line at all; ``--attach`` shows the explicit form instead:

    torch_arena.accelerate.attach(trainer.accelerator, arena="pool")

A callback reports what the train loader's arena moved (``arena_stats``,
which every loader the arena touched has; 0 batches: stock transport).
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

SEQUENCE = 64


class TokenSequences(Dataset):
    """Sequence ``i``: token ids derived from ``i``; its label is ``i % 2``."""

    def __init__(self, size: int, vocab: int) -> None:
        self.size, self.vocab = size, vocab

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = (torch.arange(SEQUENCE) * (i + 1)) % self.vocab
        return {
            "input_ids": ids,
            "attention_mask": torch.ones(SEQUENCE, dtype=torch.long),
            "labels": torch.tensor(i % 2),
        }


class ArenaReport(TrainerCallback):
    """Keeps the train loader's arena statistics as of the last step."""

    def __init__(self) -> None:
        self.stats: Any = None

    def on_step_end(self, args: Any, state: Any, control: Any, train_dataloader: Any = None, **kwargs: Any) -> None:
        if train_dataloader is not None and hasattr(train_dataloader, "arena_stats"):
            self.stats = train_dataloader.arena_stats


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train for ``--steps`` steps; return the arena statistics of the train loader."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--attach", choices=["pool", "ring"], default=None,
                        help="give the Trainer's loaders an arena in code, instead of TORCH_ARENA")
    args = parser.parse_args(argv)

    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQUENCE,
        num_labels=2,
    )
    report = ArenaReport()
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=8,
            max_steps=args.steps,
            dataloader_num_workers=args.workers,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=args.steps,
        )
        trainer = Trainer(
            model=BertForSequenceClassification(config),
            args=training_args,
            train_dataset=TokenSequences(256, config.vocab_size),
            callbacks=[report],
        )
        if args.attach:
            import torch_arena.accelerate

            torch_arena.accelerate.attach(trainer.accelerator, arena=args.attach)  # the one added line
        result = trainer.train()
        trainer.accelerator.end_training()  # stops the loaders' workers
    batches, fallbacks = (report.stats.batches, report.stats.fallbacks) if report.stats else (0, 0)
    print(
        f"trained {result.global_step} steps, loss {result.training_loss:.3f}; train loader: "
        f"{batches} batches through the arena, {fallbacks} by torch's path"
    )
    return {"steps": result.global_step, "batches": batches, "fallbacks": fallbacks}


if __name__ == "__main__":
    main()
