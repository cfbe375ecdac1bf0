"""`rrcm demo`: certify a handful of Fashion-MNIST test images with a bundled classifier and print the result.

Image idx gets noise seed derive_seed(seed, idx), as in `rrcm certify`, so each row equals the row that
`rrcm certify --model fashion-mnist --sigma S --n N --skip K --max M --seed SEED` writes for it.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from rrcm.errors import UserError

DEMO_RADII = (0.0, 0.25, 0.5, 0.75)


class _Demo:
    help = "certify a few Fashion-MNIST test images with the bundled rRCM classifier and print a table"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--sigma", type=float, default=0.25, help="bundled classifier: 0.25, 0.5 or 1.0 (default 0.25)")
        p.add_argument("--images", type=int, default=10, help="how many test images (default 10)")
        p.add_argument("--skip", type=int, default=1000, help="take every K-th test image: idx 0, K, 2K, ... (default 1000)")
        p.add_argument("--n", type=int, default=10_000, help="estimation samples per image (default 10000)")
        p.add_argument("--n0", type=int, default=100, help="selection samples per image (default 100)")
        p.add_argument("--alpha", type=float, default=0.001, help="failure probability of each certificate (default 0.001)")
        p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
        p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: its standard location)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        import torch

        from rrcm.classifier import load_classifier
        from rrcm.data import load_dataset
        from rrcm.datasets import DATASETS
        from rrcm.engine.analyze import Certificates, markdown_table
        from rrcm.engine.certifier import Certifier, derive_seed
        from rrcm.engine.runner import round_down

        from rrcm.checks import MAX_SEED, check_int, check_number

        check_int("--images", args.images, 1)
        check_int("--skip", args.skip, 1)
        check_int("--n", args.n, 1, 10**9)
        check_int("--n0", args.n0, 1, 10**9)
        check_int("--seed", args.seed, 0, MAX_SEED)
        check_number("--alpha", args.alpha, 0.0, 1.0, low_open=True, high_open=True)
        model = load_classifier("fashion-mnist", args.sigma)
        dataset = load_dataset("fashion-mnist", "test", args.data_dir)
        names = DATASETS["fashion-mnist"].class_names
        idx = list(range(0, len(dataset), args.skip))[:args.images]
        images, labels = dataset.batch(torch.tensor(idx))
        certifier = Certifier(model, dataset.num_classes, args.sigma, batch_size=128)
        print(f"rrcm demo: bundled rRCM classifier for sigma {args.sigma:g}, {len(idx)} Fashion-MNIST test images, "
              f"n0 = {args.n0}, n = {args.n}, alpha = {args.alpha:g}", flush=True)
        start = time.perf_counter()
        results = certifier.certify_many(images, args.n0, args.n, args.alpha, [derive_seed(args.seed, i) for i in idx])
        seconds = time.perf_counter() - start

        print("\n| idx | label | prediction | radius | correct |\n|---|---|---|---|---|")
        for i, label, r in zip(idx, labels.tolist(), results):
            predicted = "abstain" if r.prediction == Certifier.ABSTAIN else names[r.prediction]
            print(f"| {i} | {names[label]} | {predicted} | {round_down(r.radius):.4f} | {int(r.prediction == label)} |")
        certificates = Certificates(f"sigma {args.sigma:g}", np.array(idx),
                                    np.array([r.prediction == y for r, y in zip(results, labels.tolist())]),
                                    np.array([r.radius for r in results]))
        print("\nCertified accuracy (%) at L2 radius:\n" + markdown_table([certificates], DEMO_RADII))
        samples = len(idx) * (args.n0 + args.n)
        print(f"\n{samples:,} noisy forward passes in {seconds:.1f} s ({samples / seconds:,.0f} samples/s). "
              f"Each radius holds with probability >= {1 - args.alpha:g}.")
        return 0


COMMAND = _Demo()
