"""A real input pipeline: JPEG decode (PIL), random resized crop to 224², flip,
then float32-normalized CHW (batch 128) or uint8 CHW (batch 256), 2 workers,
a training step in the main loop that reads the whole batch.

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
from typing import Any

import numpy as np

from ._config import PREFETCH, WORKERS
from ._measure import _cpu_of, _cpu_self, touch_pages

#: ``(name, dtype, batch size)`` of the two pipelines.
PIPELINES = {"float32": ("float32", 128), "uint8": ("uint8", 256)}
IMAGE_SIZE = (500, 375)
CROP = 224
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255


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
    """Decode, random-resized-crop (scale 0.08-1, ratio 3/4-4/3, torchvision's
    rule), horizontal flip with p = 0.5, then CHW uint8 or normalized float32."""

    def __init__(self, paths: list[str], dtype: str, length: int) -> None:
        self.paths, self.dtype, self.length = paths, dtype, length

    def __len__(self) -> int:
        return self.length

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
        import torch
        from PIL import Image

        with Image.open(self.paths[index % len(self.paths)]) as img:
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
    more first): steps/s and CPU per step of the main process and the workers.

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
    dataset = JpegDataset(p["paths"], dtype, total)
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

