"""Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET is read when triton and each @triton.jit function are imported, so it is set here,
before any test module imports them.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def device(request) -> str:
    """The engine's device: every test that takes it runs on the CPU, and on a CUDA GPU where there is one."""
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: where other jobs share the 2 cores, a second thread mostly waits at barriers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
