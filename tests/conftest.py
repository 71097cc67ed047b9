"""Test-wide settings.

The suite runs under pytest-xdist with one worker per core (`-n 2` on the 2-core CI
machine), so each worker uses one intra-op thread: two workers × two threads would
oversubscribe the cores and make every small matmul slower, not faster.
"""
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)
