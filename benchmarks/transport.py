"""The A/B transport benchmark (also ``python -m torch_arena bench``).

payload kind {bytes, numpy, torch, packets, torch-x8 (8 collated samples)} x
batch size {2, 8, 32 MiB} x transport {stock (torch's own), ring, pool}, plus
SPDL's segment pool as a peer and a dataset-only run per row (the cost of
making the payload). Every configuration runs in a fresh process; the harness
and the method are in :mod:`torch_arena._tools.bench`.

    python benchmarks/transport.py                 # full matrix, ~10 minutes on 2 cores
    python benchmarks/transport.py --quick         # 32 MiB only, shorter windows
    python benchmarks/transport.py --out DIR       # default bench-out/
    python benchmarks/transport.py --targets       # also judge issues 3 and 10's acceptance targets

Prints the summary, the per-payload table and the full table; writes
DIR/transport.csv, DIR/transport.txt (the same, and the targets when asked
for) and DIR/transport.png.
"""

import sys

from torch_arena._tools.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="benchmarks/transport.py"))
