"""Certified accuracy of certify TSVs: a markdown table at chosen radii, average certified radius, plot.

Certified accuracy at r = fraction of the file's images whose prediction is correct with radius >= r.
With files for several sigmas on the same images, the "best" column takes the maximum over files at
each radius, as the papers' tables do. ACR = mean over images of (radius if correct else 0).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rrcm.errors import UserError

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


@dataclass(frozen=True)
class Certificates:
    name: str
    idx: np.ndarray  # (N,) int
    correct: np.ndarray  # (N,) bool
    radius: np.ndarray  # (N,) float, 0 for abstentions

    def accuracy(self, radii) -> np.ndarray:
        """Certified accuracy at each radius."""
        radii = np.asarray(radii, dtype=np.float64)
        return (self.correct[None, :] & (self.radius[None, :] >= radii[:, None])).mean(axis=1)

    def acr(self) -> float:
        return float(np.where(self.correct, self.radius, 0.0).mean())


def read_certificates(path: str | Path) -> Certificates:
    """The rows of a TSV with columns idx, radius and correct (rrcm certify's or Cohen et al.'s certify.py's)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e.strerror if isinstance(e, OSError) else e})") from None
    header = lines[0].split("\t") if lines else []
    if not {"idx", "radius", "correct"} <= set(header):
        raise UserError(f"{path}: not a certify TSV (needs idx, radius and correct columns; predict TSVs have no radius)")
    cols = [header.index(c) for c in ("idx", "radius", "correct")]
    rows = [line.split("\t") for line in lines[1:] if line]
    try:
        values = np.array([[float(r[c]) for c in cols] for r in rows], dtype=np.float64).reshape(-1, 3)
    except (ValueError, IndexError):
        raise UserError(f"{path}: malformed row (expected numbers in idx, radius and correct)") from None
    if len(values) == 0:
        raise UserError(f"{path}: no rows")
    if not np.isfinite(values).all() or (values[:, 1] < 0).any() or not np.isin(values[:, 2], (0, 1)).all():
        raise UserError(f"{path}: radius must be finite and >= 0, correct 0 or 1")
    return Certificates(str(path), values[:, 0].astype(np.int64), values[:, 2] == 1, values[:, 1])


def markdown_table(files: list[Certificates], radii, versus: list[Certificates] | None = None) -> str:
    """Certified accuracy (%) per radius, one column per file plus the best-over-files envelope, then ACR.

    With `versus` (a second method's files, e.g. a baseline's), its columns and envelope follow, and a last
    column gives the difference of the two envelopes.
    """
    groups = [files] + ([versus] if versus else [])
    head, columns, acrs, images, envelopes = ["radius"], [], [], [], []
    for k, group in enumerate(groups):
        acc = np.stack([f.accuracy(radii) for f in group])  # (files, radii)
        head += [f.name for f in group]
        columns += [[f"{100 * a:.1f}" for a in row] for row in acc]
        acrs += [f"{f.acr():.3f}" for f in group]
        images += [str(len(f.idx)) for f in group]
        if len(group) > 1 or versus:
            envelopes.append(acc.max(axis=0))
            head.append("best" if k == 0 else "best (versus)")
            columns.append([f"{100 * a:.1f}" for a in envelopes[-1]])
            acrs.append("")
            images.append("")
    if versus:
        head.append("difference")
        columns.append([f"{100 * (a - b):+.1f}" for a, b in zip(*envelopes)])
        acrs.append("")
        images.append("")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [f"| {r:g} | " + " | ".join(col[j] for col in columns) + " |" for j, r in enumerate(radii)]
    lines.append("| ACR | " + " | ".join(acrs) + " |")
    lines.append("| images | " + " | ".join(images) + " |")
    return "\n".join(lines)


def plot(files: list[Certificates], out: str | Path, versus: list[Certificates] | None = None) -> None:
    """Certified accuracy against radius, one curve per file and the envelope (`versus` files dashed), saved to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [files] + ([versus] if versus else [])
    top = max(float(f.radius.max()) for group in groups for f in group)
    grid = np.linspace(0.0, max(top, 1e-3) * 1.05, 400)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k, group in enumerate(groups):
        curves = np.stack([f.accuracy(grid) for f in group])
        style = "-" if k == 0 else ":"
        for f, curve in zip(group, curves):
            ax.plot(grid, curve, style, alpha=0.6, label=f.name)
        if len(group) > 1 or versus:
            ax.plot(grid, curves.max(axis=0), "k-" if k == 0 else "k--", linewidth=2,
                    label="best" if k == 0 else "best (versus)")
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=120)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot write plot {out}: {e}") from None
    finally:
        plt.close(fig)


class _Analyze:
    help = "certified-accuracy table, average certified radius and plot of certify TSVs"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("files", nargs="+", metavar="FILE.tsv", help="TSVs from 'rrcm certify' (or Cohen et al.'s certify.py)")
        p.add_argument("--radii", type=float, nargs="+", default=list(DEFAULT_RADII),
                       help="radii of the table's rows (default: 0 0.25 0.5 0.75 1 1.5 2)")
        p.add_argument("--versus", nargs="+", default=None, metavar="FILE.tsv",
                       help="a second method's TSVs (e.g. a baseline's), side by side with its own envelope and the "
                            "difference of the two envelopes")
        p.add_argument("--plot", default=None, metavar="OUT.png", help="also save a plot of certified accuracy against radius")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        if any(not (r >= 0 and np.isfinite(r)) for r in args.radii):
            raise UserError(f"radii must be finite and >= 0, got {args.radii}")
        files = [read_certificates(path) for path in args.files]
        versus = [read_certificates(path) for path in args.versus] if args.versus else None
        if len({tuple(np.sort(f.idx)) for f in files + (versus or [])}) > 1:
            print("note: the files certify different images; the best column mixes them", flush=True)
        print(markdown_table(files, args.radii, versus))
        if args.plot:
            plot(files, args.plot, versus)
            print(f"plot: {args.plot}")
        return 0


COMMAND = _Analyze()
