"""torch_arena arenas under SPDL: as ``arena=`` of an SPDL pipeline, and with spdl.io packets."""

from __future__ import annotations

import gc
import wave
import zlib

import numpy as np
import pytest
import torch

import torch_arena as ta
from conftest import collect, inside_arena

try:
    import spdl.pipeline as spdl_pipeline
except ImportError as exc:  # the stand-in packets test below still runs
    spdl_pipeline = None
    _SPDL_MISSING = f"spdl.pipeline cannot be imported: {exc}"

N_ITEMS = 12


def make_item(i: int) -> dict:
    """One pipeline item: every leaf is at least 64 KiB."""
    rng = np.random.default_rng(i)
    return {
        "index": i,
        "array": rng.standard_normal((96, 96)),  # 72 KiB float64
        "raw": rng.bytes(70_000),
        "tensor": torch.from_numpy(rng.integers(0, 255, (300, 300), dtype=np.uint8)),
        "meta": {"name": f"item-{i}", "shape": (96, 96)},
    }


def check_item(item: dict) -> None:
    expected = make_item(item["index"])
    assert item["meta"] == expected["meta"]
    assert item["array"].dtype == np.float64 and np.array_equal(item["array"], expected["array"])
    assert bytes(item["raw"]) == expected["raw"]
    assert item["tensor"].dtype == torch.uint8 and torch.equal(item["tensor"], expected["tensor"])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pool", "elastic", "ring"])
def test_arena_as_spdl_pipeline_arena(backend):
    if spdl_pipeline is None:
        pytest.skip(_SPDL_MISSING)
    zero_copy = backend != "ring"
    if backend == "pool":
        arena = ta.SharedMemorySegmentPool(512 * 1024, 8)
    elif backend == "elastic":
        arena = ta.SharedMemoryElasticPool("64MiB", acquire_timeout=30.0)
    else:
        arena = ta.SharedMemoryRingBuffer(4 << 20, acquire_timeout=30.0)
    config = (
        spdl_pipeline.PipelineBuilder()
        .add_source(range(N_ITEMS))
        .pipe(make_item)
        .add_sink(3)
        .get_config()
    )
    src = spdl_pipeline.run_pipeline_in_subprocess(config, num_threads=1, arena=arena)
    kept = []
    for epoch in range(2):
        seen = []
        for item in src:
            check_item(item)
            if zero_copy:
                # SPDL's own codec over our reader: zero-copy views into our memory
                assert type(item["raw"]) is memoryview
                assert inside_arena(arena, item["array"]) and inside_arena(arena, item["tensor"])
            else:
                assert type(item["raw"]) is bytes
                assert not inside_arena(arena, item["array"])
            seen.append(item["index"])
            if epoch == 0 and len(kept) < 2:
                kept.append(item)  # held across the next epoch
            del item
        assert sorted(seen) == list(range(N_ITEMS))
    for item in kept:  # never overwritten by the second epoch
        check_item(item)
    del item
    if zero_copy:
        assert arena.usage()["units_in_use"] == len(kept)
    del kept
    collect()
    if zero_copy:
        assert arena.usage()["units_in_use"] == 0
    del src  # SPDL's teardown closes the arena it was given
    gc.collect()
    assert arena.closed


# -- packets --------------------------------------------------------------------------------


class AudioPackets:
    """Stand-in with the surface the packets handler relies on (name + methods)."""

    def __init__(self, data, how: str = "init"):
        self._data = data
        self.how = how

    def __getstate__(self):
        return bytes(self._data)

    def __setstate__(self, state):
        self._data, self.how = state, "setstate"

    @staticmethod
    def deserialize(data):
        assert type(data) is bytes
        return AudioPackets(data, "deserialize")

    @staticmethod
    def deserialize_view(view):
        assert type(view) is memoryview
        return AudioPackets(view, "deserialize_view")


class VideoPackets:
    """Same name family, but no deserialize_view: not an spdl.io packets class."""

    def __init__(self, data):
        self.data = data


def test_packets_handler_with_stand_in(arena):
    w, r = arena.open_writer(), arena.open_reader()
    payload = bytes(range(256)) * 100
    item = {"audio": AudioPackets(payload), "small": AudioPackets(b"tiny"), "video": VideoPackets(b"v" * 1000)}
    env = ta.offload(item, w)
    assert payload not in env  # the packets' bytes went into the arena
    assert b"v" * 1000 in env  # not a packets class: pickled as it is
    out = ta.restore(env, r)
    assert out["audio"].__getstate__() == payload
    assert out["small"].__getstate__() == b"tiny" and out["small"].how == "setstate"
    assert type(out["video"]) is VideoPackets and out["video"].data == b"v" * 1000
    if arena.open_reader().zero_copy:
        assert out["audio"].how == "deserialize_view"
        assert inside_arena(arena, out["audio"]._data)  # aliases the unit's memory
        assert arena.usage()["units_in_use"] == 1
        del out
        assert arena.usage()["units_in_use"] == 0
    else:
        assert out["audio"].how == "deserialize"
        del out
    collect()
    assert arena.usage()["units_in_use"] == 0


def _write_wav(path, seconds: float = 2.0, rate: int = 16_000) -> None:
    rng = np.random.default_rng(0)
    samples = (rng.standard_normal((int(seconds * rate), 2)) * 3000).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(samples.tobytes())


@pytest.fixture(scope="module")
def spdl_io():
    try:
        import spdl.io
    except (ImportError, OSError) as exc:  # not installed, or its FFmpeg libraries missing
        pytest.skip(f"spdl.io cannot be imported: {type(exc).__name__}: {exc}")
    return spdl.io


def test_real_spdl_audio_packets_round_trip(arena, spdl_io, tmp_path):
    path = tmp_path / "tone.wav"
    _write_wav(path)
    packets = spdl_io.demux_audio(str(path))
    state = packets.__getstate__()
    assert len(state) > 100_000
    w, r = arena.open_writer(), arena.open_reader()
    env = ta.offload({"audio": packets, "label": 3}, w)
    assert len(env) < 4096
    out = ta.restore(env, r)
    assert type(out["audio"]) is type(packets) and out["label"] == 3
    assert out["audio"].__getstate__() == state
    assert out["audio"].sample_rate == packets.sample_rate == 16_000
    assert out["audio"].num_channels == packets.num_channels == 2
    if arena.open_reader().zero_copy:
        assert arena.usage()["units_in_use"] == 1  # the view pins its unit
    # the restored packets decode like the originals
    a = spdl_io.to_numpy(spdl_io.convert_frames(spdl_io.decode_packets(packets.clone())))
    b = spdl_io.to_numpy(spdl_io.convert_frames(spdl_io.decode_packets(out["audio"].clone())))
    assert a.size > 0
    assert zlib.crc32(a.tobytes()) == zlib.crc32(b.tobytes())
    del out
    collect()
    assert arena.usage()["units_in_use"] == 0
