"""Lightning beyond fit: validate, test and predict loops through the arena,
``arena_dataloader(arena=<instance>)``, and ``on_exception``'s error handling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

import torch_arena as ta  # noqa: E402
from test_lightning import IndexedImages, L, LitData, LitModel, _trainer  # noqa: E402

BATCH = 8


class LoopModel(LitModel):
    """Checks every batch it is given and counts what the loader moved so far."""

    def __init__(self) -> None:
        super().__init__()
        self.checked: dict[str, list[int]] = {"val": [], "test": [], "predict": []}
        self.arena_batches: dict[str, int] = {}

    def _check(self, stage: str, batch: Any, loader: Any) -> torch.Tensor:
        index, images = batch
        assert torch.equal(images[:, 0, 0, 0], index.float())
        self.checked[stage].extend(int(i) for i in index)
        self.arena_batches[stage] = loader.arena_stats.batches
        return index

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._check("val", batch, self.trainer.val_dataloaders)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._check("test", batch, self.trainer.test_dataloaders)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._check("predict", batch, self.trainer.predict_dataloaders)


class LoopData(LitData):
    def __init__(self, user_arena: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.user_arena = user_arena

    def test_dataloader(self) -> Any:
        return self.arena_dataloader(IndexedImages(24), batch_size=BATCH, num_workers=1, arena="ring")

    def predict_dataloader(self) -> Any:
        return self.arena_dataloader(IndexedImages(16), batch_size=BATCH, num_workers=1, arena=self.user_arena)


def test_validate_test_and_predict_loops_go_through_the_arena(tmp_path: Path) -> None:
    user_pool = ta.SharedMemorySegmentPool(256 << 10, 6)
    dm = LoopData(user_arena=user_pool, num_val=16, arena="pool")
    model = LoopModel()
    trainer = _trainer(L, tmp_path)
    trainer.validate(model, datamodule=dm)
    trainer.test(model, datamodule=dm)
    predictions = trainer.predict(model, datamodule=dm)
    assert model.checked == {"val": list(range(16)), "test": list(range(24)), "predict": list(range(16))}
    assert model.arena_batches == {"val": 2, "test": 3, "predict": 2}
    assert torch.equal(torch.cat(predictions), torch.arange(16))
    # arena_dataloader(arena=<instance>): that loader used the user's pool, and
    # teardown left it open for its owner
    predict_loader = trainer.predict_dataloaders
    assert predict_loader.arena is user_pool and not user_pool.closed
    assert predict_loader._torch_arena.session is None  # released at teardown
    assert user_pool.usage()["units_high_water"] >= 1
    user_pool.close()


class BrokenRelease(ta.ArenaDataLoader):
    """A loader whose release fails (as a worker that cannot be stopped would)."""

    def release_arena(self) -> None:
        raise OSError("cannot stop worker 1234")


def _working_loader(dm: Any) -> Any:
    loader = dm.arena_dataloader(IndexedImages(8), batch_size=BATCH, num_workers=1)
    assert len(list(loader)) == 1 and loader._torch_arena.session is not None
    return loader


def test_release_arenas_releases_the_others_then_raises_the_first_error() -> None:
    dm = LitData(arena="pool")
    broken = BrokenRelease(IndexedImages(8), batch_size=BATCH, num_workers=1)
    working = _working_loader(dm)
    dm._arena_tracked().add(broken)
    with pytest.raises(OSError, match="cannot stop worker 1234"):
        dm.release_arenas()
    assert working._torch_arena.session is None  # released although another one failed


def test_on_exception_warns_about_a_failed_release_instead_of_raising() -> None:
    dm = LitData(arena="pool")
    working = _working_loader(dm)
    broken = BrokenRelease(IndexedImages(8), batch_size=BATCH, num_workers=1)
    dm._arena_tracked().add(broken)  # tracked weakly: ``broken`` keeps it
    with pytest.warns(RuntimeWarning, match=r"releasing the arenas after KeyError failed: OSError\('cannot stop"):
        dm.on_exception(KeyError("the run's own error"))
    assert working._torch_arena.session is None
