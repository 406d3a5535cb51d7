"""Run by tests/test_torchrun.py under ``torchrun --nproc_per_node 2``: the
two-rank checks, in one launch. Each rank writes ``rank<N>.json`` into the
folder given as the first argument; the test compares the ranks.

1. Accelerate (MULTI_CPU, gloo): for each dataloader configuration, the
   sample ids a stock ``accelerator.prepare(DataLoader)`` yields on this rank,
   and those ``torch_arena.accelerate.prepare(accelerator, ArenaDataLoader)``
   yields, with what the arena moved.
2. examples/ddp_train.py (DistributedSampler, set_epoch, no Lightning).
3. examples/accelerate_train.py (its end_training ends the process group).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(Path(__file__).resolve().parent)]

import accelerate_train  # noqa: E402
import ddp_train  # noqa: E402
from integration_helpers import Images, Stream, in_arena_memory  # noqa: E402

import torch_arena.accelerate as taa  # noqa: E402
from torch_arena import ArenaDataLoader  # noqa: E402

warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

CONFIGS = {
    "shard": (dict(), dict(shuffle=True)),
    # CPU ranks' device is cpu:N, and Accelerate's placement copies each batch
    # there; without placement the batches are the arena's own views.
    "shard-no-placement": (dict(), dict(shuffle=True, placement=False)),
    "split-batches": (dict(split_batches=True), dict(shuffle=True)),
    "uneven": (dict(even_batches=False), dict(n=42)),
    "even-padded": (dict(), dict(n=42)),
    "dispatch": (dict(dispatch_batches=True), dict(shuffle=True)),
    "iterable": (dict(), dict(iterable=True)),
    "stateful": (dict(use_stateful_dataloader=True), dict(shuffle=True)),
    "skip": (dict(), dict(skip=2)),
}


def ids(batch) -> list[int]:
    return batch[0].tolist()


def run(config: dict, options: dict, arena: bool) -> dict:
    n, skip = options.get("n", 40), options.get("skip", 0)
    dataset = Stream(n) if options.get("iterable") else Images(n)
    kwargs = dict(batch_size=4, num_workers=2)
    if options.get("shuffle"):
        kwargs["shuffle"] = True
    torch.manual_seed(7)  # the same on both ranks, for stock and arena runs alike
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(**config))
    placement = None if options.get("placement", True) else [False]
    if arena:
        loader = ArenaDataLoader(dataset, **kwargs, arena_budget=16 << 20)
        prepared = taa.prepare(accelerator, loader, device_placement=placement)
    else:
        prepared = accelerator.prepare(DataLoader(dataset, **kwargs), device_placement=placement)
    if skip:
        prepared = accelerator.skip_first_batches(prepared, skip)
    epochs, in_arena = [], True
    for _ in range(1 if skip else 2):
        epoch = []
        for batch in prepared:
            epoch.append(ids(batch))
            if arena and type(prepared).__name__ == "DataLoaderShard":
                in_arena = in_arena and in_arena_memory(batch[1])
        epochs.append(epoch)
    result = {"epochs": epochs, "type": type(prepared).__name__}
    if arena:
        stats = prepared.arena_stats
        result.update(base=type(prepared.base_dataloader).__name__, batches=stats.batches,
                      fallbacks=stats.fallbacks, in_arena=in_arena)
        accelerator.free_memory()
        result["released"] = prepared.arena_stats.batches == 0
    return result


def main() -> None:
    out = Path(sys.argv[1])
    report: dict = {"accelerate": {}}
    for name, (config, options) in CONFIGS.items():
        report["accelerate"][name] = {"stock": run(config, options, False), "arena": run(config, options, True)}
    state = Accelerator(cpu=True).state
    report.update(rank=state.process_index, world=state.num_processes, distributed_type=str(state.distributed_type))
    report["ddp_example"] = ddp_train.main(["--epochs", "2", "--samples", "96", "--batch-size", "8"])
    report["accelerate_example"] = accelerate_train.main(["--epochs", "1", "--samples", "96", "--batch-size", "8"])
    (out / f"rank{report['rank']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
