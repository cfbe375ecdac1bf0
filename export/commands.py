"""`rrcm export FORMAT ...`: one sub-subcommand per format, each living in its exporter's module.

An exporter module keeps its heavy imports (onnx, tensorrt, ...) inside functions, so listing the
formats stays cheap.
"""
from __future__ import annotations

import argparse
import importlib

EXPORTERS: dict[str, str] = {
    "onnx": "rrcm.export.onnx:ONNX_COMMAND",
    "aoti": "rrcm.export.aoti:AOTI_COMMAND",
    "tensorrt": "rrcm.export.tensorrt:TENSORRT_COMMAND",
}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model and --sigma, the same for every exporter."""
    p.add_argument("--model", required=True, help="fine-tuned checkpoint folder or bundled model name (fashion-mnist)")
    p.add_argument("--sigma", type=float, default=None,
                   help="noise level the classifier was fine-tuned for (default: the checkpoint's; needed for a bundled model)")


def _load(target: str):
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


class _Export:
    help = "export a classifier for one sigma (" + ", ".join(EXPORTERS) + ")"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        sub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
        for name, target in EXPORTERS.items():
            command = _load(target)
            q = sub.add_parser(name, help=command.help, description=command.help)
            command.add_arguments(q)
            q.set_defaults(_export=command.run)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        return args._export(args)


COMMAND = _Export()
