"""A real input pipeline: JPEG decode, random resized crop to 224², flip,
then float32-normalized CHW (batch 128) or uint8 CHW (batch 256), 2 workers,
a training step in the main loop that reads the whole batch.

Decode and transforms are torchvision's where it imports
(``torchvision.io.decode_jpeg``, then ``torchvision.transforms.v2``:
``RandomResizedCrop(224)``, ``RandomHorizontalFlip()`` and, for float32,
``ToDtype(float32, scale=True)`` + ``Normalize``), what a user's pipeline
runs; PIL's where it does not (PyPI's torchvision imports only beside the torch
it was built for). Each row says which ran (``decoder``).

The JPEGs are generated once (:func:`make_jpegs`: smooth multi-scale colour
fields with fine grain, 500×375, quality 90, about what a photo compresses
to) and kept in the output directory. Crop and flip are drawn from the
sample's index, so every transport does exactly the same work.
"""

from __future__ import annotations

import gc
import math
import os
import random
import time
from functools import cache
from typing import Any

import numpy as np

from ._config import PREFETCH, WORKERS
from ._measure import _cpu_of, _cpu_self, touch_pages

#: ``(name, dtype, batch size)`` of the two pipelines.
PIPELINES = {"float32": ("float32", 128), "uint8": ("uint8", 256)}
IMAGE_SIZE = (500, 375)
CROP = 224
MEAN01, STD01 = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MEAN = np.array(MEAN01, dtype=np.float32) * 255
STD = np.array(STD01, dtype=np.float32) * 255
#: The two ways :class:`JpegDataset` decodes and transforms.
DECODERS = ("torchvision", "PIL")


@cache
def torchvision_error() -> str:
    """Why ``torchvision.io`` / ``torchvision.transforms.v2`` do not import
    here, or ``""`` when they do."""
    try:
        import torchvision.io  # noqa: F401
        import torchvision.transforms.v2  # noqa: F401
    except Exception as exc:  # ImportError; beside another torch: "operator torchvision::nms does not exist"
        return f"{type(exc).__name__}: {exc}"
    return ""


def default_decoder() -> str:
    """``"torchvision"`` where it imports, else ``"PIL"``."""
    return "PIL" if torchvision_error() else "torchvision"


def decoder_label(decoder: str) -> str:
    """``"torchvision 0.29.1"`` / ``"PIL 11.0.0"``: what the report names."""
    if decoder == "torchvision":
        import torchvision

        return f"torchvision {torchvision.__version__}"
    import PIL

    return f"PIL {PIL.__version__}"


def make_jpegs(directory: str, count: int = 256, seed: int = 0) -> list[str]:
    """``count`` JPEGs of :data:`IMAGE_SIZE` in ``directory`` (made once; kept)."""
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"img{i:04d}.jpg") for i in range(count)]
    rng = np.random.default_rng(seed)
    w, h = IMAGE_SIZE
    for i, path in enumerate(paths):
        if os.path.exists(path):
            continue
        field = np.zeros((h, w, 3), dtype=np.float32)
        for scale, weight in ((4, 90.0), (16, 50.0), (64, 25.0)):
            small = rng.normal(0, 1, (max(2, h * scale // w), scale, 3)).astype(np.float32)
            layers = [np.asarray(Image.fromarray(small[..., c]).resize((w, h), Image.BICUBIC)) for c in range(3)]
            field += weight * np.stack(layers, -1)
        field += rng.uniform(60, 190, 3) + rng.normal(0, 6, (h, w, 3))
        Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(path, quality=90)
    return paths


class JpegDataset:
    """Decode, random-resized-crop (scale 0.08-1, ratio 3/4-4/3), horizontal
    flip with p = 0.5, then CHW uint8 or normalized float32, by ``decoder``
    (one of :data:`DECODERS`; default :func:`default_decoder`). torchvision's
    transforms draw from torch's generator, seeded with the index for the
    sample; PIL's crop follows torchvision's rule, drawn from the index."""

    def __init__(self, paths: list[str], dtype: str, length: int, decoder: str | None = None) -> None:
        self.paths, self.dtype, self.length = paths, dtype, length
        self.decoder = decoder or default_decoder()
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, not {self.decoder!r}")
        if self.decoder == "torchvision" and torchvision_error():
            raise RuntimeError(f"torchvision does not import here ({torchvision_error()}); use decoder='PIL'")
        self.transform = self._torchvision_transform(dtype) if self.decoder == "torchvision" else None

    def __len__(self) -> int:
        return self.length

    @staticmethod
    def _torchvision_transform(dtype: str) -> Any:
        import torch
        from torchvision.transforms import v2

        steps = [v2.RandomResizedCrop(CROP, antialias=True), v2.RandomHorizontalFlip()]
        if dtype == "float32":
            steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN01, STD01)]
        return v2.Compose(steps)

    @staticmethod
    def crop_box(index: int, width: int, height: int) -> tuple[tuple[int, int, int, int], bool]:
        rng = random.Random(index)
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(0.08, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < cw <= width and 0 < ch <= height:
                x, y = rng.randint(0, width - cw), rng.randint(0, height - ch)
                return (x, y, x + cw, y + ch), rng.random() < 0.5
        side = min(width, height)  # torchvision's fallback: a centre crop
        x, y = (width - side) // 2, (height - side) // 2
        return (x, y, x + side, y + side), rng.random() < 0.5

    def __getitem__(self, index: int) -> Any:
        path = self.paths[index % len(self.paths)]
        return self._torchvision_item(path, index) if self.transform is not None else self._pil_item(path, index)

    def _torchvision_item(self, path: str, index: int) -> Any:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        chw = decode_jpeg(read_file(path), mode=ImageReadMode.RGB)
        with torch.random.fork_rng(devices=[]):  # the worker's own generator state stays as it was
            torch.default_generator.manual_seed(index)
            return self.transform(chw)

    def _pil_item(self, path: str, index: int) -> Any:
        import torch
        from PIL import Image

        with Image.open(path) as img:
            img = img.convert("RGB")
            box, flip = self.crop_box(index, *img.size)
            img = img.resize((CROP, CROP), Image.BILINEAR, box=box)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        hwc = np.asarray(img)
        if self.dtype == "uint8":
            return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
        chw = ((hwc.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(chw))


def training_step(batch: Any, weight: Any) -> float:
    """Reads the whole batch (a sum of its bytes taken 8 at a time, the same
    memory traffic for both dtypes) and runs a small conv over its first 16 images."""
    import torch

    total = float(batch.view(torch.int64).sum())
    x = batch[:16].float()
    return total + float(torch.nn.functional.conv2d(x, weight, stride=4).mean())


def measure_pipeline(p: dict[str, Any]) -> dict[str, Any]:
    """One pipeline (``p["pipeline"]``: float32/uint8) through one transport
    (``stock`` or ``elastic``) for ``p["batches"]`` batches (``p["warmup"]``
    more first), decoded by ``p["decoder"]`` (default :func:`default_decoder`):
    steps/s and CPU per step of the main process and the workers.

    Per step: ``read`` (one byte per page of the batch: where the page faults
    of freshly mapped memory land), then :func:`training_step` (``step``).
    ``overhead`` = main-process CPU - step CPU: what the loader and its
    memory cost the training process.
    """
    import psutil  # noqa: F401
    import torch

    from ._sizing import close_loader, make_loader

    torch.set_num_threads(1)
    dtype, batch_size = PIPELINES[p["pipeline"]]
    # A tail of batches the loop never takes: the workers are still alive
    # (prefetching it) when their CPU is read at the end of the timed steps.
    total = (p["warmup"] + p["batches"] + WORKERS * PREFETCH) * batch_size
    dataset = JpegDataset(p["paths"], dtype, total, p.get("decoder"))
    loader, arena = make_loader(dataset, p["transport"], batch_size)
    weight = torch.randn(16, 3, 3, 3)
    gc.collect()
    began = time.time()
    read = step = 0.0
    try:
        it = iter(loader)
        for _ in range(p["warmup"]):
            training_step(next(it), weight)
        pids = [w.pid for w in it._workers]
        w0, c0, t0 = _cpu_of(pids), _cpu_self(), time.perf_counter()
        for _ in range(p["batches"]):
            batch = next(it)
            ts = time.thread_time()
            touch_pages(batch)
            tr = time.thread_time()
            training_step(batch, weight)
            step += time.thread_time() - tr
            read += tr - ts
            del batch
        wall, main = time.perf_counter() - t0, _cpu_self() - c0
        workers = _cpu_of(pids) - w0
        stats = loader.arena_stats
    finally:
        close_loader(loader, arena)
    n = p["batches"]
    return {
        "pipeline": p["pipeline"],
        "transport": p["transport"],
        "decoder": decoder_label(dataset.decoder),
        "batch_bytes": batch_size * 3 * CROP * CROP * (4 if dtype == "float32" else 1),
        "batches": n,
        "steps_per_s": n / wall,
        "main_cpu_ms": main / n * 1e3,
        "step_ms": step / n * 1e3,
        "read_ms": read / n * 1e3,
        "overhead_ms": (main - step) / n * 1e3,
        "worker_cpu_ms": workers / n * 1e3,
        "fallbacks": stats.fallbacks,
        "wait_s": stats.wait_seconds,
        "arena_batches": stats.batches,
        "committed_high_water": stats.committed_high_water,
        "bytes_high_water": stats.high_water_bytes,
        "began": began,
        "ended": time.time(),
    }

