"""The sizing benchmark of issue 9 (also ``python -m torch_arena bench sizing``).

stock (torch's own transport) vs 0.1.0's fixed pool (``SharedMemorySegmentPool(64 MiB, 6)``)
vs the elastic pool (``arena="pool"``), 2 workers: batches of 64 KiB, 1, 32, 160 and
600 MiB and padded sequences of a random length per batch (fallbacks, committed memory
against bytes in flight + held, CPU and wall time to the first batch, steady-state MB/s
and CPU per batch); short epochs with start-up; a loop that keeps every batch; a
working set that shrinks; and the JPEG pipeline. Every measurement runs in a fresh
process; the harness is :mod:`torch_arena._tools.bench._sizing_run`.

    python benchmarks/sizing.py                     # everything, ~8 minutes on 2 cores
    python benchmarks/sizing.py --quick             # fewer sizes and repetitions
    python benchmarks/sizing.py --parts matrix --sizes 32 600

Writes DIR/sizing.json, sizing.txt (tables, targets), sizing_<part>.csv and sizing.png
under --out (default bench-out/).
"""

import sys

from torch_arena._tools.bench._sizing_run import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="benchmarks/sizing.py"))
