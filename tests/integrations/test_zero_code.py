"""Unchanged scripts of each stack with only TORCH_ARENA set: their batches go through the arena.

Every script here imports no torch_arena: the variable, read by the start-up
hook of each interpreter (the launcher's, the ranks', the workers'), is the
only difference between the two runs of a test, and the batches must be
those of the stock run.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from integration_helpers import run_tree

REPO = Path(__file__).resolve().parents[2]

COMMON = '''
import json, sys
import torch
from torch.utils.data import DataLoader, Dataset

class Items(Dataset):
    def __init__(self, n=40):
        self.n = n
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        return i, torch.full((3, 32, 32), float(i))

def stats(loader):
    s = getattr(loader, "arena_stats", None)
    return {"batches": s.batches, "fallbacks": s.fallbacks} if s is not None else None

def maps_arena():
    with open("/proc/self/maps") as f:
        return "/memfd:torch_arena" in f.read()

def report(result):
    # one file per process: the ranks of a launcher share one stdout, where
    # two lines printed at once can run into each other
    import os
    with open(f"result-{os.getpid()}.json", "w") as f:
        json.dump(result, f)
'''


def run_script(tmp_path: Path, body: str, variable: str | None, *launcher: str, timeout: float = 240) -> list[dict]:
    """Run ``body`` (after COMMON) with or without TORCH_ARENA; each process
    that reports a result counts (a launcher runs several)."""
    script = tmp_path / "script.py"
    script.write_text(COMMON + textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_ARENA")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    if variable is not None:
        env["TORCH_ARENA"] = variable
    cmd = [*(launcher or (sys.executable,)), str(script)]
    proc = run_tree(cmd, cwd=tmp_path, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(path.read_text()) for path in sorted(tmp_path.glob("result-*.json"))]


def both(tmp_path: Path, body: str, *launcher: str, timeout: float = 240) -> tuple[list[dict], list[dict]]:
    (tmp_path / "stock").mkdir()
    (tmp_path / "arena").mkdir()
    stock = run_script(tmp_path / "stock", body, None, *launcher, timeout=timeout)
    arena = run_script(tmp_path / "arena", body, "pool", *launcher, timeout=timeout)
    return stock, arena


STATEFUL = '''
from torchdata.stateful_dataloader import StatefulDataLoader

def make():
    g = torch.Generator().manual_seed(3)
    return StatefulDataLoader(Items(), batch_size=4, num_workers=2, shuffle=True, generator=g)

if __name__ == "__main__":
    first = make()
    head = []
    for step, (ids, _) in enumerate(first):
        head.append(ids.tolist())
        if step == 3:
            break
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    tail = [ids.tolist() for ids, _ in resumed]
    report({"head": head, "tail": tail, "first": stats(first), "resumed": stats(resumed),
            "mapped": maps_arena()})
'''


@pytest.mark.slow
def test_stateful_dataloader_checkpoint_and_resume_give_stocks_batches(tmp_path):
    [stock], [arena] = both(tmp_path, STATEFUL)
    assert (arena["head"], arena["tail"]) == (stock["head"], stock["tail"]) and len(arena["tail"]) == 6
    assert stock["first"] is None and stock["mapped"] is False
    assert arena["first"]["batches"] >= 4 and arena["resumed"] == {"batches": 6, "fallbacks": 0}
    assert arena["mapped"]


ACCELERATE = '''
from accelerate import Accelerator

if __name__ == "__main__":
    acc = Accelerator(cpu=True)
    prepared = acc.prepare(DataLoader(Items(), batch_size=4, num_workers=2, shuffle=False))
    epochs = [[ids.tolist() for ids, _ in prepared] for _ in range(2)]
    report({"rank": acc.process_index, "epochs": epochs, "stats": stats(prepared),
            "type": type(prepared).__name__})
    acc.end_training()
'''


@pytest.mark.slow
def test_accelerate_prepare_one_process(tmp_path):
    [stock], [arena] = both(tmp_path, ACCELERATE)
    assert arena["epochs"] == stock["epochs"] and arena["type"] == stock["type"] == "DataLoaderShard"
    assert stock["stats"] is None and arena["stats"] == {"batches": 20, "fallbacks": 0}


@pytest.mark.slow
def test_accelerate_prepare_two_torchrun_ranks(tmp_path):
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    stock, arena = both(tmp_path, ACCELERATE, *torchrun, timeout=300)
    by_rank = {r["rank"]: r for r in stock}, {r["rank"]: r for r in arena}
    assert sorted(by_rank[0]) == sorted(by_rank[1]) == [0, 1]
    for rank in (0, 1):
        assert by_rank[1][rank]["epochs"] == by_rank[0][rank]["epochs"], rank  # each rank: stock's shard
        assert by_rank[1][rank]["stats"]["batches"] == 2 * len(by_rank[0][rank]["epochs"][0]) > 0
        assert by_rank[1][rank]["stats"]["fallbacks"] == 0
    seen = sorted(i for r in arena for batch in r["epochs"][0] for i in batch)
    assert seen == list(range(40))  # the ranks share the data as stock's do


LIGHTNING = '''
import os
import lightning as L

class Data(L.LightningDataModule):  # a plain DataModule: no torch_arena anywhere
    def train_dataloader(self):
        return DataLoader(Items(32), batch_size=4, num_workers=2)

class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3 * 32 * 32, 1)
        self.seen = []
    def training_step(self, batch, _):
        ids, x = batch
        self.seen += ids.tolist()
        return self.layer(x.flatten(1)).mean()
    def on_train_end(self):
        loader = self.trainer.train_dataloader
        out = os.environ["OUT_DIR"]
        with open(f"{out}/rank{self.global_rank}.json", "w") as f:
            json.dump({"seen": self.seen, "stats": stats(loader), "mapped": maps_arena()}, f)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

if __name__ == "__main__":
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1,
                        enable_progress_bar=False, enable_model_summary=False, logger=False,
                        enable_checkpointing=False)
    trainer.fit(Model(), datamodule=Data())
    report({"done": True})
'''


@pytest.mark.slow
def test_lightning_fit_with_a_plain_datamodule_under_ddp_spawn(tmp_path):
    results = {}
    for name, variable in (("stock", None), ("arena", "pool")):
        out = tmp_path / name
        out.mkdir()
        os.environ["OUT_DIR"] = str(out)
        try:
            assert run_script(out, LIGHTNING, variable, timeout=400) == [{"done": True}]
        finally:
            del os.environ["OUT_DIR"]
        results[name] = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in (0, 1):
        stock, arena = results["stock"][rank], results["arena"][rank]
        assert arena["seen"] == stock["seen"] and len(arena["seen"]) == 16  # DistributedSampler's half
        assert stock["stats"] is None and not stock["mapped"]
        assert arena["stats"] == {"batches": 4, "fallbacks": 0} and arena["mapped"]
