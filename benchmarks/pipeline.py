"""A real input pipeline through stock vs the elastic pool (also
``python -m torch_arena bench pipeline``).

JPEGs generated once (500x375, kept in DIR/jpegs), decoded, random resized crop to
224x224, horizontal flip, then float32-normalized CHW (batch 128) or uint8 CHW (batch
256), by torchvision (decode_jpeg, transforms.v2) where it imports, else by PIL (the
report names which; --decoder chooses); 2 workers; the main loop runs a step that reads the whole batch. Reports
steps/s and main-process CPU per step, stock and elastic alternated --reps times
(default 3). Harness: :mod:`torch_arena._tools.bench._pipeline`.

    python benchmarks/pipeline.py [--reps 3] [--pipeline-batches 16] [--decoder PIL] [--out DIR]
"""

import sys

from torch_arena._tools.bench._sizing_run import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="benchmarks/pipeline.py", name="pipeline"))
