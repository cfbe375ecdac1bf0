"""The C++ embedding (cpp/): built with CMake against the pip wheel's libtorch, checked against Python.

The build folder build/cpp is kept between runs (incremental rebuilds take seconds).
"""
from __future__ import annotations

import itertools
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy_helpers import SIGMA, fashion_test_images, tiny_checkpoint, tiny_package
from rrcm.engine import stats

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cpp"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def cli() -> Path:
    if shutil.which("cmake") is None or _compiler() is None:
        pytest.skip("no C++ compiler or no cmake on PATH: the C++ embedding cannot be built here")
    generator = ["-G", "Ninja"] if shutil.which("ninja") and not (BUILD / "Makefile").exists() else []
    torch_dir = Path(torch.utils.cmake_prefix_path) / "Torch"
    steps = [
        ["cmake", "-S", str(ROOT / "cpp"), "-B", str(BUILD), *generator, f"-DTorch_DIR={torch_dir}", "-DCMAKE_BUILD_TYPE=Release"],
        ["cmake", "--build", str(BUILD), "-j", str(os.cpu_count() or 1)],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return BUILD / "rrcm-certify-cpp"


def run(cli: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(cli), *args], input=stdin, capture_output=True, text=True, timeout=600)


def write_pnm(path: Path, image: torch.Tensor) -> Path:
    """An 8-bit binary PGM (1 channel) or PPM (3 channels) of a (C, H, W) image in [0, 1]."""
    c, h, w = image.shape
    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    path.write_bytes(f"{'P5' if c == 1 else 'P6'}\n# written by test_cpp\n{w} {h}\n255\n".encode() + pixels.tobytes())
    return path


def test_bound_and_radius_equal_python(cli):
    triples = [(k, n, alpha, sigma)
               for n in (1, 7, 100, 1000, 100_000)
               for k in sorted({0, 1, n // 2, (3 * n) // 5, (9 * n) // 10, n - 1, n} & set(range(n + 1)))
               for alpha, sigma in itertools.product((0.001, 0.01, 0.05), (0.12, 0.25, 0.5, 1.0))]
    done = run(cli, "--bound", "-", stdin="".join(f"{k} {n} {a!r} {s!r}\n" for k, n, a, s in triples))
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert len(rows) == len(triples)
    certified = 0
    for (k, n, alpha, sigma), (p_text, r_text) in zip(triples, rows):
        p_lower = stats.lower_confidence_bound(k, n, alpha)
        assert abs(float(p_text) - p_lower) <= 1e-9, (k, n, alpha)
        if p_lower >= 0.5:
            certified += 1
            assert abs(float(r_text) - stats.certified_radius(p_lower, sigma)) <= 1e-9, (k, n, alpha, sigma)
        else:
            assert math.isnan(float(r_text))
    assert certified > len(triples) // 3


def test_single_bound_prints_17_digits(cli):
    done = run(cli, "--bound", "990", "1000", "0.001", "0.25")
    p_text, r_text = done.stdout.split()
    assert float(p_text) == pytest.approx(stats.lower_confidence_bound(990, 1000, 0.001), abs=1e-15)
    assert len(p_text.lstrip("0.")) >= 16


@pytest.mark.slow
def test_certificates_agree_with_python_engine(cli, tmp_path):
    """Same predictions and radii within Monte-Carlo error; the noise streams differ (C++: torch::randn)."""
    from rrcm import load_classifier
    from rrcm.engine import Certifier

    n0, n, alpha = 100, 4000, 0.001
    images, _ = fashion_test_images(12)
    certifier = Certifier(load_classifier(tiny_checkpoint()), 10, SIGMA, batch_size=500)
    # Images whose outcome is not a coin toss: by an independent pilot estimate, p_A is far enough above
    # 1/2 and the runner-up that both runs certify the same class with overwhelming probability.
    chosen = []
    for i, x in enumerate(images):
        pilot = certifier.certify(x, n0, 2000, alpha, seed=1000 + i)
        top = np.sort(np.asarray(pilot.counts))[::-1] / 2000
        if top[0] > 0.65 and top[0] - top[1] > 0.2:
            chosen.append(i)
    assert len(chosen) >= 3, "the tiny test classifier should be confident on some images"
    paths = [write_pnm(tmp_path / f"img{i}.pgm", images[i]) for i in chosen]

    done = run(cli, "--model", str(tiny_package()), "--n0", str(n0), "--n", str(n), "--alpha", str(alpha),
               "--batch", "500", "--seed", "3", *map(str, paths))
    assert done.returncode == 0, done.stderr
    assert f"sigma {SIGMA:g}, 10 classes, input 1x28x28, dataset fashion-mnist, device cpu" in done.stderr
    header, *rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert header == ["image", "predict", "radius", "pA_lower", "count", "n", "time"]
    assert len(rows) == len(chosen)
    for i, (path, predict, radius, p_lower, count, total, _) in zip(chosen, rows):
        py = certifier.certify(images[i], n0, n, alpha, seed=i)
        assert int(predict) == py.prediction, path
        assert int(total) == n
        k_cpp = int(count)
        assert float(p_lower) == pytest.approx(stats.lower_confidence_bound(k_cpp, n, alpha), abs=1e-8)
        k_py = int(py.counts[py.prediction])
        p = k_py / n
        # Two independent Binomial(n, p) counts: their difference has std sqrt(2 n p (1 - p)).
        tol = 5 * math.sqrt(2 * n * max(p * (1 - p), 1 / n)) + 1
        assert abs(k_cpp - k_py) <= tol, (path, k_cpp, k_py)
        band = [stats.certified_radius(stats.lower_confidence_bound(min(max(k, 0), n), n, alpha), SIGMA)
                for k in (k_py - tol, k_py + tol)]
        assert band[0] - 1e-9 <= float(radius) <= band[1] + 1e-9, (path, radius, py.radius)


@pytest.mark.slow  # needs the compiled package
def test_bad_input_is_one_line_exit_2(cli, tmp_path):
    image = write_pnm(tmp_path / "x.pgm", fashion_test_images(1)[0][0])
    colour = write_pnm(tmp_path / "x.ppm", torch.rand(3, 28, 28))
    small = write_pnm(tmp_path / "small.pgm", torch.rand(1, 14, 14))
    truncated = tmp_path / "truncated.pgm"
    truncated.write_bytes(image.read_bytes()[:-10])
    sixteen_bit = tmp_path / "deep.pgm"
    sixteen_bit.write_bytes(b"P5\n28 28\n65535\n" + bytes(2 * 28 * 28))
    not_zip = tmp_path / "junk.pt2"
    not_zip.write_bytes(os.urandom(4096))
    package = str(tiny_package())
    cases = [
        ("--model", str(tmp_path / "missing.pt2"), str(image)),
        ("--model", str(not_zip), str(image)),
        ("--model", package, str(colour)),
        ("--model", package, str(small)),
        ("--model", package, str(truncated)),
        ("--model", package, str(sixteen_bit)),
        ("--model", package, str(tmp_path / "missing.pgm")),
        ("--model", package, "--alpha", "1.5", str(image)),
        ("--model", package, "--n", "0", str(image)),
        ("--model", package, "--n", "ten", str(image)),
        ("--bound", "11", "10", "0.001", "0.25"),
        ("--bound", "1", "2"),
    ]
    for args in cases:
        done = run(cli, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("rrcm-certify-cpp: error: ") and done.stderr.count("\n") == 1, (args, done.stderr)
