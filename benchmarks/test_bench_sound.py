"""Cost of sound (grid-rounded, inverse-CDF) noise against plain Gaussian noise, per batch of model inputs.

Run: python -m pytest benchmarks/test_bench_sound.py --benchmark-only --benchmark-enable \
       --benchmark-json benchmarks/results/sound-<device>.json
Compare the mean of `sound` against `gaussian` for the same shape and device.
"""
import pytest
import torch

from rrcm.kernels import noisy_inputs
from rrcm.kernels.sound import sound_noisy_inputs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = {"fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
SAMPLERS = {"gaussian": noisy_inputs, "sound": sound_noisy_inputs}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_noise_batch(benchmark, sampler, shape, device):
    batch = 1000
    generator = torch.Generator(device).manual_seed(0)
    images = torch.randint(0, 256, (1, *SHAPES[shape]), generator=generator, device=device, dtype=torch.uint8)
    if sampler == "gaussian":
        images = images.float() / 255
    repeats = torch.tensor([batch], device=device)
    scale, shift = 1.789, -0.894  # a model-space affine map, as the certifier passes

    def run():
        out = SAMPLERS[sampler](images, repeats, 0.25, generator, scale, shift, torch.float32)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    out = benchmark(run)
    assert out.shape == (batch, *SHAPES[shape]) and out.dtype == torch.float32
    benchmark.extra_info.update(batch=batch, shape=list(SHAPES[shape]), threads=torch.get_num_threads())


CERTIFY_RATES: dict[str, float] = {}


@pytest.mark.parametrize("sound", [False, True], ids=["gaussian", "sound"])
def test_certify_cost(benchmark, sound):
    """What a user pays: one CERTIFY (n0 + n = 10,100 samples) of a Fashion-MNIST test image with the bundled
    sigma = 0.25 classifier, sound against plain noise (the image is on the 1/255 grid, as every IDX image)."""
    from rrcm.classifier import load_classifier
    from rrcm.data import load_dataset
    from rrcm.engine import Certifier

    image = load_dataset("fashion-mnist", "test")[0][0]
    certifier = Certifier(load_classifier("fashion-mnist", 0.25), 10, 0.25, batch_size=128, sound=sound)
    result = benchmark.pedantic(certifier.certify, args=(image, 100, 10_000, 0.001), kwargs={"seed": 0},
                                rounds=5, warmup_rounds=1)
    assert result.counts.sum() == 10_000
    name = "sound" if sound else "gaussian"
    CERTIFY_RATES[name] = 10_100 / benchmark.stats.stats.min
    benchmark.extra_info.update(samples_per_s=CERTIFY_RATES[name], threads=torch.get_num_threads())
    if sound and "gaussian" in CERTIFY_RATES:
        benchmark.extra_info["cost_ratio"] = CERTIFY_RATES["gaussian"] / CERTIFY_RATES["sound"]
