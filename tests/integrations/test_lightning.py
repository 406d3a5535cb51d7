"""torch_arena.lightning with real Lightning (no mocks).

The DataModule below writes a JSON report per rank and stage from its
``teardown`` (what the trainer's loaders were, what they moved, which samples
the model saw, and what was left after the arenas were released), so the
ddp_spawn test can check what happened inside the ranks.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from integration_helpers import run_tree
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

L = pytest.importorskip("lightning")

from torch_arena import ArenaDataLoader  # noqa: E402
from torch_arena.lightning import ArenaDataModuleMixin, release_trainer_arenas  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SHAPE = (3, 32, 32)  # 12 KiB per sample: every batch goes through the arena


class IndexedImages(Dataset):
    """Sample ``i`` is ``(i, an image filled with i)``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, torch.full(IMAGE_SHAPE, float(i))


def _describe(loader: Any) -> Optional[dict[str, Any]]:
    if not isinstance(loader, DataLoader):
        return None
    sampler = loader.sampler
    batch_sampler = loader.batch_sampler
    inner = getattr(batch_sampler, "sampler", None)
    return {
        "type": type(loader).__name__,
        "arena": getattr(loader, "arena", "n/a"),
        "arena_budget": getattr(loader, "arena_budget", None),
        "arena_timeout": getattr(loader, "arena_timeout", None),
        "sampler": type(sampler).__name__,
        "inner_sampler": type(inner).__name__,
        "batches": loader.arena_stats.batches if isinstance(loader, ArenaDataLoader) else 0,
        "fallbacks": loader.arena_stats.fallbacks if isinstance(loader, ArenaDataLoader) else 0,
        "has_session": getattr(getattr(loader, "_torch_arena", None), "session", None) is not None,
    }


def _make_classes(pl: Any, prefix: str) -> tuple[type, type]:
    """A model and an ArenaDataModuleMixin DataModule for one Lightning package."""

    class Model(pl.LightningModule):
        def __init__(self, lr: float = 0.05, fail_at: int = -1) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.lr = lr
            self.fail_at = fail_at
            self.seen: list[int] = []

        def _loss(self, batch: Any) -> torch.Tensor:
            _, images = batch
            return self.layer(images.mean(dim=(1, 2, 3)).unsqueeze(1) / 100).pow(2).mean()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if batch_idx == self.fail_at:
                raise RuntimeError("boom in training_step")
            index, images = batch
            assert images.shape[1:] == IMAGE_SHAPE
            assert torch.equal(images[:, 0, 0, 0], index.float())
            self.seen.extend(int(i) for i in index)
            return self._loss(batch)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", self._loss(batch), sync_dist=True)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    class Data(ArenaDataModuleMixin, pl.LightningDataModule):
        def __init__(
            self,
            num_samples: int = 64,
            num_val: int = 16,
            batch_size: int = 8,
            num_workers: int = 2,
            persistent_workers: bool = False,
            cache_val: bool = False,
            out_dir: Optional[str] = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(**kwargs)
            self.num_samples = num_samples
            self.num_val = num_val
            self.batch_size = batch_size
            self.num_workers = num_workers
            self.persistent_workers = persistent_workers
            self.cache_val = cache_val
            self.out_dir = out_dir
            self.cached_val: Optional[DataLoader] = None

        def setup(self, stage: str) -> None:
            self.train_set = IndexedImages(self.num_samples)
            self.val_set = IndexedImages(self.num_val)
            if self.cache_val:
                # Built outside a hook: Lightning rebuilds it from its attributes.
                self.cached_val = self.arena_dataloader(self.val_set, batch_size=self.batch_size, num_workers=1)

        def train_dataloader(self) -> DataLoader:
            return self.arena_dataloader(
                self.train_set,
                batch_size=self.batch_size,
                shuffle=True,
                num_workers=self.num_workers,
                persistent_workers=self.persistent_workers,
            )

        def val_dataloader(self) -> DataLoader:
            if self.cached_val is not None:
                return self.cached_val
            return self.arena_dataloader(self.val_set, batch_size=self.batch_size, num_workers=1)

        def teardown(self, stage: str) -> None:
            trainer = self.trainer
            report: Optional[dict[str, Any]] = None
            if self.out_dir is not None and trainer is not None:
                loaders = {"train": trainer.train_dataloader, "val": trainer.val_dataloaders}
                report = {
                    "rank": trainer.global_rank,
                    "world_size": trainer.world_size,
                    "stage": str(getattr(stage, "value", stage)),
                    "before": {name: _describe(dl) for name, dl in loaders.items()},
                    "seen": list(trainer.lightning_module.seen),
                }
            super().teardown(stage)  # releases the arenas
            if report is not None:
                import psutil

                report["after"] = {name: _describe(dl) for name, dl in loaders.items()}
                report["tracked_sessions"] = sum(
                    dl._torch_arena.session is not None for dl in list(self._arena_tracked())
                )
                report["children"] = [
                    p.pid for p in psutil.Process().children(recursive=True) if not _is_mp_helper(p)
                ]
                path = Path(self.out_dir) / f"{report['stage']}-rank{report['rank']}.json"
                path.write_text(json.dumps(report))

    # Picklable by reference (ddp_spawn sends the model and DataModule to the ranks).
    for cls, name in ((Model, f"{prefix}Model"), (Data, f"{prefix}Data")):
        cls.__name__ = cls.__qualname__ = name
    return Model, Data


LitModel, LitData = _make_classes(L, "Lit")


def _trainer(pl: Any, tmp_path: Path, **kwargs: Any) -> Any:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def _read_report(tmp_path: Path, stage: str, rank: int) -> dict[str, Any]:
    return json.loads((tmp_path / f"{stage}-rank{rank}.json").read_text())


def _is_mp_helper(proc: Any) -> bool:
    """multiprocessing's own long-lived helpers (forkserver, resource tracker),
    which an earlier test in the same session may have started."""
    try:
        cmdline = " ".join(proc.cmdline())
    except Exception:
        return False
    return "multiprocessing.forkserver" in cmdline or "multiprocessing.resource_tracker" in cmdline


def _wait_no_children(before: set[int], timeout: float = 10.0) -> list[str]:
    """New child processes of this test process (multiprocessing's resource
    tracker, started once per process and kept, is not one of ours)."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        stray = []
        for proc in psutil.Process().children(recursive=True):
            try:
                cmdline = " ".join(proc.cmdline())
                if proc.pid in before or "resource_tracker" in cmdline or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.Error:
                continue
            stray.append(f"{proc.pid}: {cmdline}")
        if not stray or time.monotonic() > deadline:
            return stray
        time.sleep(0.2)


def _tagged_processes(tag: str, timeout: float = 10.0) -> list[str]:
    """Live processes (anywhere, orphans included) whose environment carries
    ``TORCH_ARENA_TEST_TAG=tag``: everything started during a test inherits it."""
    import psutil

    deadline = time.monotonic() + timeout
    me = os.getpid()
    while True:
        found = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.pid == me or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                if proc.environ().get("TORCH_ARENA_TEST_TAG") != tag:
                    continue
                cmdline = " ".join(proc.cmdline())
                if proc.ppid() == me and "resource_tracker" in cmdline:
                    continue  # this process's own multiprocessing helper, kept for its lifetime
                found.append(f"{proc.pid}: {cmdline}")
            except psutil.Error:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


# -- Lightning's re-instantiation ----------------------------------------------------


@pytest.mark.parametrize("built", ["in_hook", "cached"])
@pytest.mark.parametrize("stage", ["train", "predict"])
def test_lightning_reinstantiation_keeps_arena_settings(built: str, stage: str) -> None:
    """Lightning's own ``_update_dataloader`` (what DDP and predict use) keeps
    the type and every arena setting, for a loader made in a hook (its
    constructor call replayed) and one made elsewhere (rebuilt from attributes)."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader

    dm = LitData(arena="ring", arena_budget=3 << 20, arena_timeout=1.5, arena_overflow="raise", arena_threshold=1024)
    dm.setup("fit")
    if built == "in_hook":
        # Exactly how Lightning calls a *_dataloader hook (data_connector._request_dataloader).
        with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
            original = dm.train_dataloader()
        assert hasattr(original, "__pl_saved_kwargs")
    else:
        original = dm.train_dataloader()
        assert not hasattr(original, "__pl_saved_kwargs")
    assert type(original) is ArenaDataLoader

    sampler = DistributedSampler(dm.train_set, num_replicas=2, rank=1, shuffle=False)
    mode = RunningStage.TRAINING if stage == "train" else RunningStage.PREDICTING
    copy = _update_dataloader(original, sampler, mode=mode)

    assert copy is not original
    assert type(copy) is ArenaDataLoader
    for key in ("arena", "arena_budget", "arena_overflow", "arena_timeout", "arena_threshold"):
        assert getattr(copy, key) == getattr(original, key), key
    assert (copy.arena, copy.arena_budget, copy.arena_timeout) == ("ring", 3 << 20, 1.5)
    assert (copy.arena_overflow, copy.arena_threshold) == ("raise", 1024)
    assert copy.num_workers == original.num_workers == 2
    if stage == "train":
        assert copy.sampler is sampler
        assert copy.batch_size == 8
    else:  # predict wraps the batch sampler to track indices
        assert type(copy.batch_sampler).__name__ == "_IndexBatchSamplerWrapper"
    assert copy._torch_arena.session is None  # nothing allocated by the copy


def test_reinstantiated_copy_moves_batches_through_its_own_arena() -> None:
    from lightning.pytorch.utilities.data import _update_dataloader

    dm = LitData(arena="pool", arena_budget=2 << 20, num_workers=1)
    dm.setup("fit")
    original = dm.train_dataloader()
    copy = _update_dataloader(original, DistributedSampler(dm.train_set, num_replicas=2, rank=0, shuffle=False))
    seen = [int(i) for index, _ in copy for i in index]
    assert seen == list(range(0, 64, 2))
    assert copy.arena_stats.batches == 4 and copy.arena_stats.fallbacks == 0
    assert original._torch_arena.session is None
    copy.release_arena()
    assert copy._torch_arena.session is None


# -- single-process fits ----------------------------------------------------------------


def test_fit_single_process_ring_and_teardown(tmp_path: Path) -> None:
    before = _children()
    dm = LitData(arena="ring", num_workers=2, persistent_workers=True, out_dir=str(tmp_path))
    trainer = _trainer(L, tmp_path)
    trainer.fit(LitModel(), datamodule=dm)

    report = _read_report(tmp_path, "fit", 0)
    train, val = report["before"]["train"], report["before"]["val"]
    assert train["type"] == val["type"] == "ArenaDataLoader"
    assert train["arena"] == val["arena"] == "ring"
    assert train["batches"] == 8 and train["fallbacks"] == 0
    assert val["batches"] == 2
    assert train["has_session"]
    assert sorted(report["seen"]) == list(range(64))
    # teardown released everything and stopped the persistent workers
    assert not report["after"]["train"]["has_session"]
    assert not report["after"]["val"]["has_session"]
    assert report["tracked_sessions"] == 0
    assert report["children"] == []
    assert trainer.train_dataloader._torch_arena.session is None
    assert _wait_no_children(before) == []


def test_fit_with_pytorch_lightning_package(tmp_path: Path) -> None:
    pl = pytest.importorskip("pytorch_lightning")
    Model, Data = _make_classes(pl, "PL")
    dm = Data(arena="pool", num_workers=2, out_dir=str(tmp_path))
    assert isinstance(dm, pl.LightningDataModule) and not isinstance(dm, L.LightningDataModule)
    trainer = _trainer(pl, tmp_path)
    trainer.fit(Model(), datamodule=dm)

    report = _read_report(tmp_path, "fit", 0)
    train = report["before"]["train"]
    assert train["type"] == "ArenaDataLoader" and train["arena"] == "pool"
    assert train["batches"] == 8 and train["fallbacks"] == 0
    assert sorted(report["seen"]) == list(range(64))
    assert not report["after"]["train"]["has_session"]
    assert report["children"] == []


@pytest.mark.parametrize("persistent", [True, False])
def test_on_exception_releases_arenas(tmp_path: Path, persistent: bool) -> None:
    before = _children()
    dm = LitData(arena="pool", num_workers=2, persistent_workers=persistent)
    trainer = _trainer(L, tmp_path, limit_val_batches=0)
    with pytest.raises(RuntimeError, match="boom in training_step"):
        trainer.fit(LitModel(fail_at=3), datamodule=dm)
    loader = trainer.train_dataloader
    assert isinstance(loader, ArenaDataLoader)
    assert loader in set(dm._arena_tracked())
    # teardown does not run on an exception: on_exception released the arena
    assert loader._torch_arena.session is None
    assert loader.arena_stats.batches == 0  # the statistics went with the arena
    assert _wait_no_children(before) == []


def test_release_arenas_finds_loaders_only_the_trainer_holds(tmp_path: Path) -> None:
    """A loader passed straight to ``fit`` (no DataModule): ``release_trainer_arenas``."""
    dm = LitData(arena="ring", num_workers=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    trainer = _trainer(L, tmp_path, limit_val_batches=0)
    trainer.fit(LitModel(), train_dataloaders=loader)
    assert trainer.train_dataloader is loader
    assert loader._torch_arena.session is not None and loader.arena_stats.batches == 8
    release_trainer_arenas(trainer)
    assert loader._torch_arena.session is None


# -- DataModule construction, pickling, bad input ---------------------------------------------


def test_defaults_and_stock_transport() -> None:
    dm = LitData()
    assert dm.arena == "pool"  # the class attribute default_arena
    assert (dm.arena_budget, dm.arena_overflow, dm.arena_timeout) == (None, "fallback", 2.0)

    class RingByDefault(LitData):
        default_arena = "ring"

    assert RingByDefault().arena == "ring"
    assert RingByDefault(arena="pool").arena == "pool"

    for off in ("none", None):
        stock = LitData(arena="none") if off == "none" else RingByDefault(arena="none")
        assert stock.arena is None
        stock.setup("fit")
        loader = stock.train_dataloader()
        assert type(loader) is DataLoader
    # per-loader override
    dm.setup("fit")
    assert type(dm.arena_dataloader(dm.val_set, arena="none")) is DataLoader
    ring = dm.arena_dataloader(dm.val_set, arena="ring", arena_budget=1 << 20, num_workers=1)
    assert (ring.arena, ring.arena_budget) == ("ring", 1 << 20)


def test_num_workers_zero_is_stock() -> None:
    dm = LitData(arena="pool", num_workers=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, ArenaDataLoader) and not loader.uses_arena
    seen = sorted(int(i) for index, _ in loader for i in index)
    assert seen == list(range(64))
    assert loader._torch_arena.session is None and loader.arena_stats.batches == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"arena": "bogus"}, "arena must be 'pool', 'ring', 'none' or None"),
        ({"arena": "Pool"}, "arena must be 'pool', 'ring'"),
        ({"arena": 1}, "arena must be 'pool', 'ring'"),
        ({"arena_budget": -1}, "arena_budget must be a positive number of bytes"),
        ({"arena_budget": 0}, "arena_budget must be a positive number of bytes"),
        ({"arena_budget": 1.5}, "arena_budget must be a positive number of bytes"),
        ({"arena_overflow": "drop"}, "arena_overflow must be 'fallback' or 'raise'"),
        ({"arena_timeout": -1}, "arena_timeout must be a number of seconds"),
        ({"arena_threshold": -5}, "arena_threshold must be an int"),
    ],
)
def test_bad_input_fails_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        LitData(**kwargs)
    assert "LitData" in str(info.value)


def test_bad_per_loader_override() -> None:
    dm = LitData()
    dm.setup("fit")
    with pytest.raises(ValueError, match="arena must be 'pool', 'ring'"):
        dm.arena_dataloader(dm.val_set, arena="shm")
    with pytest.raises(ValueError, match="arena_budget"):
        dm.arena_dataloader(dm.val_set, arena_budget=-3)


def test_datamodule_pickles_and_tracks_weakly() -> None:
    dm = LitData(arena="ring", num_workers=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert sum(1 for _ in loader) == 8  # a live arena
    assert len(dm._arena_tracked()) == 1
    clone = pickle.loads(pickle.dumps(dm))  # what ddp_spawn does
    assert "_arena_loaders" not in clone.__dict__
    assert clone.arena == "ring" and len(clone._arena_tracked()) == 0
    dm.release_arenas()
    assert loader._torch_arena.session is None
    del loader
    gc.collect()
    assert len(dm._arena_tracked()) == 0  # the DataModule does not keep loaders alive


# -- LightningCLI ------------------------------------------------------------------------------


def _cli(args: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", [sys.argv[0]])  # only ``args`` counts
    return LightningCLI(
        LitModel,
        LitData,
        run=False,
        args=args,
        save_config_callback=None,
        trainer_defaults={"logger": False, "enable_checkpointing": False},
    )


def test_cli_arena_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = _cli(["--data.arena", "ring", "--data.arena_budget", "4194304", "--data.batch_size", "4"], monkeypatch)
    assert cli.config.data.arena == "ring"
    assert isinstance(cli.datamodule, LitData)
    assert (cli.datamodule.arena, cli.datamodule.arena_budget, cli.datamodule.batch_size) == ("ring", 4 << 20, 4)
    assert _cli([], monkeypatch).datamodule.arena == "pool"
    assert _cli(["--data.arena", "none"], monkeypatch).datamodule.arena is None
    # and from a YAML config
    config = tmp_path / "config.yaml"
    config.write_text("data:\n  arena: ring\n  arena_overflow: raise\n")
    dm = _cli(["--config", str(config)], monkeypatch).datamodule
    assert (dm.arena, dm.arena_overflow) == ("ring", "raise")


def test_cli_rejects_bogus_arena(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        _cli(["--data.arena", "bogus"], monkeypatch)
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "bogus" in err and "arena" in err


# -- the example script ---------------------------------------------------------------------------


def test_example_script_runs(tmp_path: Path) -> None:
    pytest.importorskip("jsonargparse")
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "lightning_train.py"),
        "fit",
        "--data.arena",
        "pool",
        "--data.num_samples",
        "64",
        "--data.image_size",
        "32",
        "--trainer.max_epochs",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = run_tree(cmd, cwd=tmp_path, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train loader: pool arena" in proc.stdout, proc.stdout


# -- a real DDP fit (two ranks, ddp_spawn) ------------------------------------------------------------


@pytest.mark.slow
def test_ddp_spawn_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks: each gets an ArenaDataLoader copy with the flag and a
    DistributedSampler (train built in a hook, val cached in setup()), the
    ranks together see every sample exactly once, batches go through each
    rank's own arena, and nothing is left behind."""
    shm_before = set(os.listdir("/dev/shm"))
    before = _children()
    tag = f"ddp-{os.getpid()}-{time.time_ns()}"
    monkeypatch.setenv("TORCH_ARENA_TEST_TAG", tag)  # inherited by ranks, workers, trackers
    dm = LitData(
        arena="pool",
        arena_budget=4 << 20,
        num_samples=64,
        num_val=16,
        batch_size=8,
        num_workers=2,
        persistent_workers=True,
        cache_val=True,
        out_dir=str(tmp_path),
    )
    trainer = _trainer(L, tmp_path, strategy="ddp_spawn", devices=2)
    started = time.monotonic()
    trainer.fit(LitModel(), datamodule=dm)
    print(f"ddp_spawn fit took {time.monotonic() - started:.1f} s")

    reports = [_read_report(tmp_path, "fit", rank) for rank in (0, 1)]
    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["world_size"] == 2
        for name in ("train", "val"):
            loader = report["before"][name]
            assert loader["type"] == "ArenaDataLoader", (rank, name, loader)
            assert (loader["arena"], loader["arena_budget"]) == ("pool", 4 << 20), (rank, name, loader)
            assert "DistributedSampler" in (loader["sampler"], loader["inner_sampler"]), (rank, name, loader)
            assert loader["batches"] > 0 and loader["fallbacks"] == 0, (rank, name, loader)
            assert loader["has_session"]
            assert not report["after"][name]["has_session"], (rank, name)
        assert report["before"]["train"]["batches"] == 4  # 32 samples per rank
        assert len(report["seen"]) == 32
        assert report["tracked_sessions"] == 0
        assert report["children"] == [], f"rank {rank} kept child processes"
    seen = reports[0]["seen"] + reports[1]["seen"]
    assert sorted(seen) == list(range(64)), "the ranks did not see every sample exactly once"
    assert set(reports[0]["seen"]).isdisjoint(reports[1]["seen"])

    assert _wait_no_children(before) == []
    monkeypatch.delenv("TORCH_ARENA_TEST_TAG")
    assert _tagged_processes(tag) == [], "processes of the run are still alive"
    assert set(os.listdir("/dev/shm")) - shm_before == set()
