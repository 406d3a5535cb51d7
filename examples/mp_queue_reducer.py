"""Send tensors and arrays over a torch.multiprocessing Queue through an arena.

    python examples/mp_queue_reducer.py [--arena pool|ring] [--items 20]

Both processes install the reducer: the producer to write into the arena, the
consumer to restore from it. Tensors keep their type, dtype and requires_grad.
The reducer never blocks: when the arena has no room at that instant the item
goes through torch's own path, which (as always with torch) needs the producer
alive until the consumer has received it; hence the ``done`` event.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.multiprocessing as mp

import torch_arena as ta


def produce(arena, queue, done, items: int) -> None:
    torch.set_num_threads(1)
    with ta.arena_reducer(arena):
        for i in range(items):
            queue.put({"index": i, "frame": torch.full((512, 1024), float(i)), "mask": np.full(65536, i, np.uint8)})
        queue.put(None)
        done.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arena", choices=["pool", "ring"], default="pool")
    parser.add_argument("--items", type=int, default=20)
    args = parser.parse_args()
    if args.arena == "pool":
        arena = ta.SharedMemorySegmentPool(segment_size=4 << 20, count=8)
    else:
        arena = ta.SharedMemoryRingBuffer(capacity=32 << 20, acquire_timeout=5.0)
    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()
    with arena, ta.arena_reducer(arena):
        producer = ctx.Process(target=produce, args=(arena, queue, done, args.items))
        producer.start()
        received = 0
        while (item := queue.get(timeout=60)) is not None:
            assert bool(item["frame"].eq(item["index"]).all()) and int(item["mask"][0]) == item["index"]
            received += 1
        done.set()
        producer.join()
        moved = arena.usage()["units_high_water"]
    print(f"received {received} items, every tensor and array intact; "
          f"up to {moved} payloads were in the {args.arena} at once")


if __name__ == "__main__":
    main()
