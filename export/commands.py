"""`rrcm export FORMAT ...`: one sub-subcommand per format. Their options live here, light to import
(`--help` loads no torch); each format's work is `run_export` in its exporter's module.
"""
from __future__ import annotations

import argparse
import importlib


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model and --sigma, the same for every exporter."""
    p.add_argument("--model", required=True, help="fine-tuned checkpoint folder or bundled model name (fashion-mnist)")
    p.add_argument("--sigma", type=float, default=None,
                   help="noise level the classifier was fine-tuned for (default: the checkpoint's; needed for a bundled model). "
                        "A checkpoint fine-tuned for several sigmas (rrcm finetune --sigmas / --sigma-range) exports "
                        "without --sigma to one model that takes the noise level as an input (onnx, aoti), with --sigma "
                        "to a model for that sigma")


class _Format:
    """One `rrcm export FORMAT`: its help and options here, its work in `rrcm.export.FORMAT.run_export`."""

    def __init__(self, name: str, help: str, add_arguments):
        self.name, self.help, self.add_arguments = name, help, add_arguments

    def run(self, args: argparse.Namespace) -> int:
        return importlib.import_module(f"rrcm.export.{self.name}").run_export(args)


def _onnx_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="ONNX file to write (e.g. model.onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version, >= 17 (default 17)")
    p.add_argument("--static-batch", type=int, default=None, metavar="B",
                   help="fix the batch dimension to B (default: dynamic batch)")


def _aoti_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="package file to write, ending in .pt2")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="device the package runs on; compiled code is device-specific (default cpu)")
    p.add_argument("--batch", type=int, default=None, metavar="B",
                   help="fix the batch size to B (default: any batch size)")


def _tensorrt_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="plan file to write, ending in .plan (metadata goes to OUT.json)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                           help="compute in float16 (inputs and logits stay float32)")
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                           help="compute in bfloat16 (ONNX opset 22; inputs and logits stay float32)")
    p.set_defaults(precision="fp32")
    p.add_argument("--batch", type=int, default=None, metavar="B",
                   help="fix the batch size to B (default: any batch size up to --max-batch)")
    p.add_argument("--max-batch", type=int, default=1000, metavar="M",
                   help="largest batch of a dynamic-batch plan, also the size it is tuned for (default 1000)")
    p.add_argument("--device", default="cuda", help="GPU to build for, e.g. cuda:1 (default: cuda)")


EXPORTERS = {
    "onnx": _Format("onnx", ("export a classifier to ONNX (pixel-space input, dynamic batch; a sigma input for a classifier of several "
            "sigmas without --sigma), checked against torch"), _onnx_arguments),
    "aoti": _Format("aoti", ("compile a classifier into an AOTInductor package (.pt2) for Python or C++ (a sigma input for a classifier "
            "of several sigmas without --sigma)"), _aoti_arguments),
    "tensorrt": _Format("tensorrt", ("build a TensorRT plan (.plan) of a classifier for one sigma from its ONNX export (needs tensorrt and a GPU; "
            "a classifier of several sigmas: one plan per --sigma)"), _tensorrt_arguments),
}


class _Export:
    help = "export a classifier (" + ", ".join(EXPORTERS) + ")"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        sub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
        for name, exporter in EXPORTERS.items():
            q = sub.add_parser(name, help=exporter.help, description=exporter.help)
            exporter.add_arguments(q)
            q.set_defaults(_export=exporter.run)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        return args._export(args)


COMMAND = _Export()
