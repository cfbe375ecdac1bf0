"""Tables, plot and one-line summaries of the TSVs of `rrcm certify` and `rrcm predict` (or Cohen et al.'s certify.py).

A file's kind is read from its header; columns are found by name and extra ones (e.g. `sigma`) are allowed:
- certificates, `idx ... radius correct [samples] time` (certify, certify --adaptive, certify.py). Certified
  accuracy at r = fraction of the images whose prediction is correct with radius >= r; ACR = mean over images
  of (radius if correct else 0). With files for several sigmas on the same images, "best" takes the maximum
  over files at each radius, as the papers' tables do: an envelope chosen after the fact, not a certificate of
  one rule (a cascade over the sigmas is one: its rows carry samples and the answering stage's sigma, - for none).
- decisions, `idx label predict certified samples time` (certify --radius r, with r in the sidecar): certified
  accuracy at r = fraction of the images certified at r whose prediction is the label.
- predictions, `idx label predict correct time` (predict): accuracy and abstention rate.
FILE.tsv.json, the run's parameters next to FILE.tsv, names the plot's curves and titles it when present.
An image counts once: rows that repeat an idx are dropped, with a note, when they equal the first apart from
their time; a file that repeats an idx with another result is refused.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rrcm.engine.tsv import TIME
from rrcm.errors import UserError

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
SUMMARY_RADII = (0.0, 0.25, 0.5, 1.0)
ABSTAIN = -1  # rrcm.engine.stats.ABSTAIN, written as the prediction of an abstention
COLOUR_FAMILIES = ("Blues", "Oranges")  # the files' curves, then --versus's


@dataclass(frozen=True)
class _Rows:
    """What every kind of TSV holds besides its results: the images, what they cost, the run's parameters."""

    name: str
    idx: np.ndarray  # (N,) int
    samples: np.ndarray | None = field(default=None, kw_only=True)  # (N,) a samples column: n0 + estimation
    seconds: np.ndarray | None = field(default=None, kw_only=True)  # (N,) the time column
    sidecar: dict = field(default_factory=dict, kw_only=True)  # FILE.tsv.json, {} without one
    repeated: int = field(default=0, kw_only=True)  # rows dropped as repeats of an earlier row

    def samples_per_image(self) -> np.ndarray | None:
        """Noisy forward passes per image: the samples column, else the fixed budget recorded in the sidecar."""
        if self.samples is not None:
            return self.samples
        n, n0 = self.sidecar.get("n"), self.sidecar.get("n0")
        if not isinstance(n, int) or self.sidecar.get("adaptive") or "radius" in self.sidecar:
            return None
        per_image = n + (n0 if isinstance(n0, int) and self.sidecar.get("command") == "certify" else 0)
        return np.full(len(self.idx), per_image, dtype=np.int64)

    def samples_per_second(self) -> float | None:
        """Samples over the summed time column: the rate of one process (rows of torchrun shards add their times)."""
        samples = self.samples_per_image()
        if samples is None or self.seconds is None or self.seconds.sum() <= 0:
            return None
        return float(samples.sum() / self.seconds.sum())


@dataclass(frozen=True)
class Certificates(_Rows):
    """A certify TSV: a radius per image (0 for abstentions) and whether the prediction is correct."""

    correct: np.ndarray  # (N,) bool
    radius: np.ndarray  # (N,) float
    sigma: np.ndarray | None = field(default=None, kw_only=True)  # (N,) a sigma column: each image's noise level

    def accuracy(self, radii) -> np.ndarray:
        """Certified accuracy at each radius."""
        radii = np.asarray(radii, dtype=np.float64)
        return (self.correct[None, :] & (self.radius[None, :] >= radii[:, None])).mean(axis=1)

    def acr(self) -> float:
        return float(np.where(self.correct, self.radius, 0.0).mean())


@dataclass(frozen=True)
class Decisions(_Rows):
    """A certify --radius TSV: whether each image's prediction is certified at the one radius r."""

    correct: np.ndarray  # (N,) bool: predict == label
    certified: np.ndarray  # (N,) bool

    @property
    def r(self) -> float | None:
        """The radius of the decisions, from the sidecar (None without one)."""
        r = self.sidecar.get("radius")
        return float(r) if isinstance(r, (int, float)) else None

    def accuracy(self) -> float:
        """Certified accuracy at r."""
        return float((self.certified & self.correct).mean())


@dataclass(frozen=True)
class Predictions(_Rows):
    """A predict TSV: whether each smoothed prediction is correct, or an abstention."""

    correct: np.ndarray  # (N,) bool
    abstained: np.ndarray  # (N,) bool


Results = Certificates | Decisions | Predictions

_TIMEDELTA = re.compile(TIME)


def _seconds(text: str) -> float:
    """Seconds of a time column: str(datetime.timedelta), as rrcm and certify.py write it, or plain seconds."""
    match = _TIMEDELTA.fullmatch(text)
    if match is None:
        return float(text)
    days, hours, minutes, seconds = match.groups()
    return 86400 * int(days or 0) + 3600 * int(hours) + 60 * int(minutes) + float(seconds)


def _is_flag(v: float) -> bool:
    return v in (0, 1)


def _sigma(text: str) -> float:
    """A sigma column's value: the stage that answered, NaN for "-" (none did: an abstention)."""
    return math.nan if text == "-" else float(text)


# column: (parse, check, what the check asks)
_COLUMNS = {
    "idx": (int, lambda v: v >= 0, ">= 0"),
    "label": (int, lambda v: v >= 0, ">= 0"),
    "predict": (int, lambda v: v >= ABSTAIN, f">= {ABSTAIN} ({ABSTAIN}: abstained)"),
    "correct": (int, _is_flag, "0 or 1"),
    "certified": (int, _is_flag, "0 or 1"),
    "samples": (int, lambda v: v >= 1, ">= 1"),
    "radius": (float, lambda v: math.isfinite(v) and v >= 0, "finite and >= 0"),
    "sigma": (_sigma, lambda v: math.isnan(v) or (math.isfinite(v) and v > 0), "finite and > 0, or - (none)"),
    "time": (_seconds, lambda v: math.isfinite(v) and v >= 0, "a duration"),
}
# kind: (columns it needs, columns it also reads when present)
_KINDS = {
    Certificates: (("idx", "radius", "correct"), ("samples", "sigma", "time")),
    Decisions: (("idx", "label", "predict", "certified"), ("samples", "time")),
    Predictions: (("idx", "predict", "correct"), ("samples", "time")),
}


def _kind(path: Path, header: list[str]) -> type:
    for kind, (needed, _) in _KINDS.items():
        if set(needed) <= set(header):
            return kind
    raise UserError(f"{path}: not a certify or predict TSV (header {' '.join(header)!r}; needs idx with radius and "
                    f"correct, with certified, or with predict and correct)")


def read_sidecar(path: Path) -> dict:
    """FILE.tsv.json next to `path`, {} when there is none."""
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file():
        return {}
    try:
        recorded = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{sidecar}: unreadable sidecar ({e})") from None
    if not isinstance(recorded, dict):
        raise UserError(f"{sidecar}: unreadable sidecar (not a JSON object)")
    return recorded


def _parse_row(path: Path, number: int, fields: list[str], where: dict[str, int]) -> dict:
    """Column -> value of the columns at `where` of line `number`, checked."""
    row = {}
    for c, j in where.items():
        parse, check, rule = _COLUMNS[c]
        try:
            row[c] = parse(fields[j])
        except ValueError:
            what = {int: "an integer", float: "a number", _sigma: "a number or -"}.get(parse, "a duration")
            raise UserError(f"{path}: line {number}: malformed row ({c} {fields[j]!r} is not {what})") from None
        if not check(row[c]):
            raise UserError(f"{path}: line {number}: {c} must be {rule}, got {fields[j]!r}")
    return row


def read_results(path: str | Path) -> Results:
    """The rows of a TSV of `rrcm certify` (plain, --adaptive or --radius), `rrcm predict` or Cohen et al.'s certify.py."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}): not a TSV of results") from None
    lines = text.split("\n")
    header = lines[0].rstrip("\r").split("\t")
    kind = _kind(path, header)
    needed, optional = _KINDS[kind]
    where = {c: header.index(c) for c in needed + optional if c in header}
    values: dict[str, list] = {c: [] for c in where}
    first: dict[int, tuple[int, list[str]]] = {}  # idx -> (line, fields apart from time)
    repeated = 0
    for number, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise UserError(f"{path}: line {number}: malformed row ({len(fields)} fields, the header has {len(header)})")
        row = _parse_row(path, number, fields, where)
        result = [f for j, f in enumerate(fields) if j != where.get("time")]
        if row["idx"] in first:
            earlier, earlier_result = first[row["idx"]]
            if result != earlier_result:
                raise UserError(f"{path}: line {number} repeats idx {row['idx']} of line {earlier} with another result; "
                                f"an image counts once: remove one of the two rows")
            repeated += 1
            continue
        first[row["idx"]] = (number, result)
        for c, v in row.items():
            values[c].append(v)
    if not first:
        raise UserError(f"{path}: no rows")
    column = {c: np.array(v) for c, v in values.items()}
    common = dict(samples=column.get("samples"), seconds=column.get("time"), sidecar=read_sidecar(path),
                  repeated=repeated)
    idx = column["idx"].astype(np.int64)
    if kind is Certificates:
        return Certificates(str(path), idx, column["correct"] == 1, column["radius"].astype(np.float64),
                            sigma=column.get("sigma"), **common)
    if kind is Decisions:
        return Decisions(str(path), idx, column["predict"] == column["label"], column["certified"] == 1, **common)
    return Predictions(str(path), idx, column["correct"] == 1, column["predict"] == ABSTAIN, **common)


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _samples_text(f: Results, statistic) -> str:
    """`statistic` (np.mean, np.median) of a file's samples per image, "" when unknown."""
    samples = f.samples_per_image()
    return "" if samples is None else _count(statistic(samples))


def markdown_table(files: list[Certificates], radii, versus: list[Certificates] | None = None) -> str:
    """Certified accuracy (%) per radius, one column per file plus the best-over-files envelope, then ACR.

    With `versus` (a second method's files, e.g. a baseline's), its columns and envelope follow, and a last
    column gives the difference of the two envelopes. When a file has a samples column (certify --adaptive),
    rows of mean and median samples per image follow.
    """
    groups = [files] + ([versus] if versus else [])
    head, columns, per_file = ["radius"], [], []  # per_file: each column's file, None for envelopes
    envelopes = []
    for k, group in enumerate(groups):
        acc = np.stack([f.accuracy(radii) for f in group])  # (files, radii)
        head += [f.name for f in group]
        columns += [[f"{100 * a:.1f}" for a in row] for row in acc]
        per_file += list(group)
        if len(group) > 1 or versus:
            envelopes.append(acc.max(axis=0))
            head.append("best" if k == 0 else "best (versus)")
            columns.append([f"{100 * a:.1f}" for a in envelopes[-1]])
            per_file.append(None)
    if versus:
        head.append("difference")
        columns.append([f"{100 * (a - b):+.1f}" for a, b in zip(*envelopes)])
        per_file.append(None)

    def row(name: str, cell) -> str:
        return f"| {name} | " + " | ".join("" if f is None else cell(f) for f in per_file) + " |"

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [f"| {r:g} | " + " | ".join(col[j] for col in columns) + " |" for j, r in enumerate(radii)]
    lines.append(row("ACR", lambda f: f"{f.acr():.3f}"))
    lines.append(row("images", lambda f: str(len(f.idx))))
    if any(f is not None and f.samples is not None for f in per_file):
        lines.append(row("samples (mean)", lambda f: _samples_text(f, np.mean)))
        lines.append(row("samples (median)", lambda f: _samples_text(f, np.median)))
    return "\n".join(lines)


def decisions_table(files: list[Decisions]) -> str:
    """Certified accuracy (%) of certify --radius files at their radius, with samples per image."""
    lines = ["| file | r | certified accuracy (%) | samples (mean) | samples (median) | images |", "|---|---|---|---|---|---|"]
    for f in files:
        r = "?" if f.r is None else f"{f.r:g}"
        lines.append(f"| {f.name} | {r} | {100 * f.accuracy():.1f} | {_samples_text(f, np.mean)} | "
                     f"{_samples_text(f, np.median)} | {len(f.idx)} |")
    return "\n".join(lines)


def predictions_table(files: list[Predictions]) -> str:
    """Accuracy and abstention rate (%) of predict files."""
    lines = ["| file | accuracy (%) | abstained (%) | images |", "|---|---|---|---|"]
    lines += [f"| {f.name} | {100 * f.correct.mean():.1f} | {100 * f.abstained.mean():.1f} | {len(f.idx)} |"
              for f in files]
    return "\n".join(lines)


def summary_line(path: str | Path, processes: int = 1) -> str:
    """One line on a finished run's TSV: certified accuracy at a few radii (at its r for --radius, accuracy and
    abstentions for predict), and samples/s (of one process when `processes` > 1)."""
    result = read_results(path)
    n = len(result.idx)
    if isinstance(result, Certificates):
        text = (f"certified accuracy {' / '.join(f'{100 * a:.1f}' for a in result.accuracy(SUMMARY_RADII))}% at radius "
                f"{' / '.join(f'{r:g}' for r in SUMMARY_RADII)} of {n:,} images, ACR {result.acr():.3f}")
    elif isinstance(result, Decisions):
        r = "r (not recorded)" if result.r is None else f"r = {result.r:g}"
        text = f"certified accuracy {100 * result.accuracy():.1f}% at {r} of {n:,} images"
    else:
        text = f"accuracy {100 * result.correct.mean():.1f}%, abstained {100 * result.abstained.mean():.1f}% of {n:,} images"
    if result.samples is not None:
        text += f"; samples per image: mean {_samples_text(result, np.mean)}, median {_samples_text(result, np.median)}"
    rate = result.samples_per_second()
    if rate is not None:
        text += f"; {rate:,.0f} samples/s" + (" per process" if processes > 1 else "")
    return f"{Path(path).name}: {text}"


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _sigma_text(result: Certificates | Decisions) -> str | None:
    """'σ = 0.25', 'cascade σ = 1/0.5/0.25', or the sigmas of a sigma column; None when unknown."""
    recorded = result.sidecar.get("sigma")
    if isinstance(recorded, (int, float)):
        return f"σ = {recorded:g}"
    if isinstance(recorded, list) and recorded and all(isinstance(v, (int, float)) for v in recorded):
        return "cascade σ = " + "/".join(f"{v:g}" for v in sorted(recorded, reverse=True))
    sigma = getattr(result, "sigma", None)
    if sigma is not None and not np.isnan(sigma).all():
        values = np.unique(sigma[~np.isnan(sigma)])
        return f"σ = {values[0]:g}" if len(values) == 1 else "σ per image: " + "/".join(f"{v:g}" for v in values)
    return None


def series_label(result: Certificates | Decisions, method: str | None = None) -> str:
    """A curve's legend text: the method (`method`, else the sidecar's model), sigma, and what sets the run
    apart (precision other than fp32, --adaptive); the file name without a sidecar or method."""
    model = result.sidecar.get("model")
    if method is None and not isinstance(model, str):
        return Path(result.name).name
    parts = [method or Path(model).name]
    sigma = _sigma_text(result)
    parts.append(sigma if sigma is not None else Path(result.name).name)
    if result.sidecar.get("precision") not in (None, "fp32"):
        parts.append(str(result.sidecar["precision"]))
    if result.sidecar.get("adaptive"):
        parts.append("adaptive")
    return ", ".join(parts)


def _common(values: list) -> str | None:
    """The one value all files share, "mixed" if they differ, None when none records it."""
    distinct = {json.dumps(v) for v in values}
    if distinct == {"null"}:
        return None
    return _number(values[0]) if len(distinct) == 1 else "mixed"


def plot_title(results: list[Certificates | Decisions]) -> str:
    """The dataset, number of images, n0, n and alpha of the runs, from their sidecars ("mixed" where they differ)."""
    parts = [f"{_common([len(r.idx) for r in results])} images"]
    for key, symbol in (("n0", "n0"), ("n", "n"), ("alpha", "α")):
        value = _common([r.sidecar.get(key) for r in results])
        if value is not None:
            parts.append(f"{symbol} = {value}")
    dataset = _common([r.sidecar.get("dataset") for r in results])
    return (f"{dataset}: " if dataset not in (None, "mixed") else "") + ", ".join(parts)


def _until_zero(grid: np.ndarray, accuracy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A curve's points in percent, ending with its drop to 0: curves do not pile up on the x axis."""
    positive = np.flatnonzero(accuracy > 0)
    if len(positive) == 0:
        return grid, 100 * accuracy
    end = positive[-1] + 1
    return np.append(grid[:end], grid[end - 1]), 100 * np.append(accuracy[:end], 0.0)


def make_figure(files: list[Results], versus: list[Results] | None = None, labels: list[str] | None = None):
    """Certified accuracy (%) against radius: a curve per certify file (--versus's dashed), a marker per certify
    --radius file, each group (`files`, `versus`) in its own colour family, its envelope as a wide pale band beneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [[f for f in g if isinstance(f, (Certificates, Decisions))] for g in [files] + ([versus] if versus else [])]
    shown = [f for g in groups for f in g]
    if not shown:
        raise UserError("nothing to plot: predict TSVs have no radius")
    curves = [f for f in shown if isinstance(f, Certificates)]
    decided = [f.r for f in shown if isinstance(f, Decisions) and f.r is not None]
    top = max([float(f.radius.max()) for f in curves] + decided + [1e-3]) * 1.05
    # Certified accuracy is a left-continuous step function of r, changing only at the files' radii.
    grid = np.unique(np.concatenate([[0.0, top]] + [f.radius[f.correct] for f in curves]))
    keys = [[series_label(f, labels[k] if labels else None) for f in g] for k, g in enumerate(groups)]
    curve_keys = [key for g, ks in zip(groups, keys) for f, key in zip(g, ks) if isinstance(f, Certificates)]
    # Curves of one name (e.g. two seeds) are told apart by their files; decisions join the curve of their name.
    keys = [[f"{key} ({Path(f.name).name})" if isinstance(f, Certificates) and curve_keys.count(key) > 1 else key
             for f, key in zip(g, ks)] for g, ks in zip(groups, keys)]
    fig, ax = plt.subplots(figsize=(9.5, 4.6))
    for k, (group, group_keys) in enumerate(zip(groups, keys)):
        series = list(dict.fromkeys(group_keys))
        cmap = matplotlib.colormaps[COLOUR_FAMILIES[k]]
        colour = {s: cmap(0.5 + 0.45 * j / max(len(series) - 1, 1)) for j, s in enumerate(series)}
        group_curves, sigmas, labelled = [], [], set()
        for f, key in zip(group, group_keys):
            if isinstance(f, Certificates):
                group_curves.append(f.accuracy(grid))
                sigmas.append(_sigma_text(f))
                ax.plot(*_until_zero(grid, group_curves[-1]), drawstyle="steps-pre", color=colour[key], linewidth=1.6,
                        linestyle="--" if k else "-", label=key, zorder=3)
            elif f.r is not None:  # one legend entry for a series of decisions at several r
                ax.scatter([f.r], [100 * f.accuracy()], color=colour[key], edgecolors="black", s=40, zorder=4,
                           label=f"_{key}" if key in labelled else f"{key}, decision at r")
                labelled.add(key)
        if len(group_curves) > 1 or (versus and group_curves):
            best = "best over σ" if None not in sigmas and len(set(sigmas)) == len(sigmas) > 1 else "best"
            name = f"{labels[k]}, {best}" if labels else best + (" (versus)" if k else "")
            ax.plot(*_until_zero(grid, np.max(group_curves, axis=0)), drawstyle="steps-pre", color=cmap(0.95), linewidth=7,
                    alpha=0.25, solid_capstyle="butt", zorder=2, label=name)
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_xlim(0, top)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(plot_title(shown), fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def plot(files: list[Results], out: str | Path, versus: list[Results] | None = None,
         labels: list[str] | None = None) -> None:
    """make_figure's plot, saved to `out`."""
    import matplotlib.pyplot as plt

    fig = make_figure(files, versus, labels)
    try:
        fig.savefig(out, dpi=120)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot write plot {out}: {e}") from None
    finally:
        plt.close(fig)


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


class _Analyze:
    help = "certified-accuracy table, average certified radius and plot of certify (and predict) TSVs"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.description = (
            "Certified accuracy (%) at each radius, ACR and images of certify TSVs (plain, --adaptive, or Cohen et "
            "al.'s certify.py), with the best-over-files envelope; certified accuracy at r of certify --radius TSVs; "
            "accuracy and abstentions of predict TSVs. Each kind gets its own table. An image counts once: repeated "
            "rows equal apart from their time are dropped, a repeated idx with another result is refused.")
        p.add_argument("files", nargs="+", metavar="FILE.tsv", help="TSVs from 'rrcm certify' or 'rrcm predict' (or Cohen et al.'s certify.py)")
        p.add_argument("--radii", type=float, nargs="+", default=list(DEFAULT_RADII),
                       help="radii of the table's rows (default: 0 0.25 0.5 0.75 1 1.5 2)")
        p.add_argument("--versus", nargs="+", default=None, metavar="FILE.tsv",
                       help="a second method's TSVs (e.g. a baseline's), side by side with its own envelope and the "
                            "difference of the two envelopes")
        p.add_argument("--labels", nargs="+", default=None, metavar="NAME",
                       help="the plot's method names: one for the files, a second for --versus (e.g. --labels rRCM "
                            "baseline); default: each run's model, from FILE.tsv.json")
        p.add_argument("--plot", default=None, metavar="OUT.png",
                       help="also save a plot of certified accuracy against radius (legend from the sidecars FILE.tsv.json)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        if any(not (r >= 0 and np.isfinite(r)) for r in args.radii):
            raise UserError(f"radii must be finite and >= 0, got {args.radii}")
        groups = 2 if args.versus else 1
        if args.labels is not None and len(args.labels) != groups:
            raise UserError(f"--labels takes {groups} name{'s' if groups > 1 else ''} (the files'"
                            f"{' and --versus' if groups > 1 else ''}), got {len(args.labels)}: {' '.join(args.labels)}")
        files = [read_results(path) for path in args.files]
        versus = [read_results(path) for path in args.versus] if args.versus else []
        for f in files + versus:
            if f.repeated:
                _note(f"{f.name}: {f.repeated} repeated row(s) equal to an earlier one apart from their time, counted once")
        tables = []
        for kind in (Certificates, Decisions, Predictions):
            mine, theirs = [f for f in files if isinstance(f, kind)], [f for f in versus if isinstance(f, kind)]
            if not mine and not theirs:
                continue
            if len({tuple(np.sort(f.idx)) for f in mine + theirs}) > 1:
                _note(f"the {kind.__name__.lower()} files are on different images; compare their columns with care")
            if kind is Certificates:
                tables.append(markdown_table(mine, args.radii, theirs) if mine else markdown_table(theirs, args.radii))
            elif kind is Decisions:
                tables.append(decisions_table(mine + theirs))
                if any(f.r is None for f in mine + theirs):
                    _note("a certify --radius TSV without its sidecar FILE.tsv.json: its r is unknown ('?')")
            else:
                tables.append(predictions_table(mine + theirs))
        print("\n\n".join(tables))
        if args.plot:
            plot(files, args.plot, versus, args.labels)
            print(f"plot: {args.plot}")
        return 0


COMMAND = _Analyze()
