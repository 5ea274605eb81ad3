"""`python -m r1forge COMMAND ...`, the same as the `r1forge` script; what torchrun launches:

    torchrun --nproc-per-node 4 -m r1forge pretrain configs/pretrain_tiny.yaml --parallel.ep 2
"""

import sys

from torch.distributed.elastic.multiprocessing.errors import record

from r1forge.cli import main

# `record` writes an uncaught exception to torchrun's error file, so the launcher reports the failing rank's
# own traceback as the root cause (not only the ranks its exit took down).
sys.exit(record(main)())
