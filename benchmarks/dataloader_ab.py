"""Issue 3's benchmark: stock vs ring vs pool DataLoader transport, 2 workers.

Two cases, 32 MiB per batch:

* ``numpy``: 32 MiB numpy items, ``batch_size=None``;
* ``torch-x8``: 8 x 4 MiB tensor samples per batch, default collate. Every
  sample is a fresh tensor (torch moves a tensor into shared memory in place
  on its first send, so a reused tensor would hide the cost); the
  ``dataset-only`` row fetches every batch exactly the same way and its collate
  function drops it: its worker CPU is the dataset's own cost, subtracted to
  give the transfer cost (``xfer ms``).

Reports MB/s (mean, 95% CI over windows), main-process CPU per batch and worker
CPU per batch (psutil on the worker pids while they are alive; cross-checked
against RUSAGE_CHILDREN after they are joined). Method: :mod:`torch_arena._tools.bench`.

    python benchmarks/dataloader_ab.py [--quick] [--out DIR]
"""

import sys

from torch_arena._tools.bench import COLLATED_KIND, DATASET_ONLY, cli

if __name__ == "__main__":
    results, _ = cli(
        sys.argv[1:],
        prog="benchmarks/dataloader_ab.py",
        name="dataloader_ab",
        description="stock vs ring vs pool: 32 MiB numpy items and 8 x 4 MiB collated tensors",
        defaults={
            "kinds": ["numpy", COLLATED_KIND],
            "sizes": [32.0],
            "transports": ["stock", "ring", "pool", DATASET_ONLY],
        },
    )
    sys.exit(0 if all(not r.skipped for r in results) else 1)
