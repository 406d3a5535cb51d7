"""Payloads of each kind and the dataset that yields them."""

from __future__ import annotations

import mmap
import os
import struct
import time
from typing import Any

import numpy as np

# -- payloads ------------------------------------------------------------------


def samples_per_batch(kind: str) -> int:
    """8 for a collated kind (``torch-x8``), else 1 (``batch_size=None``)."""
    return int(kind.rpartition("-x")[2]) if "-x" in kind else 1


def base_kind(kind: str) -> str:
    """The sample's kind (``torch`` for ``torch-x8``)."""
    return kind.partition("-x")[0]


def _bmp(nbytes: int) -> bytes:
    """An uncompressed 24-bit BMP of about ``nbytes`` (random pixels)."""
    width = 1024
    row = width * 3
    height = max(1, nbytes // row)
    pixels = np.random.default_rng(0).bytes(row * height)
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54) + struct.pack(
        "<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0
    )
    return header + pixels


def make_payload(kind: str, nbytes: int) -> Any:
    """One payload of ``kind`` holding about ``nbytes`` of random data.

    ``packets`` are real ``spdl.io`` ImagePackets demuxed from a BMP (one
    packet of the whole file).
    """
    if kind == "packets":
        import spdl.io

        return spdl.io.demux_image(_bmp(nbytes))
    raw = np.random.default_rng(0).bytes(nbytes)
    if kind == "bytes":
        return raw
    array = np.frombuffer(raw, dtype=np.float32).copy()
    if kind == "numpy":
        return array
    if kind == "torch":
        import torch

        return torch.from_numpy(array)
    raise ValueError(f"unknown payload kind {kind!r}")


def wire_bytes(payload: Any) -> int:
    """Bytes one payload puts through a transport."""
    if isinstance(payload, (bytes, bytearray)):
        return len(payload)
    if isinstance(payload, np.ndarray):
        return payload.nbytes
    if hasattr(payload, "element_size"):
        return payload.numel() * payload.element_size()
    return len(payload.__getstate__())


def packets_skip_reason() -> str | None:
    """Why ``packets`` cannot run here, or None."""
    try:
        import spdl.io  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - e.g. FFmpeg libraries missing
        return f"spdl.io does not import ({type(exc).__name__}: {exc})"
    return None


def spdl_skip_reason() -> str | None:
    """Why the SPDL peer cannot run here, or None."""
    try:
        from spdl.pipeline import SharedMemorySegmentPool, run_pipeline_in_subprocess  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"spdl.pipeline does not import ({type(exc).__name__}: {exc})"
    return None


class PayloadDataset:
    """A map-style dataset of ``length`` payloads of one kind.

    bytes, numpy arrays and packets: the same object every time (made once per
    process), so the transfer is measured, not its creation. This is fair to
    torch's path: a numpy array becomes a new tensor in ``default_convert`` /
    ``default_collate`` for every batch, so nothing is cached between sends.
    torch tensors: a fresh copy per item (:func:`fresh_copy`), because torch
    moves a tensor's storage into shared memory in place on its first send and
    reuses it afterwards; reusing one tensor would hide the cost.
    """

    def __init__(self, kind: str, nbytes: int, length: int, sleep_ms: float = 0.0) -> None:
        self.kind, self.nbytes, self.length, self.sleep_ms = kind, nbytes, length, sleep_ms
        self._cache: tuple[int, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}

    def __len__(self) -> int:
        return self.length

    def _source(self) -> Any:
        if self._cache is None or self._cache[0] != os.getpid():
            self._cache = (os.getpid(), make_payload(self.kind, self.nbytes))
        return self._cache[1]

    def __getitem__(self, index: int) -> Any:
        if self.sleep_ms:
            time.sleep(self.sleep_ms / 1e3)
        source = self._source()
        return fresh_copy(source) if self.kind == "torch" else source


def fresh_copy(source: Any) -> Any:
    """A copy of tensor ``source`` in freshly mapped memory, unmapped when it dies.

    What a decoder's output costs (new pages, faulted in by the copy), without
    glibc's heap: ``clone()`` of 2-8 MiB tensors in a DataLoader worker grows
    the worker's heap by hundreds of MB that are never returned (measured: 564
    MB of ``[heap]`` per worker making 4 MiB samples), which would swamp the
    peak-memory figures of every transport.
    """
    import torch

    flat = np.frombuffer(mmap.mmap(-1, max(1, source.nbytes)), dtype=np.uint8)
    fresh = torch.from_numpy(flat).view(source.dtype).view(source.shape)
    fresh.copy_(source)
    return fresh
