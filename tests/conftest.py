import os
import sys

import torch

# Triton kernels only launch on CPU through the interpreter, and the variable must be set before any
# @triton.jit decorator runs, i.e. before the kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
