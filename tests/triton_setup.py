"""What the Triton test modules share: interpreter mode without a GPU, the device, and a module skip when
triton is missing or was imported before TRITON_INTERPRET was set. Import it before any rrcm.kernels.triton_*.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # tests/conftest.py sets it first; this covers running a file alone
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'rrcm[gpu]')")
tl = pytest.importorskip("triton.language")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if INTERPRET and not isinstance(tl.randn4x, InterpretedFunction):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; see tests/conftest.py", allow_module_level=True)
