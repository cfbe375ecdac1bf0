"""`rrcm bench`: certification throughput of one model on this machine, against the reference loop and the limit.

This module is the command and the table of what it times (light to import: `rrcm bench --help` loads no torch);
the measurements live in `rrcm.engine.throughput`.
"""
from __future__ import annotations

import argparse

REFERENCE = "reference"  # the loop speedups are measured against
REFERENCE_BATCH = 400
BF16, FP16, FP8 = "bfloat16", "float16", "float8_e4m3fn"

# Engine configurations per device type: name -> Certifier options. Dtypes are torch attribute names, so the
# table is also what the JSON records. On CUDA the sampler defaults to the fused Triton kernel.
CONFIGS: dict[str, dict[str, dict]] = {
    "cpu": {
        "fp32": {},
        "fp32-compile": {"compile": True},
        "onnxruntime": {"backend": "onnxruntime"},
        "bf16": {"dtype": BF16},
        "bf16-compile": {"dtype": BF16, "compile": True},
        "int8": {"dtype": "int8"},
    },
    "cuda": {
        "fp32": {},
        "bf16": {"dtype": BF16},
        "bf16-compile": {"dtype": BF16, "compile": True},
        "bf16-compile-graphs": {"dtype": BF16, "compile": True, "cuda_graphs": True},
        "fp16": {"dtype": FP16},
        "bf16-torch-sampler": {"dtype": BF16, "sampler": "torch"},
        "fp8-compile-graphs": {"dtype": FP8, "compile": True, "cuda_graphs": True},
    },
}
# The reference loop per device type: name -> the dtype of its matrix products ("tf32": float32 tensors with
# TensorFloat-32 products, as torch.set_float32_matmul_precision("high") gives; the public code runs without).
REFERENCES: dict[str, dict[str, str]] = {"cpu": {REFERENCE: "float32"}, "cuda": {REFERENCE: "float32", "reference-tf32": "tf32"}}


class _Bench:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.epilog = ("Configurations: " + "; ".join(f"{dev}: {', '.join([*REFERENCES[dev], *t])}" for dev, t in CONFIGS.items())
                    + ". Those that cannot run here (no onnxruntime or torchao; fp8 before compute capability 8.9) are "
                    "listed as not run. On CUDA the sampler is the fused Triton kernel where triton imports. A "
                    "configuration that fails is reported with its error, the others still run, and the exit code is 1.")
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument("--preset", help="a model preset with random weights (the cost does not depend on them), "
                                            "e.g. rrcm-b-imagenet, rrcm-b-cifar, fmnist-s, tiny")
        which.add_argument("--model", help="a fine-tuned checkpoint folder or a bundled model name (fashion-mnist)")
        p.add_argument("--sigma", type=float, default=None,
                       help="noise std (default: the checkpoint's; 0.5 for a preset)")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        p.add_argument("--n", type=int, default=100_000, help="samples per image for the s/image column (default 100000)")
        p.add_argument("--batch", type=int, default=None,
                       help="engine batch (default: as rrcm certify, 1000 on GPU, 128 on CPU); the reference uses "
                            f"{REFERENCE_BATCH}")
        p.add_argument("--configs", default=None,
                       help="comma-separated configurations to time, in this order (default: all for the device)")
        p.add_argument("--seconds", type=float, default=3.0,
                       help="timed seconds per configuration after its warm-up (default 3)")
        p.add_argument("--json", default=None, help="also write the results here (rewritten after each configuration)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from rrcm.engine.throughput import run_bench

        return run_bench(args)


COMMAND = _Bench()
