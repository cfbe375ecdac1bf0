"""Sound against plain certification of the bundled Fashion-MNIST classifiers, at issue 21's setting.

    python benchmarks/sound_fashion_mnist.py --sigmas 0.25,0.5,1 --skip 500 --max 20 --n 10000 \
        --out benchmarks/results/sound-fashion-mnist.json

What `rrcm certify --model fashion-mnist --sigma S [--sound] --skip K --max M --n N` certifies (test images
0, K, 2K, ..., image idx seeded by derive_seed(0, idx), n0 = 100, alpha = 0.001), through the Python API,
fp32 eager torch, so that a third run fits beside the two: sound sampling of the classifier wrapped in
clip(x', 0, 1), the law that --sound certified before it stopped clipping (clip(x + i) with the old table;
the same law to within its 5.5e-17 per pixel). Prints a markdown table, writes JSON with the CPU's name.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rrcm import load_classifier
from rrcm.data import load_dataset
from rrcm.engine import Certifier
from rrcm.engine.certifier import derive_seed

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
N0, ALPHA = 100, 0.001


def cpu_name() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def run(model: nn.Module, sigma: float, sound: bool, images: torch.Tensor, labels: np.ndarray, seeds: list[int],
        n: int, batch: int) -> dict:
    certifier = Certifier(model, 10, sigma, batch_size=batch, sound=sound)
    start = time.perf_counter()
    results = certifier.certify_many(images, N0, n, ALPHA, seeds)
    seconds = time.perf_counter() - start
    correct = np.array([r.prediction == y for r, y in zip(results, labels)])
    radius = np.array([r.radius for r in results])
    return {"certified_accuracy": {str(r): float(np.mean(correct & (radius >= r))) for r in RADII},
            "predictions": [int(r.prediction) for r in results], "radii": [round(float(x), 4) for x in radius],
            "seconds": round(seconds, 1), "samples_per_s": round(len(images) * (N0 + n) / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sigmas", default="0.25,0.5,1")
    parser.add_argument("--skip", type=int, default=500)
    parser.add_argument("--max", type=int, default=20)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: a shared CPU)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    idx = list(range(0, args.skip * args.max, args.skip))
    images, labels = load_dataset("fashion-mnist", "test").batch(torch.tensor(idx))
    labels = labels.numpy()
    seeds = [derive_seed(0, i) for i in idx]
    report = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "images": idx, "n0": N0, "n": args.n,
              "alpha": ALPHA, "batch": args.batch, "sigmas": {}}
    print("| sigma | run | " + " | ".join(f"r = {r}" for r in RADII) + " | samples/s |")
    print("|---|---|" + "---|" * (len(RADII) + 1))
    for sigma in (float(s) for s in args.sigmas.split(",")):
        model = load_classifier("fashion-mnist", sigma=sigma)
        clipped = nn.Sequential(nn.Hardtanh(0.0, 1.0), model)  # f(clip(x', 0, 1))
        runs = {"plain": run(model, sigma, False, images, labels, seeds, args.n, args.batch),
                "sound": run(model, sigma, True, images, labels, seeds, args.n, args.batch),
                "sound, clipped (before)": run(clipped, sigma, True, images, labels, seeds, args.n, args.batch)}
        agree = np.equal(runs["sound"]["predictions"], runs["plain"]["predictions"])
        runs["sound"]["agree_with_plain"] = float(agree.mean())
        runs["sound"]["time_ratio_to_plain"] = round(runs["sound"]["seconds"] / runs["plain"]["seconds"], 2)
        report["sigmas"][str(sigma)] = runs
        for name, r in runs.items():
            cells = " | ".join(f"{100 * v:.0f}%" for v in r["certified_accuracy"].values())
            print(f"| {sigma:g} | {name} | {cells} | {r['samples_per_s']:,} |", flush=True)
    report["load_average"] = os.getloadavg()  # other jobs on the CPU: time figures are ratios within one run
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
