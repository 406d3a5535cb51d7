"""Smoke test of the sizing and pipeline benchmarks at a tiny size: the result
structure and the invariants that hold whatever the timing (no speed asserted)."""

from __future__ import annotations

import importlib.util
import math

import pytest

pytest.importorskip("psutil")
pytestmark = [
    pytest.mark.filterwarnings("ignore::torch_arena.ArenaFallbackWarning"),  # the fixed pool falls back
    # torchvision 0.29 deprecates its image decoders in favour of TorchCodec's; the pipeline uses decode_jpeg
    pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"),
]

from torch_arena._tools.bench import _pipeline, _sizing, _sizing_report, _sizing_run

MiB = 1 << 20


def _quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def matrix():
    transports = (*_sizing.TRANSPORTS, _sizing.RING)
    rows = _sizing_run.run_matrix([1 / 16, 2.0], windows=2, progress=_quiet, transports=transports)
    return {(r["size"], r["transport"]): r for r in rows}


@pytest.mark.parametrize("size", ["64 KiB", "2 MiB"])
@pytest.mark.parametrize("transport", (*_sizing.TRANSPORTS, _sizing.RING))
def test_matrix_rows_are_sane(matrix, size, transport):
    r = matrix[(size, transport)]
    assert not r["skipped"], r["skipped"]
    assert r["batches"] >= 4 and r["mb_per_s"] > 0 and r["mb_per_s_ci"] >= 0
    assert r["main_cpu_ms"] > 0 and r["worker_cpu_ms"] > 0
    assert r["first_cpu_ms"] > 0 and r["first_wall_ms"] > 0
    assert r["fallbacks"] == 0  # every batch fits even the fixed pool's 64 MiB segments
    if transport == "stock":
        assert math.isnan(r["committed_peak_mib"])
        return
    # Committed memory holds at least the bytes in flight + held at their peak.
    assert r["held_peak_mib"] > 0
    assert r["committed_peak_mib"] >= r["held_peak_mib"]
    if transport == "fixed":
        assert r["committed_peak_mib"] == _sizing.FIXED_COUNT * _sizing.FIXED_SEGMENT / MiB


def test_elastic_commits_what_it_holds(matrix):
    for size in ("64 KiB", "2 MiB"):
        r = matrix[(size, "elastic")]
        assert r["committed_x_limit"] <= 1.0, r  # a page-granular sizing, not 6 x 64 MiB
        assert r["committed_peak_mib"] < matrix[(size, "fixed")]["committed_peak_mib"]


def test_ring_rows_count_the_private_copies(matrix):
    for size in ("64 KiB", "2 MiB"):
        r = matrix[(size, _sizing.RING)]
        assert r["private_fresh"] >= 1 and r["private_reused"] > r["batches"]  # recycled, not mapped anew
        assert r["private_kept"] > 0
        names = [name for name, _, _ in _sizing_report.check_targets({"matrix": [r]})]
        assert names == [f"ring 0 fallbacks, {size}", f"ring committed <= 1.25 x held + 16 MiB, {size}"]
    assert "private_kept" not in matrix[("2 MiB", "elastic")]  # zero-copy: nothing kept privately


def test_epoch_scenarios():
    for transport in ("fixed", "elastic"):
        keep = _sizing.measure_epoch({"case": "keep32", "transport": transport, "keep": True})
        assert keep["batches"] == 24 and keep["bytes"] == 24 * 32 * MiB
        assert keep["committed_high_water"] >= keep["bytes_high_water"] > 0
        if transport == "elastic":  # every kept batch stays in the arena
            assert keep["fallbacks"] == 0
            assert keep["bytes_high_water"] == 24 * 32 * MiB
        else:  # six segments: the rest wait and fall back
            assert keep["fallbacks"] >= 24 - _sizing.FIXED_COUNT
    shrink = _sizing.measure_epochs(
        {"case": "shrink", "transport": "elastic", "big_batches": 6, "small_batches": 40, "small_epochs": 2}
    )
    epochs = shrink["epochs"]
    assert [e["batches"] for e in epochs] == [6, 40, 40]
    assert epochs[0]["committed_high_water"] >= 128 * MiB
    assert all(e["fallbacks"] == 0 for e in epochs)
    assert epochs[-1]["committed_after"] <= epochs[0]["committed_high_water"]


def test_padded_sequences_are_padded():
    ds = _sizing.PaddedSequenceDataset(4)
    item = ds[3]
    lengths = item["lengths"]
    assert item["x"].shape == (_sizing.VAR_BATCH, int(lengths.max()), _sizing.VAR_FEATURES)
    short = int(lengths.argmin())
    assert float(item["x"][short, int(lengths[short]) :].abs().sum()) == 0.0
    assert _sizing.PaddedSequenceDataset.batch_bytes(3) == item["x"].numel() * 4


def test_pipeline_and_report(tmp_path):
    pytest.importorskip("PIL")
    pytest.importorskip("matplotlib")
    paths = _pipeline.make_jpegs(str(tmp_path / "jpegs"), count=8)
    sample = _pipeline.JpegDataset(paths, "float32", 8)[5]
    assert tuple(sample.shape) == (3, 224, 224) and str(sample.dtype) == "torch.float32"
    assert str(_pipeline.JpegDataset(paths, "uint8", 8)[5].dtype) == "torch.uint8"
    rows = [
        _pipeline.measure_pipeline(
            {"pipeline": "uint8", "transport": t, "paths": paths, "batches": 2, "warmup": 1}
        )
        for t in ("stock", "elastic")
    ]
    label = _pipeline.decoder_label(_pipeline.default_decoder())  # torchvision where it imports, else PIL
    assert {r["decoder"] for r in rows} == {label}
    by = {r["transport"]: r for r in rows}
    assert by["elastic"]["fallbacks"] == 0 and by["elastic"]["arena_batches"] >= 3
    assert by["stock"]["arena_batches"] == 0
    for r in rows:
        assert r["steps_per_s"] > 0 and r["main_cpu_ms"] >= r["step_ms"] > 0 and r["worker_cpu_ms"] > 0
    text, complete = _sizing_report.report({"pipeline": rows}, str(tmp_path), "smoke")
    assert complete and "targets:" in text and "pipeline uint8" in text
    assert f"JPEG decode and transforms: {label}" in text
    for suffix in ("txt", "png", "_pipeline.csv"):
        name = f"smoke{suffix}" if suffix.startswith("_") else f"smoke.{suffix}"
        assert (tmp_path / name).stat().st_size > 0


def test_pipeline_decodes_with_torchvision_where_it_imports(tmp_path):
    """make test's torch 2.14 venv has torchvision: its decode_jpeg and
    transforms.v2 are the default and checked, and PIL's path too; its torch
    2.13 venv has none (PyPI's does not import beside that CPU wheel): PIL's
    path is the default and checked. Each variant's float32 sample is its
    uint8 sample normalized: the same crop and flip, drawn from the index."""
    import torch

    error = _pipeline.torchvision_error()
    if error and importlib.util.find_spec("torchvision") is not None:
        pytest.skip(f"torchvision is installed but does not import beside torch {torch.__version__}: {error}")
    assert _pipeline.default_decoder() == ("PIL" if error else "torchvision")
    paths = _pipeline.make_jpegs(str(tmp_path), count=4)
    if error:
        with pytest.raises(RuntimeError, match="torchvision does not import"):
            _pipeline.JpegDataset(paths, "uint8", 8, "torchvision")
    else:
        steps = _pipeline.JpegDataset(paths, "float32", 8).transform.transforms
        assert [type(t).__name__ for t in steps] == ["RandomResizedCrop", "RandomHorizontalFlip", "ToDtype", "Normalize"]
    mean = torch.tensor(_pipeline.MEAN).view(3, 1, 1)
    std = torch.tensor(_pipeline.STD).view(3, 1, 1)
    for decoder in ("PIL",) if error else ("torchvision", "PIL"):
        f32 = _pipeline.JpegDataset(paths, "float32", 8, decoder)
        u8 = _pipeline.JpegDataset(paths, "uint8", 8, decoder)
        assert f32.decoder == u8.decoder == decoder
        a, b = f32[5], u8[5]
        assert tuple(a.shape) == tuple(b.shape) == (3, 224, 224), decoder
        assert a.dtype == torch.float32 and b.dtype == torch.uint8 and a.is_contiguous() and b.is_contiguous()
        assert torch.equal(a, f32[5]) and not torch.equal(a, f32[6]), decoder  # drawn from the index
        assert torch.allclose(a, (b.float() - mean) / std, atol=1e-4), decoder
