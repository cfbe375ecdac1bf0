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
