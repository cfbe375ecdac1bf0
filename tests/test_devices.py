"""Devices: names checked in one line, torchrun's processes against the GPU count, and on a CUDA GPU the
engine itself: one host synchronization per call, bf16 and torch.compile, `rrcm certify --device cuda`."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from deploy_helpers import fashion_test_images
from rrcm import load_classifier
from rrcm.cli import main
from rrcm.device import resolve_device
from rrcm.engine import Certifier
from rrcm.errors import UserError
from rrcm.kernels import count_predictions, noisy_inputs
from rrcm.kernels.sampling import repeat_images
from rrcm.distributed import setup


def needs_cuda(test):
    """A test only a CUDA GPU runs: marked `cuda` (selected by `pytest -m cuda`), skipped without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def test_device_names(monkeypatch):
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for name, message in [("gpu", "unknown device"), (3.5, "unknown device"), ("meta", "not supported")]:
        with pytest.raises(UserError, match=message):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="sees no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="sees 2 CUDA GPU"):
        resolve_device("cuda:2")


def test_torchrun_with_more_processes_than_gpus_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="more processes on this machine than it has GPUs"):
        setup("cuda")


def test_bad_device_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "c.tsv"
    assert main(["certify", "--model", "fashion-mnist", "--sigma", "0.25", "--device", "gpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown device 'gpu'" in err[0]
    assert not out.exists()


def test_repeats_as_integers_or_a_tensor():
    images = torch.rand(3, 1, 4, 4)
    want = torch.repeat_interleave(images, torch.tensor([2, 0, 3]), dim=0)
    assert torch.equal(repeat_images(images, [2, 0, 3]), want)
    assert torch.equal(repeat_images(images, torch.tensor([2, 0, 3])), want)
    assert repeat_images(images, [0, 0, 0]).shape == (0, 1, 4, 4)
    for bad in ([1, 2], [1, -1, 1], torch.tensor([0.5, 1.0, 2.0])):
        with pytest.raises(UserError, match="non-negative counts"):
            repeat_images(images, bad)
    # The same generator state gives the same noise for either form.
    a = noisy_inputs(images, [2, 0, 3], 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, noisy_inputs(images, torch.tensor([2, 0, 3]), 0.5, torch.Generator().manual_seed(1)))


def test_counts_equal_bincount():
    logits = torch.randn(500, 7, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 4, (500,), generator=torch.Generator().manual_seed(1))
    want = torch.bincount(ids * 7 + logits.argmax(1), minlength=28).view(4, 7)
    assert torch.equal(count_predictions(logits, ids, 4), want)


# ---------------------------------------------------------------- on a CUDA GPU
@pytest.fixture(scope="module")
def bundled() -> torch.nn.Module:
    return load_classifier("fashion-mnist", sigma=0.25)


@needs_cuda
@pytest.mark.parametrize("sampler, cuda_graphs", [("torch", False), ("triton", False), ("triton", True)])
def test_one_host_synchronization_per_call(bundled, sampler, cuda_graphs):
    certifier = Certifier(bundled, 10, 0.25, batch_size=500, device="cuda", sampler=sampler, cuda_graphs=cuda_graphs)
    images, _ = fashion_test_images(3)
    certifier.certify_many(images, 100, 2000, 0.001, seeds=[0, 1, 2])  # first use: kernels, cuBLAS handles
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = certifier.certify_many(images, 100, 2000, 0.001, seeds=[0, 1, 2])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs  # the counts of the whole call coming to the host
    assert all(r.counts.sum() == 2000 for r in results)


@needs_cuda
def test_bf16_and_compile_on_cuda_agree_with_fp32(bundled):
    images, _ = fashion_test_images(10)
    seeds = list(range(10))

    def counts(**options) -> np.ndarray:
        certifier = Certifier(bundled, 10, 0.25, batch_size=1000, device="cuda", **options)
        return np.stack([r.counts for r in certifier.certify_many(images, 100, 2000, 0.001, seeds=seeds)])

    fp32 = counts()
    assert np.array_equal(fp32, counts())  # seeded runs repeat exactly on the GPU too
    for options, tolerance in [(dict(compile=True), 0.005), (dict(dtype=torch.bfloat16), 0.03),
                               (dict(dtype=torch.float16), 0.03)]:
        other = counts(**options)
        assert (other.argmax(1) == fp32.argmax(1)).mean() >= 0.9, options
        assert np.abs(other - fp32).sum(1).max() <= 2 * tolerance * 2000, (options, np.abs(other - fp32).sum(1))


@needs_cuda
def test_onnxruntime_on_cuda(bundled):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UserError, match="no CUDA provider"):
            Certifier(bundled, 10, 0.25, device="cuda", backend="onnxruntime")
        return
    images, _ = fashion_test_images(4)
    torch_counts = Certifier(bundled, 10, 0.25, device="cuda").certify_many(images, 50, 500, 0.01, seeds=range(4))
    ort_counts = Certifier(bundled, 10, 0.25, device="cuda", backend="onnxruntime").certify_many(images, 50, 500, 0.01, seeds=range(4))
    for a, b in zip(torch_counts, ort_counts):
        assert np.abs(a.counts - b.counts).sum() <= 10


@needs_cuda
def test_certify_command_on_cuda(tmp_path):
    out = tmp_path / "c.tsv"
    args = ["certify", "--model", "fashion-mnist", "--sigma", "0.25", "--n0", "50", "--n", "1000", "--max", "4",
            "--device", "cuda", "--seed", "0", "--out", str(out)]
    assert main(args) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 5 and [line.split("\t")[0] for line in lines[1:]] == ["0", "1", "2", "3"]
    params = json.loads(out.with_name(out.name + ".json").read_text())
    assert params["device"] == "cuda" and params["batch"] == 1000
    assert main(args) == 0  # resumes: nothing left to do, nothing repeated
    assert out.read_text().splitlines() == lines


@needs_cuda
@pytest.mark.parametrize("options", [{}, {"compile": True}, {"dtype": torch.bfloat16}], ids=["fp32", "compile", "bf16"])
def test_cuda_graph_replays_count_what_the_eager_triton_path_counts(bundled, options):
    """The captured fixed-size step (last batch of each image padded) gives the eager step's counts: padding rows are
    never counted, and replays continue each image's noise stream."""
    images, _ = fashion_test_images(3)

    def counts(cuda_graphs: bool) -> np.ndarray:
        certifier = Certifier(bundled, 10, 0.25, batch_size=700, device="cuda", sampler="triton", cuda_graphs=cuda_graphs,
                              **options)
        first = certifier.certify_many(images, 100, 2500, 0.001, seeds=[4, 5, 6])  # 2,600 samples: 4 batches, padded
        again = certifier.certify_many(images[:1], 30, 10, 0.001, seeds=[7])  # a call of one short batch
        return np.stack([r.counts for r in first + again])

    eager, graphed = counts(False), counts(True)
    assert eager.sum(1).tolist() == [2500, 2500, 2500, 10]
    assert np.array_equal(eager, graphed)


@needs_cuda
def test_low_precisions_on_cuda_agree_with_fp32(bundled):
    """bf16, fp16 and (on GPUs with FP8 tensor cores) fp8 against the float32 classifier without TF32, on noisy test
    images: what `rrcm certify` measures before it certifies in a lower precision."""
    from rrcm.engine.backends import TorchBackend
    from rrcm.engine.fp8 import fp8_supported
    from rrcm.export.runtime import backend_agreement

    images, _ = fashion_test_images(512)
    noisy = images + 0.25 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    dtypes = [torch.bfloat16, torch.float16] + ([torch.float8_e4m3fn] if fp8_supported(torch.device("cuda")) else [])
    for dtype in dtypes:
        agreement = backend_agreement(bundled, TorchBackend(bundled, "cuda", dtype=dtype), inputs=noisy)
        assert agreement.argmax_agreement >= (0.97 if dtype == torch.float8_e4m3fn else 0.99), (dtype, agreement)


@needs_cuda
def test_certify_command_with_the_triton_sampler_and_graphs(tmp_path):
    out = tmp_path / "c.tsv"
    args = ["certify", "--model", "fashion-mnist", "--sigma", "0.25", "--n0", "50", "--n", "1000", "--max", "3",
            "--device", "cuda", "--sampler", "triton", "--cuda-graphs", "--batch", "400", "--out", str(out)]
    assert main(args) == 0
    params = json.loads(out.with_name(out.name + ".json").read_text())
    assert params["sampler"] == "triton" and params["cuda_graphs"] is True
    lines = out.read_text().splitlines()
    assert main(args) == 0 and out.read_text().splitlines() == lines  # resumes: nothing repeated
