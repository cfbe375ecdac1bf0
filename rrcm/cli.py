"""The `rrcm` command line. Each subcommand lives with its stage; this file only dispatches.

A subcommand is an object with `help`, `add_arguments(parser)` and `run(args) -> int`, named here
as "module:attribute" and imported only when it is the one asked for.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from rrcm.errors import PerformanceWarning, UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("rrcm.engine.demo:COMMAND", "certify a few Fashion-MNIST test images with the bundled rRCM classifier"),
    "info": ("rrcm.cli:INFO", "list the model presets, or print one preset's sizes and parameter counts per part"),
    "pretrain": ("rrcm.train.commands:PRETRAIN", "pre-train an rRCM encoder (contrastive denoising + consistency)"),
    "finetune": ("rrcm.train.commands:FINETUNE", "fine-tune an encoder into a classifier for one noise level, or one for several"),
    "certify": ("rrcm.engine.commands:CERTIFY", "certify test images (Cohen et al.'s CERTIFY), one TSV row each"),
    "predict": ("rrcm.engine.commands:PREDICT", "smoothed predictions with abstention (Cohen et al.'s PREDICT)"),
    "analyze": ("rrcm.engine.analyze:COMMAND", "certified-accuracy table, average certified radius and plot of TSVs"),
    "export": ("rrcm.export.commands:COMMAND", "export a classifier for one sigma (onnx, aoti, tensorrt)"),
    "bench": ("rrcm.engine.bench:COMMAND", "certification throughput here: reference loop, engine configurations, fraction of the limit"),
}


def _load(target: str):
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as rrcm's one-line errors (exit code 2), not usage text; subcommand
    parsers inherit it."""

    def error(self, message: str):
        raise UserError(f"{message} (see '{self.prog} --help')")


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    parser = _Parser(
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


_format_warning = warnings.formatwarning


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """rrcm's own warnings as one line, like its errors; other libraries' with their source line."""
    if issubclass(category, PerformanceWarning):
        return f"rrcm: warning: {message}\n"
    return _format_warning(message, category, filename, lineno, line)


def _end_progress_bars() -> None:
    """Close the progress bars an error left open, so that the error starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.formatwarning = _warning_line
    selected = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = build_parser(selected).parse_args(argv)
        return int(args._run(args) or 0)
    except UserError as e:
        _end_progress_bars()
        print(f"rrcm: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _end_progress_bars()
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
        from rrcm.presets import PRESETS

        p.add_argument("preset", metavar="PRESET", nargs="?",
                       help=f"preset name: {', '.join(PRESETS)} (default: list them all, one line each)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from rrcm.model import parameter_counts
        from rrcm.presets import PRESETS, get_preset

        if args.preset is None:
            width = max(map(len, PRESETS))
            print(f"{'preset':<{width}}  {'dataset':<13} {'px':>4} {'patch':>5} {'width':>5} {'depth':>5} {'heads':>5} "
                  f"{'parameters':>12}")
            for name, cfg in PRESETS.items():
                total = sum(parameter_counts(cfg).values())
                print(f"{name:<{width}}  {cfg.dataset:<13} {cfg.image_size:>4} {cfg.patch_size:>5} {cfg.embed_dim:>5} "
                      f"{cfg.depth:>5} {cfg.num_heads:>5} {total:>12,d}")
            print("'rrcm info PRESET' for one preset's parts")
            return 0
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
