"""The `rrcm` command line. Each subcommand lives with its stage; this file only dispatches.

A subcommand is an object with `help`, `add_arguments(parser)` and `run(args) -> int`, named here
as "module:attribute" and imported only when it is the one asked for.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from rrcm.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("rrcm.engine.demo:COMMAND", "certify a few Fashion-MNIST test images with the bundled rRCM classifier"),
    "info": ("rrcm.cli:INFO", "print a preset's sizes and parameter counts per part"),
    "pretrain": ("rrcm.train.pretrain:COMMAND", "pre-train an rRCM encoder (contrastive denoising + consistency)"),
    "finetune": ("rrcm.train.finetune:COMMAND", "fine-tune an encoder into a classifier for one noise level"),
    "certify": ("rrcm.engine.commands:CERTIFY", "certify test images (Cohen et al.'s CERTIFY), one TSV row each"),
    "predict": ("rrcm.engine.commands:PREDICT", "smoothed predictions with abstention (Cohen et al.'s PREDICT)"),
    "analyze": ("rrcm.engine.analyze:COMMAND", "certified-accuracy table, average certified radius and plot of TSVs"),
    "export": ("rrcm.export.commands:COMMAND", "export a classifier for one sigma (onnx, aoti, tensorrt)"),
}


def _load(target: str):
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rrcm",
        description="Train, export and certify rRCM classifiers with randomized smoothing.",
        epilog="Run 'rrcm COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (target, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            command = _load(target)
            command.add_arguments(p)
            p.set_defaults(_run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = build_parser(selected).parse_args(argv)
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"rrcm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rrcm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout piped into a reader that has quit (e.g. head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush fails silently
        return 1
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2


class _Info:
    help = COMMANDS["info"][1]

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("preset", help="preset name (rrcm-b-imagenet, rrcm-s-imagenet, rrcm-b-cifar, fmnist-s, fmnist-b, tiny)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from rrcm.model import parameter_counts
        from rrcm.presets import get_preset

        cfg = get_preset(args.preset)
        print(f"{args.preset}: {cfg.image_size} px, {cfg.in_chans} channel(s), patch {cfg.patch_size}, "
              f"width {cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads, {cfg.num_patches + 2} tokens, "
              f"projector {cfg.proj_hidden} -> {cfg.proj_dim}, {cfg.num_classes} classes ({cfg.dataset})")
        counts = parameter_counts(cfg)
        for part, n in counts.items():
            print(f"  {part:<16} {n:>13,d}  ({n / 1e6:.1f}M)")
        total = sum(counts.values())
        print(f"  {'total':<16} {total:>13,d}  ({total / 1e6:.1f}M)")
        return 0


INFO = _Info()
