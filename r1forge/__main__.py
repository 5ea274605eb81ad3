"""`python -m r1forge COMMAND ...`, the same as the `r1forge` script; what torchrun launches:

    torchrun --nproc-per-node 4 -m r1forge pretrain configs/pretrain_tiny.yaml --parallel.ep 2
"""

import sys

from r1forge.cli import main

sys.exit(main())
