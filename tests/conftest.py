"""Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET is read when triton and each @triton.jit function are imported, so it is set here,
before any test module imports them.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
