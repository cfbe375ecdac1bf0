"""AOTInductor packages: `rrcm export aoti`, the engine's aoti backend, and bad packages."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest
import torch

from deploy_helpers import SIGMA, SIGMAS, fashion_test_images, tiny_checkpoint, tiny_package, tiny_sigma_package
from rrcm import NoisyImageClassifier, load_classifier
from rrcm.engine import Certifier
from rrcm.errors import UserError
from rrcm.export.aoti import AotiBackend, export_aoti, row_major
from rrcm.model import Classifier
from rrcm.presets import get_preset

pytestmark = pytest.mark.slow  # the package is compiled once per test process (about 30 s on 2 CPU cores)


@pytest.fixture(scope="module")
def package():
    return tiny_package()


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(tiny_checkpoint())


def rrcm_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rrcm", *args], capture_output=True, text=True, timeout=600)


def test_metadata_records_what_a_runtime_needs(package, classifier):
    backend = AotiBackend(package)
    assert backend.info.sigma == SIGMA
    assert backend.info.num_classes == 10
    assert backend.info.input_shape == (1, 28, 28)
    assert backend.info.dataset == "fashion-mnist"
    assert backend.input_scale == classifier.input_scale and backend.input_shift == classifier.input_shift
    assert backend.static_batch is None
    metadata = backend.runner.get_metadata()
    assert metadata["rrcm.device"] == "cpu" and metadata["rrcm.torch_version"] == torch.__version__
    assert metadata["rrcm.input_shape"] == "1,28,28"


def test_logits_match_torch(package, classifier):
    backend = AotiBackend(package)
    g = torch.Generator().manual_seed(0)
    for rows in (1, 5, 300):
        u = torch.randn((rows, 1, 28, 28), generator=g) * 1.5
        with torch.no_grad():
            expected = classifier.forward_model_input(u)
        torch.testing.assert_close(backend.forward(u), expected, atol=1e-4, rtol=1e-4)
    # A one-channel batch with channels-last strides is "contiguous" but not row-major: the package
    # would misread it unless the backend copies it.
    odd = torch.empty_strided(u.shape, (784, 1, 28, 1)).copy_(u)
    assert odd.is_contiguous() and row_major(odd).stride() == u.stride()
    torch.testing.assert_close(backend.forward(odd), expected, atol=1e-4, rtol=1e-4)


def test_same_counts_as_torch_backend_on_same_noise(package, classifier):
    images, _ = fashion_test_images(4)
    seeds = [11, 12, 13, 14]
    compiled = Certifier(str(package), 10, SIGMA, batch_size=300).certify_many(images, 100, 500, 0.001, seeds)
    eager = Certifier(classifier, 10, SIGMA, batch_size=300).certify_many(images, 100, 500, 0.001, seeds)
    for a, b in zip(compiled, eager):
        assert a.counts.tolist() == b.counts.tolist()
        assert (a.prediction, a.radius, a.p_lower) == (b.prediction, b.radius, b.p_lower)
    assert len({r.prediction for r in eager}) > 1, "the test classifier should not predict one class everywhere"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA package needs a CUDA GPU")
def test_cuda_package_matches_torch_on_the_gpu(classifier):
    package = tiny_package("cuda", 500)
    backend = AotiBackend(package, "cuda")
    assert backend.static_batch == 500 and backend.runner.get_metadata()["rrcm.device"] == "cuda"
    u = torch.randn((700, 1, 28, 28), generator=torch.Generator().manual_seed(0)).cuda()
    on_gpu = classifier.to("cuda")
    with torch.no_grad():
        torch.testing.assert_close(backend.forward(u), on_gpu.forward_model_input(u), atol=1e-3, rtol=1e-3)
    images, _ = fashion_test_images(3)
    for sampler in ("torch", "triton"):
        compiled = Certifier(str(package), 10, SIGMA, batch_size=500, device="cuda", sampler=sampler)
        eager = Certifier(on_gpu, 10, SIGMA, batch_size=500, device="cuda", sampler=sampler)
        for a, b in zip(compiled.certify_many(images, 100, 900, 0.001, [1, 2, 3]),
                        eager.certify_many(images, 100, 900, 0.001, [1, 2, 3])):
            assert abs(a.counts - b.counts).sum() <= 4 and a.prediction == b.prediction


@pytest.fixture(scope="module")
def small_classifier():
    """A 14 px classifier: another input shape than Fashion-MNIST's."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return NoisyImageClassifier(Classifier(get_preset("tiny", image_size=14)), SIGMA).eval()


@pytest.fixture(scope="module")
def static_small_package(tmp_path_factory, small_classifier):
    return export_aoti(small_classifier, tmp_path_factory.mktemp("aoti") / "small-static.pt2", batch=8)


def test_static_batch_package_takes_any_batch(static_small_package, small_classifier):
    backend = AotiBackend(static_small_package)
    assert backend.static_batch == 8 and backend.info.input_shape == (1, 14, 14)
    g = torch.Generator().manual_seed(1)
    for rows in (3, 8, 21):
        u = torch.randn((rows, 1, 14, 14), generator=g)
        with torch.no_grad():
            torch.testing.assert_close(backend.forward(u), small_classifier.forward_model_input(u), atol=1e-4, rtol=1e-4)


def test_certify_command_with_a_package(tmp_path, package, static_small_package):
    common = ["--n0", "50", "--n", "300", "--max", "3", "--batch", "200", "--device", "cpu", "--seed", "5"]
    tsv = {}
    for name, model in [("aoti", str(package)), ("torch", str(tiny_checkpoint()))]:
        done = rrcm_cli("certify", "--model", model, *common, "--out", str(tmp_path / f"{name}.tsv"))
        assert done.returncode == 0, done.stderr[-3000:]
        tsv[name] = [line.split("\t")[:5] for line in (tmp_path / f"{name}.tsv").read_text().splitlines()]
    assert len(tsv["aoti"]) == 4 and tsv["aoti"] == tsv["torch"]  # header + 3 rows, all but the time column
    for args, message in [(["--model", str(package), "--sigma", "0.5"], "sigma 0.25, not 0.5"),
                          (["--model", str(static_small_package)], "(1, 14, 14)")]:
        done = rrcm_cli("certify", *args, *common, "--out", str(tmp_path / "refused.tsv"))
        assert done.returncode == 2, done.stderr[-3000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("rrcm: error: ") and message in last, done.stderr


def test_bad_packages_are_user_errors(tmp_path, package):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(os.urandom(10_000))
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(package.read_bytes()[: package.stat().st_size // 2])
    not_a_package = tmp_path / "other.pt2"
    with zipfile.ZipFile(not_a_package, "w") as z:
        z.writestr("other/data.txt", "not compiled code")
    broken_library = tmp_path / "broken.pt2"
    data = bytearray(package.read_bytes())
    elf = data.find(b"\x7fELF")
    data[elf:elf + 64] = bytes(64)
    broken_library.write_bytes(bytes(data))
    for path, message in [(tmp_path / "missing.pt2", "no such"), (junk, "not a zip"), (truncated, "not a zip"),
                          (not_a_package, "cannot load"), (broken_library, "cannot load")]:
        with pytest.raises(UserError, match=message):
            Certifier(str(path), 10, SIGMA)


def test_package_must_fit_sigma_classes_device_and_images(package):
    with pytest.raises(UserError, match="sigma 0.25, not 0.5"):
        Certifier(str(package), 10, 0.5)
    with pytest.raises(UserError, match="10 classes, not 100"):
        Certifier(str(package), 100, SIGMA)
    with pytest.raises(UserError, match="compiled for cpu, not cuda" if torch.cuda.is_available() else "sees no CUDA GPU"):
        AotiBackend(package, "cuda")
    certifier = Certifier(str(package), 10, SIGMA)
    with pytest.raises(UserError, match="does not fit"):
        certifier.certify(torch.rand(3, 32, 32), 10, 10, 0.01)  # a CIFAR-10 image


def test_export_command_bad_input_exit_2(tmp_path):
    checkpoint = str(tiny_checkpoint())
    cases = [
        ["--model", checkpoint, "--out", str(tmp_path / "model.onnx")],
        ["--model", checkpoint, "--out", str(tmp_path / "m.pt2"), "--batch", "0"],
        ["--model", str(tmp_path / "no-such-checkpoint"), "--out", str(tmp_path / "m.pt2")],
        ["--model", checkpoint, "--sigma", "0.5", "--out", str(tmp_path / "m.pt2")],
    ]
    if not torch.cuda.is_available():
        cases.append(["--model", checkpoint, "--out", str(tmp_path / "m.pt2"), "--device", "cuda"])
    for args in cases:
        done = rrcm_cli("export", "aoti", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.strip().splitlines()[-1].startswith("rrcm: error: "), done.stderr
        assert "Traceback" not in done.stderr
    assert not list(tmp_path.glob("*.pt2"))


# --- a classifier fine-tuned for several sigmas: one package with a sigma input -------------------------------

@pytest.fixture(scope="module")
def sigma_package():
    return tiny_sigma_package()


def test_sigma_input_package_matches_torch_at_each_sigma(sigma_package):
    checkpoint = tiny_checkpoint("sigmas")
    metadata = AotiBackend(sigma_package, sigma=0.5).runner.get_metadata()
    assert metadata["rrcm.sigmas"] == "0.25,0.5,1.0" and "rrcm.sigma" not in metadata
    x = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    logits = {}
    for sigma in SIGMAS:
        backend = AotiBackend(sigma_package, sigma=sigma)
        assert backend.info.sigma == sigma and (backend.input_scale, backend.input_shift) == (1.0, 0.0)
        noisy = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = load_classifier(checkpoint, sigma)(noisy)
        logits[sigma] = backend.forward(noisy)
        torch.testing.assert_close(logits[sigma], expected, atol=1e-4, rtol=1e-4)
        assert torch.equal(logits[sigma].argmax(1), expected.argmax(1))
    assert (logits[0.25] - logits[1.0]).abs().max() > 0.1  # the sigma input is live


def test_sigma_input_package_gives_the_torch_counts_and_refuses_other_sigmas(sigma_package):
    checkpoint = tiny_checkpoint("sigmas")
    images, _ = fashion_test_images(3)
    seeds = [21, 22, 23]
    for sigma in (0.5, 1.0):
        compiled = Certifier(str(sigma_package), 10, sigma, batch_size=300).certify_many(images, 100, 500, 0.001, seeds)
        eager = Certifier(load_classifier(checkpoint, sigma), 10, sigma, batch_size=300).certify_many(images, 100, 500, 0.001, seeds)
        for a, b in zip(compiled, eager):
            assert a.counts.tolist() == b.counts.tolist()
            assert (a.prediction, a.radius, a.p_lower) == (b.prediction, b.radius, b.p_lower)
    with pytest.raises(UserError, match="serves sigma 0.25, 0.5 and 1: give"):
        AotiBackend(sigma_package)
    with pytest.raises(UserError, match="fine-tuned for sigma 0.25, 0.5 and 1, not 0.3"):
        Certifier(str(sigma_package), 10, 0.3)
