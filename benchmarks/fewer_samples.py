"""Decision at a radius against fixed-N CERTIFY on the same images: certified accuracy and samples per image.

    python benchmarks/fewer_samples.py --fixed FIXED.tsv --decision 0.25=R025.tsv 0.5=R05.tsv ... --out OUT.json

FIXED.tsv comes from `rrcm certify` (columns idx label predict radius correct time; n0 + n samples per image,
read from its JSON sidecar), each R.tsv from `rrcm certify --radius r` on the same model (columns idx label
predict certified samples time), on the same images or more: the comparison takes the fixed run's images,
and the decision's figures over all of its own images are reported too. An image counts as certified at r
when it is correct and its fixed-N radius is >= r, or correct and certified by the decision. Prints a
markdown table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def read_tsv(path: Path) -> dict[str, np.ndarray]:
    header, *rows = [line.split("\t") for line in path.read_text().splitlines() if line]
    columns = list(zip(*rows))
    return {name: np.array(col[:len(rows)]) for name, col in zip(header, columns)}


def summarize(fixed: Path, decisions: dict[float, Path]) -> dict:
    base = read_tsv(fixed)
    sidecar = json.loads(fixed.with_name(fixed.name + ".json").read_text())
    fixed_samples = sidecar["n0"] + sidecar["n"]
    idx = base["idx"].astype(int)
    correct = base["correct"].astype(int) == 1
    radius = base["radius"].astype(float)
    rows = []
    for r, path in sorted(decisions.items()):
        every = read_tsv(path)
        all_certified = (every["predict"] == every["label"]) & (every["certified"].astype(int) == 1)
        all_samples = every["samples"].astype(int)
        position = {i: k for k, i in enumerate(every["idx"].astype(int))}
        if any(i not in position for i in idx):
            raise SystemExit(f"{path}: lacks images of {fixed}")
        d = {name: col[[position[i] for i in idx]] for name, col in every.items()}
        d_correct = d["predict"].astype(int) == d["label"].astype(int)
        samples = d["samples"].astype(int)
        rows.append({
            "decision_all_images": int(len(all_samples)),
            "decision_all_certified_accuracy": float(all_certified.mean()),
            "decision_all_mean_samples_per_image": float(all_samples.mean()),
            "radius": r, "images": int(len(idx)),
            "fixed_certified_accuracy": float((correct & (radius >= r)).mean()),
            "decision_certified_accuracy": float((d_correct & (d["certified"].astype(int) == 1)).mean()),
            "fixed_samples_per_image": fixed_samples,
            "decision_mean_samples_per_image": float(samples.mean()),
            "decision_median_samples_per_image": float(np.median(samples)),
            "sample_reduction": fixed_samples / float(samples.mean()),
        })
    return {"fixed": str(fixed), "sigma": sidecar["sigma"], "alpha": sidecar["alpha"], "model": sidecar["model"],
            "decisions": {str(r): str(p) for r, p in decisions.items()}, "rows": rows}


def markdown(summary: dict) -> str:
    lines = ["| r | certified, fixed N | certified, decision | samples/image, fixed | samples/image, decision "
             "(mean / median) | fewer | decision on all its images: certified, mean samples |",
             "|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        lines.append(f"| {row['radius']:g} | {100 * row['fixed_certified_accuracy']:.1f}% | "
                     f"{100 * row['decision_certified_accuracy']:.1f}% | {row['fixed_samples_per_image']:,} | "
                     f"{row['decision_mean_samples_per_image']:,.0f} / {row['decision_median_samples_per_image']:,.0f} | "
                     f"{row['sample_reduction']:.0f}x | {100 * row['decision_all_certified_accuracy']:.1f}% of "
                     f"{row['decision_all_images']}, {row['decision_all_mean_samples_per_image']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixed", type=Path, required=True, help="TSV of rrcm certify (fixed n)")
    p.add_argument("--decision", nargs="+", required=True, metavar="R=TSV", help="TSVs of rrcm certify --radius R")
    p.add_argument("--out", type=Path, required=True, help="JSON to write")
    args = p.parse_args()
    decisions = {float(r): Path(f) for r, f in (item.split("=", 1) for item in args.decision)}
    summary = summarize(args.fixed, decisions)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(markdown(summary))


if __name__ == "__main__":
    main()
