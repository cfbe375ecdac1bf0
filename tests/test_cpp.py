"""The C++ embedding (cpp/): built with CMake against the pip wheel's libtorch, checked against Python.

The build folder build/cpp is kept between runs (incremental rebuilds take seconds).
"""
from __future__ import annotations

import itertools
import math
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy_helpers import (MODEL_DIR, SIGMA, fashion_test_images, tiny_checkpoint, tiny_nan_package, tiny_package,
                            tiny_sigma_package, write_zip)
import oracle
from rrcm.engine import stats

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cpp"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _has_boost_math(compiler: str) -> bool:
    probe = "#include <boost/math/special_functions/beta.hpp>\nint main() { return 0; }\n"
    done = subprocess.run([compiler, "-fsyntax-only", "-x", "c++", "-"], input=probe, capture_output=True, text=True)
    return done.returncode == 0


@pytest.fixture(scope="module")
def cli() -> Path:
    compiler = _compiler()
    if shutil.which("cmake") is None or compiler is None:
        pytest.skip("no C++ compiler or no cmake on PATH: the C++ embedding cannot be built here "
                    "(apt-get install g++ cmake, or bash scripts/install.sh)")
    if not _has_boost_math(compiler):
        pytest.skip("the Boost.Math headers are not installed: the C++ embedding cannot be built here "
                    "(apt-get install libboost-math-dev, or bash scripts/install.sh)")
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


def run(cli: Path, *args: str, stdin: str | None = None, tmpdir: Path | None = None) -> subprocess.CompletedProcess:
    env = None if tmpdir is None else {**os.environ, "TMPDIR": str(tmpdir)}
    return subprocess.run([str(cli), *args], input=stdin, capture_output=True, text=True, timeout=600, env=env)


def error_line(done: subprocess.CompletedProcess) -> str:
    """The one error line of a refused run (exit 2), its last line on stderr."""
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("rrcm-certify-cpp: error: ")]
    assert len(errors) == 1 and done.stderr.endswith(errors[0] + "\n"), done.stderr
    return errors[0]


def write_pnm(path: Path, image: torch.Tensor) -> Path:
    """An 8-bit binary PGM (1 channel) or PPM (3 channels) of a (C, H, W) image in [0, 1]."""
    c, h, w = image.shape
    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    path.write_bytes(f"{'P5' if c == 1 else 'P6'}\n# written by test_cpp\n{w} {h}\n255\n".encode() + pixels.tobytes())
    return path


def test_bound_and_radius_equal_the_exact_values(cli):
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
        # The oracle (roots of exact binomial sums) where its sums are short; at n = 100,000 the Python engine,
        # which tests/test_stats.py holds to the oracle there.
        p_lower = oracle.clopper_pearson_lower(k, n, alpha) if n <= 1000 else stats.lower_confidence_bound(k, n, alpha)
        assert abs(float(p_text) - p_lower) <= 1e-9, (k, n, alpha)
        if p_lower >= 0.5:
            certified += 1
            assert abs(float(r_text) - oracle.certified_radius(p_lower, sigma)) <= 1e-9, (k, n, alpha, sigma)
        else:
            assert math.isnan(float(r_text))
    assert certified > len(triples) // 3


def test_single_bound_prints_17_digits(cli):
    done = run(cli, "--bound", "990", "1000", "0.001", "0.25")
    p_text, r_text = done.stdout.split()
    assert float(p_text) == pytest.approx(oracle.clopper_pearson_lower(990, 1000, 0.001), abs=1e-15)
    assert float(r_text) == pytest.approx(oracle.certified_radius(float(p_text), 0.25), abs=1e-15)
    assert len(p_text.lstrip("0.")) >= 16


def agree_with_python_engine(cli: Path, tmp_path: Path, package: Path, classifier, sigma: float, *options: str) -> None:
    """The C++ example certifies `package` like the Python engine certifies `classifier` at `sigma`: the same
    predictions and radii within Monte-Carlo error (the noise streams differ: C++ uses torch::randn)."""
    from rrcm.engine import Certifier

    n0, n, alpha = 100, 4000, 0.001
    images, _ = fashion_test_images(12)
    certifier = Certifier(classifier, 10, sigma, batch_size=500)
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

    done = run(cli, "--model", str(package), "--n0", str(n0), "--n", str(n), "--alpha", str(alpha),
               "--batch", "500", "--seed", "3", *options, *map(str, paths))
    assert done.returncode == 0, done.stderr
    assert f"sigma {sigma:g}" in done.stderr and "10 classes, input 1x28x28, dataset fashion-mnist, device cpu" in done.stderr
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
        band = [stats.certified_radius(stats.lower_confidence_bound(min(max(k, 0), n), n, alpha), sigma)
                for k in (k_py - tol, k_py + tol)]
        assert band[0] - 1e-9 <= float(radius) <= band[1] + 1e-9, (path, radius, py.radius)


@pytest.mark.slow
def test_certificates_agree_with_python_engine(cli, tmp_path):
    from rrcm import load_classifier

    agree_with_python_engine(cli, tmp_path, tiny_package(), load_classifier(tiny_checkpoint()), SIGMA)


@pytest.mark.slow
def test_sigma_input_package_certifies_at_its_sigma_like_python(cli, tmp_path):
    """A package with a sigma input (a classifier fine-tuned for several sigmas) at --sigma 0.5 against the torch
    classifier for sigma 0.5; without --sigma, or at a sigma it does not serve, a one-line error; a package for one
    sigma accepts its own --sigma and refuses another."""
    from rrcm import load_classifier

    package = tiny_sigma_package()
    agree_with_python_engine(cli, tmp_path, package, load_classifier(tiny_checkpoint("sigmas"), 0.5), 0.5, "--sigma", "0.5")
    image = write_pnm(tmp_path / "x.pgm", fashion_test_images(1)[0][0])
    for model, options, message in [
        (package, [], "takes the noise level as an input and serves sigma 0.25, 0.5 and 1: give"),
        (package, ["--sigma", "0.3"], "serves sigma 0.25, 0.5 and 1, not 0.3"),
        (package, ["--sigma", "nan"], "sigma must be a positive number"),
        (tiny_package(), ["--sigma", "0.5"], "built for sigma 0.25, not 0.5"),
    ]:
        done = run(cli, "--model", str(model), "--n", "100", *options, str(image))
        assert done.returncode == 2, (options, done.stderr)
        assert done.stderr.startswith("rrcm-certify-cpp: error: ") and message in done.stderr, done.stderr
    done = run(cli, "--model", str(tiny_package()), "--sigma", str(SIGMA), "--n", "100", str(image))
    assert done.returncode == 0, done.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA package needs a CUDA GPU")
def test_cuda_package_through_cpp(cli, tmp_path):
    """A CUDA package certified by the C++ example on the GPU predicts what the Python engine predicts."""
    from rrcm import load_classifier
    from rrcm.engine import Certifier

    images, _ = fashion_test_images(12)
    certifier = Certifier(load_classifier(tiny_checkpoint()), 10, SIGMA, batch_size=500, device="cuda")
    paths = [write_pnm(tmp_path / f"img{i}.pgm", images[i]) for i in range(12)]
    done = run(cli, "--model", str(tiny_package("cuda", 500)), "--n0", "100", "--n", "5000", "--alpha", "0.001",
               "--batch", "500", "--seed", "3", *map(str, paths))
    assert done.returncode == 0, done.stderr
    assert "device cuda" in done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()[1:]]
    assert len(rows) == 12
    compared = 0
    for i, row in enumerate(rows):
        py = certifier.certify(images[i], 100, 5000, 0.001, seed=i)
        top = np.sort(py.counts)[::-1]
        if top[0] - top[1] > 500:  # a clear winner: both runs must name it
            assert int(row[1]) == py.prediction, (i, row, py)
            compared += 1
    assert compared >= 1, "the tiny test classifier should be confident on some images"


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


def files(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def test_unsafe_packages_are_refused_before_the_loader(cli, tmp_path):
    """Archives the loader must not unpack (names that leave its folder, links, sizes that fill a disk, local headers
    that disagree with the directory, no compiled library) and one it fails on: one error line, exit 2, nothing
    written outside the folders the test made and nothing left in TMPDIR."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    image = write_pnm(tmp_path / "x.pgm", torch.full((1, 28, 28), 0.5))
    target = tmp_path / "outside" / "escaped.txt"
    library = {MODEL_DIR + "x.so": b"\x7fELF"}
    link, device = {MODEL_DIR + "link": 0o120777}, {MODEL_DIR + "dev": 0o020666}
    cases = {  # name: (entries, Unix modes, message)
        "parent": ({**library, MODEL_DIR + "../" * 64 + str(target).lstrip("/"): b"pwned"}, None, "'..' in the path"),
        "absolute": ({**library, str(target): b"pwned"}, None, "absolute or non-portable path"),
        "backslash": ({**library, MODEL_DIR + "..\\x": b"x"}, None, "absolute or non-portable path"),
        "control": ({**library, MODEL_DIR + "a\nb": b"x"}, None, "entry 'pkg/data/aotinductor/model/a\\x0ab': control"),
        "symlink": ({**library, MODEL_DIR + "link": b"/etc/passwd"}, link, "a link or special file"),
        "device": ({**library, MODEL_DIR + "dev": b""}, device, "a link or special file"),
        "no library": ({MODEL_DIR + "x.cpp": b"int main() {}", MODEL_DIR + "x_compile_flags.json": b"{}"}, None,
                       "not the layout 'rrcm export aoti' writes: one folder holding a compiled model library"),
        "two folders": ({**library, "other/x": b""}, None, "one folder holding a compiled model library"),
        "junk library": ({MODEL_DIR + "x.so": os.urandom(4096), MODEL_DIR + "x.blob": b"weights"}, None,
                         "cannot load AOTInductor package ("),
    }
    packages = {name: write_zip(tmp_path / f"{name}.pt2", entries, attrs) for name, (entries, attrs, _) in cases.items()}
    packages["bomb"] = write_zip(tmp_path / "bomb.pt2", {**library, MODEL_DIR + "zeros": bytes(10_000_000)},
                                 compression=zipfile.ZIP_DEFLATED)
    packages["duplicate"] = tmp_path / "duplicate.pt2"
    with pytest.warns(UserWarning), zipfile.ZipFile(packages["duplicate"], "w") as z:
        z.writestr(MODEL_DIR + "x.so", b"1")
        z.writestr(MODEL_DIR + "x.so", b"2")
    # The directory names one file, the local header (what extraction reads) another: ../data/aotinductor/model/x.so.
    header = bytearray(write_zip(tmp_path / "header.pt2", {**library, MODEL_DIR + "y": b"x"}).read_bytes())
    header[30:33] = b"../"
    packages["header"] = tmp_path / "header.pt2"
    packages["header"].write_bytes(bytes(header))
    packages["truncated"] = tmp_path / "truncated.pt2"
    packages["truncated"].write_bytes(packages["junk library"].read_bytes()[:-30])
    messages = {name: message for name, (_, _, message) in cases.items()}
    messages.update(bomb="compressed more than 200:1", duplicate="a duplicate name",
                    header="its local header names another file", truncated="corrupt AOTInductor package (not a zip archive)")
    before = files(tmp_path)
    for name, message in messages.items():
        line = error_line(run(cli, "--model", str(packages[name]), "--n", "10", str(image), tmpdir=scratch))
        assert line.startswith(f"rrcm-certify-cpp: error: {packages[name]}: ") and message in line, (name, line)
        assert files(tmp_path) == before, name


@pytest.mark.slow  # needs the compiled package
def test_compiled_package_with_an_escaping_entry_writes_nothing(cli, tmp_path):
    """The package `rrcm export aoti` wrote, plus an entry named to land outside the loader's folder (which torch's
    loader would write there, before failing or not): refused, nothing written; the package itself runs, and
    leaves nothing in TMPDIR."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    image = write_pnm(tmp_path / "x.pgm", fashion_test_images(1)[0][0])
    target = tmp_path / "outside" / "escaped.txt"
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(tiny_package()) as package, zipfile.ZipFile(evil, "w") as out:
        for info in package.infolist():
            out.writestr(info, package.read(info))
        folder = package.namelist()[0].split("/", 1)[0]
        out.writestr(f"{folder}/data/aotinductor/model/" + "../" * 64 + str(target).lstrip("/"), b"pwned")
    before = files(tmp_path)
    assert "'..' in the path" in error_line(run(cli, "--model", str(evil), "--n", "10", str(image), tmpdir=scratch))
    assert files(tmp_path) == before and not target.exists()
    done = run(cli, "--model", str(tiny_package()), "--n", "10", str(image), tmpdir=scratch)
    assert done.returncode == 0, done.stderr
    assert files(tmp_path) == before


@pytest.mark.slow  # compiles a package
def test_model_answering_nan_is_refused(cli, tmp_path):
    """A package whose logits are NaN (argmax would pick class 0 for every noisy input and certify it with a large
    radius) is refused with one error line, and no certificate is printed."""
    image = write_pnm(tmp_path / "x.pgm", fashion_test_images(1)[0][0])
    done = run(cli, "--model", str(tiny_nan_package()), "--n0", "10", "--n", "100", "--batch", "32", str(image))
    assert "the model gave NaN or Inf logits on noisy inputs; it cannot be certified" in error_line(done)
    assert done.stdout.splitlines()[1:] == []
