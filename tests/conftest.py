"""Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET is read when triton and each @triton.jit function are imported, so it is set here,
before any test module imports them.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# `rrcm certify` defaults to --precision auto, which times eager torch, torch.compile and ONNX Runtime once per
# model and batch (compiling takes half a minute here): tests, subprocesses included, run eager torch as with
# --precision fp32; tests/test_cpu.py lifts this to test the probe.
os.environ.setdefault("RRCM_AUTO_RUNTIMES", "eager")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                                          pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def device(request) -> str:
    """The engine's device: every test that takes it runs on the CPU, and on a CUDA GPU where there is one."""
    return request.param


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(params=["torch", pytest.param("triton", marks=pytest.mark.skipif(not _has_triton(), reason="needs triton"))])
def sampler(request, device) -> str:
    """The engine's noise sampler: torch ops, and the fused Triton kernel (compiled on a GPU; on the CPU through
    Triton's interpreter, which runs only where there is no GPU)."""
    if request.param == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton sampler runs on the CPU only through Triton's interpreter, off where a GPU is")
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: where other jobs share the 2 cores, a second thread mostly waits at barriers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
