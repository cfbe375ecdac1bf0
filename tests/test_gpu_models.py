"""The timing models of benchmarks/gpu_models.py have the published sizes and costs (counted on the meta device)."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_models  # noqa: E402

count = functools.cache(gpu_models.count_macs)


@pytest.mark.parametrize(
    "name, params_m, gmacs",
    [
        ("adm-256", 552.8, 1120),  # guided-diffusion's 256x256_diffusion_uncond: 552,814,086 parameters
        ("vit-l16", 304.3, 61.6),
        ("vit-b16", 86.6, 17.6),
        ("rrcm-b-imagenet", 86.5, 17.7),  # 35.5 GFLOP per sample
        ("rrcm-b-cifar", 85.1, 5.7),  # 11.4 GFLOP
    ],
)
def test_parameters_and_macs(name, params_m, gmacs):
    params, macs = count(name)
    assert params / 1e6 == pytest.approx(params_m, rel=2e-3)
    assert macs / 1e9 == pytest.approx(gmacs, rel=1e-2)


def test_denoised_smoothing_costs_67_to_85_times_rrcm():
    rrcm = count("rrcm-b-imagenet")[1]
    at_224, at_512 = count("dds-vit-l16-224")[1] / rrcm, count("dds-vit-l16-512")[1] / rrcm
    assert 66.5 < at_224 < 67.5 and 83 < at_512 < 85
    assert count("dds-vit-l16-224")[1] == count("adm-256")[1] + count("vit-l16")[1]


def test_small_pipeline_runs():
    torch.manual_seed(0)
    model, shape = gpu_models.build("dds-tiny", sigma=0.25)
    model.eval()
    assert shape == (3, 32, 32)
    assert model.denoiser.timestep > 0
    x = 2 * torch.rand(3, 3, 32, 32) - 1 + 0.5 * torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        x0, logits = model.denoiser(x), model(x)
    assert x0.shape == x.shape and x0.abs().max() <= 1 and logits.shape == (3, 1000) and logits.isfinite().all()


def test_pixel_space_runs_through_the_engine():
    """DDS behind PixelSpace is a classifier of [0, 1] images: the engine samples it as `benchmarks/dds_ratio.py` does."""
    from rrcm.engine import Certifier

    torch.manual_seed(0)
    dds, shape = gpu_models.build("dds-tiny", sigma=0.25)
    model = gpu_models.PixelSpace(dds.eval(), 0.25, shape)
    x = torch.rand(1, *shape)
    with torch.no_grad():
        assert torch.allclose(model(x), dds(2 * x - 1), atol=1e-5)
    certifier = Certifier(model, 1000, 0.25, batch_size=2)
    assert (certifier.input_shape, certifier.backend.input_scale, certifier.backend.input_shift) == (shape, 2.0, -1.0)
    assert len(certifier.predict_many(x, 2, 0.001, seeds=[0])) == 1
